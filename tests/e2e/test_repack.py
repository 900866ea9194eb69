"""Background re-pack on a live mesh: etcd, a scheduler (re-pack budget 10 moves a minute, no
slack), three agents and a router. Three `engine: sim` models pinned one per node by
`node_selector`, streaming; the pins are lifted, so the fleet is fragmented (three nodes used
where one holds everything) and re-pack moves two replicas onto the third model's node, make
before break: each model has a READY replica at every moment, every stream completes whole and
none had to fail over, the moved placements say why, and the emptied nodes end empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.nodeagent.fleet import ready_nodes
from meshserve.v1 import cluster_pb2 as S

from tests.e2e.conftest import counted_stream, ready_history
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
TOKENS, STREAMS = 400, 3  # 20 ms a token: 8 s streams, per model (they outlast the moves)
SLOTS = ("a", "b", "c")


def sim_model(slot: str, pinned: bool) -> S.ModelSpec:
    doc = {"name": f"r-{slot}", "source": f"sim://{slot}", "engine": "sim", "memory": "256MiB",
           "min_replicas": 1, "max_model_len": 4096,
           "engine_args": {"ttft_ms": "5", "itl_ms": "20", "load_ms": "1500"}}  # fmt: skip
    if pinned:
        doc["node_selector"] = {"slot": slot}
    return spec_from_dict(doc)


async def placements(store: Store) -> list[S.Placement]:
    records, _rev = await store.list(store.keys.placements(), S.Placement)
    return [e.value for e in records]


def test_repack_consolidates_a_fragmented_fleet_and_no_stream_fails(tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"repack_moves_per_minute": 10, "repack_slack_gpus": 0}))
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler(extra=["--profile", str(profile)])
        for slot in SLOTS:
            mesh.start_agent(
                f"node-{slot}", device="cpu", memory_limit="4GiB", extra=["--label", f"slot={slot}"]
            )
        router = mesh.start_router()

        async def scenario() -> None:
            client = connect(EtcdConfig(mesh.etcd.endpoint))
            store = Store(client, Keyspace())
            try:
                for slot in SLOTS:
                    await store.put(store.keys.model(f"r-{slot}"), sim_model(slot, pinned=True))

                async def spread() -> dict[str, str] | None:
                    ready = await ready_nodes(store)
                    return ready if len(ready) == len(SLOTS) else None

                before = await eventually(spread, 90, "three pinned models READY", 0.2)
                assert before == {f"r-{s}": f"node-{s}" for s in SLOTS}
                started = [asyncio.Event() for _ in SLOTS]
                streams = [
                    asyncio.create_task(
                        counted_stream(router.address, f"r-{slot}", TOKENS, started[i], "move me")
                    )
                    for i, slot in enumerate(SLOTS)
                    for _ in range(STREAMS)
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)

                async def packed() -> list[S.Placement] | None:
                    held = await placements(store)
                    nodes = {p.node_id for p in held}
                    return held if len(held) == len(SLOTS) and len(nodes) == 1 else None

                async def all_ready_on(node: str) -> bool:
                    ready = await ready_nodes(store)
                    return ready == {f"r-{s}": node for s in SLOTS}

                async with ready_history(store) as seen:
                    for slot in SLOTS:  # the pins lifted: nothing moves but for re-pack
                        spec = sim_model(slot, pinned=False)
                        await store.put(store.keys.model(f"r-{slot}"), spec)
                    after = await eventually(packed, 90, "every model on one node", 0.2)
                    target = after[0].node_id
                    await eventually(
                        lambda: all_ready_on(target), 30, f"all READY on {target}", 0.2
                    )
                missing = [s for s in seen if len(s) < len(SLOTS)]
                assert not missing, missing[:3]  # a READY replica of each at every moment
                moved = [p for p in after if p.model != f"r-{target.removeprefix('node-')}"]
                assert len(moved) == 2
                assert all(p.reason.startswith("re-pack: moved off") for p in moved), moved
                results = await asyncio.gather(*streams)
                assert results == [(TOKENS, "0")] * len(streams)  # whole, none failed over
            finally:
                await client.close()

        asyncio.run(scenario())
    finally:
        mesh.stop()
