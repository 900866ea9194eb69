"""The simulator judges the scheduler's own decisions: for the same cluster records, the placements
a simulated round decides (scheduler/sim: records → `round_snapshot` → `place`) are the ones a
real scheduler process writes to a real etcd. Three seeded states of the nine-model fleet (demand
drawn per model between idle and 1.2x its peak, some nodes down), each on a fresh etcd and
scheduler (a new leader's autoscaler starts from nothing, as the simulated round does)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import yaml
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.scheduler.placement import place
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.sim.records import Gpu, model_specs, node_statuses, router_demand
from meshserve.scheduler.sim.scenario import load_scenario
from meshserve.scheduler.snapshot import round_snapshot
from meshserve.v1 import cluster_pb2 as S

from tests.waiting import eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def seeded_state(seed: int) -> tuple[list[S.ModelSpec], list[S.NodeStatus], S.RouterDemand]:
    sc = load_scenario(yaml.safe_load((ROOT / "bench/scenarios/nine-models.yaml").read_text()))
    rng = random.Random(seed)
    nodes = {f"n{i}": [f"n{i}-g{j}" for j in range(4)] for i in range(4)}
    g = sc.groups[0]
    gpus = {
        d: Gpu(n, g.memory_bytes, g.gpu_type, g.cost_per_hour, g.throughput_tokens_per_s)
        for n, ids in nodes.items()
        for d in ids
    }
    down = set(rng.sample(sorted(nodes), rng.randint(0, 1)))
    specs = model_specs(sc, g.memory_bytes, g.throughput_tokens_per_s, len(nodes))
    rates = {m.name: m.peak_rps * rng.choice([0.0, rng.uniform(0.05, 1.2)]) for m in sc.models}
    now = time.time()
    last = {name: now for name, rate in rates.items() if rate}
    (demand,) = router_demand(rates, {}, last, {})
    return specs, node_statuses(nodes, gpus, down, {}), demand


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_simulated_round_places_as_the_scheduler_does(tmp_path: Path, seed: int) -> None:
    specs, nodes, demand = seeded_state(seed)
    snap, _scale, _placed = round_snapshot(specs, nodes, [], [], [demand], {}, time.time())
    plan = place(snap, Profile())
    want = {(m, n, tuple(d)) for (m, n), d in plan.devices.items()}
    assert want, "the simulated round placed nothing: the state is not a test"
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    client = None
    try:
        mesh.start_etcd()
        client = connect(EtcdConfig(mesh.etcd.endpoint))
        store = Store(client, Keyspace())
        for spec in specs:
            await store.put(store.keys.model(spec.name), spec)
        for node in nodes:
            await store.put(store.keys.node(node.node_id), node)
        await store.put(store.keys.demand(demand.router_id), demand)
        mesh.start_scheduler()

        async def written() -> set[tuple[str, str, tuple[str, ...]]] | None:
            records, _rev = await store.list(store.keys.placements(), S.Placement)
            got = {(e.value.model, e.value.node_id, tuple(e.value.devices)) for e in records}
            return got if len(got) >= len(want) else None

        got = await eventually(written, 30, f"{len(want)} placements written")
        assert got == want
    finally:
        if client is not None:
            await client.close()
        mesh.stop()
