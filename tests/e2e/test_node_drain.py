"""`meshserve node drain | cordon | uncordon` and `meshserve top` against a real mesh: etcd, a
scheduler, two simulated agents (`meshserve agent --simulate 2`) and a router. Draining the node
that serves a model while eight streams run on it: the model is placed on the other node first,
the drained node's replica leaves only then, every stream completes whole and none had to fail
over (the agent let them finish), a READY replica existed at every moment, and the node ends
empty and cordoned."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.nodeagent.fleet import ready_nodes
from meshserve.v1 import cluster_pb2 as S

from tests.e2e.conftest import counted_stream, ready_history
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
TOKENS, STREAMS = 120, 8  # 20 ms a token: 2.4 s streams


def cli(mesh: Mesh, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve", *args, "--etcd", mesh.etcd.endpoint],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_drain_moves_replicas_first_and_no_stream_fails(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        mesh.start_agent("fleet", device="cpu", extra=["--simulate", "2", "--memory-limit", "4GiB"])
        router = mesh.start_router()

        async def scenario() -> None:
            client = connect(EtcdConfig(mesh.etcd.endpoint))
            store = Store(client, Keyspace())
            try:
                spec = spec_from_dict(
                    {"name": "d-sim", "source": "sim://d", "engine": "sim", "memory": "256MiB",
                     "min_replicas": 1, "max_model_len": 4096,
                     "engine_args": {"ttft_ms": "5", "itl_ms": "20", "load_ms": "1500"}}
                )  # fmt: skip
                await store.put(store.keys.model("d-sim"), spec)

                async def placed() -> str | None:
                    return (await ready_nodes(store)).get("d-sim")

                victim = await eventually(placed, 60, "d-sim READY", 0.2)
                other = "fleet-1" if victim == "fleet-0" else "fleet-0"
                started = asyncio.Event()
                streams = [
                    asyncio.create_task(
                        counted_stream(router.address, "d-sim", TOKENS, started, "drain me")
                    )
                    for _ in range(STREAMS)
                ]
                await asyncio.wait_for(started.wait(), 30)
                # Make before break: some replica is READY at every moment of the drain (a load
                # takes 1.5 s here, so dropping the old one first would leave a gap).
                async with ready_history(store) as seen:
                    drained = await asyncio.to_thread(cli, mesh, "node", "drain", victim)
                assert all("d-sim" in s for s in seen), [s.get("d-sim") for s in seen]
                assert {s["d-sim"] for s in seen} == {victim, other}  # it moved while watched
                assert drained.returncode == 0, drained.stdout + drained.stderr
                assert "drained" in drained.stdout
                results = await asyncio.gather(*streams)
                assert results == [(TOKENS, "0")] * STREAMS  # whole, and none failed over
                assert await ready_nodes(store) == {"d-sim": other}
                held, _ = await store.list(store.keys.placements(victim), S.Placement)
                assert not held
                hold = await store.get(store.keys.cordon(victim), S.NodeCordon)
                assert hold is not None and hold.drain

                # While drained, nothing new goes there; `top` shows where things are.
                shown = await asyncio.to_thread(cli, mesh, "top", "--once")
                assert shown.returncode == 0, shown.stderr
                assert "d-sim" in shown.stdout and other in shown.stdout

                lifted = await asyncio.to_thread(cli, mesh, "node", "uncordon", victim)
                assert lifted.returncode == 0, lifted.stderr
                assert await store.get(store.keys.cordon(victim), S.NodeCordon) is None
                again = await asyncio.to_thread(cli, mesh, "node", "uncordon", victim)
                assert again.returncode == 1 and "not cordoned" in again.stderr
                unknown = await asyncio.to_thread(cli, mesh, "node", "cordon", "no-such-node")
                assert unknown.returncode == 1 and "no node 'no-such-node'" in unknown.stderr
            finally:
                await client.close()

        asyncio.run(scenario())
    finally:
        mesh.stop()
