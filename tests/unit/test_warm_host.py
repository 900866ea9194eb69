"""`warm_in: host`: a model's minimum may wait asleep in CPU RAM while it is idle (the spec, the
scheduler's round through `round_snapshot` and `place`, and the simulator's accounting)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from meshserve.modelspec import spec_from_dict
from meshserve.scheduler.autoscale import ScaleState
from meshserve.scheduler.placement import place
from meshserve.scheduler.sim.scenario import Scenario, load_scenario
from meshserve.scheduler.sim.simulator import simulate
from meshserve.scheduler.snapshot import round_snapshot
from meshserve.scheduler.views import HOST, Plan
from meshserve.v1 import cluster_pb2 as S

from tests.factories import spec

GIB = 2**30
NOW = 10_000.0


def node(name: str, host_gib: float = 64, gpus: int = 1) -> S.NodeStatus:
    return S.NodeStatus(
        node_id=name,
        capacity_bytes=40 * GIB * gpus,
        host_capacity_bytes=int(host_gib * GIB),
        gpus=[
            S.GpuDevice(uuid=f"{name}-g{i}", name="A100", memory_total_bytes=40 * GIB)
            for i in range(gpus)
        ],
    )


def on_device(model: str, at: str, gpu: int = 0) -> S.Placement:
    return S.Placement(model=model, node_id=at, tier=S.TIER_DEVICE, devices=[f"{at}-g{gpu}"])


def asleep(model: str, at: str) -> S.Placement:
    return S.Placement(model=model, node_id=at, tier=S.TIER_HOST)


def idle_round(
    specs: list[S.ModelSpec], nodes: list[S.NodeStatus], placements: list[S.Placement]
) -> Plan:
    """A round long after the models' last requests (their idle timeouts passed), with the
    autoscaler's state where the models were placed."""
    demand = S.RouterDemand(router_id="r")
    for s in specs:
        demand.models.add(model=s.name, last_request_unix_ms=int((NOW - 3600) * 1000))
    placed = {p.model for p in placements if p.tier == S.TIER_DEVICE}
    scale = {s.name: ScaleState(1 if s.name in placed else 0, NOW - 3600) for s in specs}
    snap, _state, _ = round_snapshot(specs, nodes, [], placements, [demand], scale, NOW)
    return place(snap)


def warm(name: str, gib: float = 10) -> S.ModelSpec:
    return spec(name, memory_bytes=int(gib * GIB), min_replicas=1, warm_in="host")


def test_the_spec_takes_device_or_host_and_says_what_else_is_wrong() -> None:
    doc = {"name": "m", "source": "/m", "memory": "1GiB", "min_replicas": 1}
    assert spec_from_dict({**doc, "warm_in": "host"}).warm_in == "host"
    assert spec_from_dict(doc).warm_in == ""
    with pytest.raises(ValueError, match=r"warm_in: device .* or host"):
        spec_from_dict({**doc, "warm_in": "ram"})
    adapter = {"name": "a", "source": "/a", "kind": "adapter", "base": "m", "warm_in": "host"}
    with pytest.raises(ValueError, match="warm_in"):
        spec_from_dict(adapter)


def test_an_idle_warm_model_leaves_its_gpu_for_cpu_ram_and_a_device_minimum_stays() -> None:
    plain = spec("plain", memory_bytes=10 * GIB, min_replicas=1)
    # (each on a GPU of its own)
    two = [node("a", gpus=2)]
    plan = idle_round([warm("w"), plain], two, [on_device("w", "a", 1), on_device("plain", "a")])
    assert plan.assignments == {"a": frozenset({"plain"})}
    assert plan.offloads == {"a": {"w": HOST}}


def test_a_warm_model_asleep_stays_asleep_and_is_not_loaded_again() -> None:
    plan = idle_round([warm("w")], [node("a")], [asleep("w", "a")])
    assert plan.assignments == {}
    assert plan.offloads == {"a": {"w": HOST}}


def test_a_warm_model_with_no_copy_on_a_live_node_is_loaded_on_a_device() -> None:
    # never loaded yet: its minimum is met on a device first (it sleeps once idle)
    assert idle_round([warm("w")], [node("a")], []).assignments == {"a": frozenset({"w"})}
    # its only copy slept on a node that is gone: loaded again on one that lives
    plan = idle_round([warm("w")], [node("b")], [asleep("w", "a")])
    assert plan.assignments == {"b": frozenset({"w"})}


def test_warm_minimums_claim_cpu_ram_before_models_without_one() -> None:
    # 12 GiB of CPU RAM: one of the two idle 10 GiB models fits. Without warm_in the first by
    # name keeps it; the warm minimum takes it from the other whatever the names.
    plain = spec("a-plain", memory_bytes=10 * GIB, min_replicas=0)
    nodes = [node("a", host_gib=12)]
    both = [on_device("a-plain", "a"), on_device("z-warm", "a")]
    plan = idle_round([plain, warm("z-warm")], nodes, both)
    assert plan.offloads == {"a": {"z-warm": HOST}}
    assert plan.assignments == {}


def _day() -> Scenario:
    """A model with a minimum of 1 and traffic only in office hours, too large to share a GPU
    with the other, busy all day; an SLO its restore from CPU RAM meets (28 GB at PCIe speed and
    the warm-up: 1.4 s)."""
    return load_scenario(
        {
            "gpu": {"type": "A100-40GB", "memory_gb": 40, "throughput_tokens_per_s": 15000},
            "fleet": {"nodes": 2, "gpus_per_node": 2},
            "slo_ttft_s": 2.0,
            "models": [
                {
                    "name": "office",
                    "memory_gb": 28,
                    "min_replicas": 1,
                    "peak_rps": 2,
                    "tokens_per_request": 256,
                    "shape": "office",
                },
                {
                    "name": "always",
                    "memory_gb": 16,
                    "min_replicas": 1,
                    "peak_rps": 5,
                    "tokens_per_request": 256,
                    "shape": "constant",
                },
            ],
        },
        "office",
    )


def test_the_simulator_frees_the_night_and_charges_the_restore_to_the_first_requests() -> None:
    day = _day()
    host = replace(day, models=tuple(replace(m, warm_in="host") for m in day.models))
    kept, slept = simulate(day, hours=24), simulate(host, hours=24)
    # Overnight the office model sleeps in CPU RAM, and its GPU is free
    assert slept.gpu_hours < kept.gpu_hours - 10, (slept.gpu_hours, kept.gpu_hours)
    # ... and restored each morning, within the SLO: no request of it misses (the misses of both
    # runs are the first load at midnight, from the source)
    assert slept.cold_starts > kept.cold_starts and slept.cold_start_requests > 0
    assert slept.misses_by_model.get("office", 0.0) < 1e-6
    assert slept.cold_start_misses == pytest.approx(kept.cold_start_misses)
