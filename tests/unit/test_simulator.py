"""The simulator runs the real autoscaler and placement over the reference scenario (virtual
time, seeded): shared serving needs fewer GPUs than one model per GPU and keeps the SLO."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from meshserve.scheduler.sim.scenario import SHAPES, load_scenario
from meshserve.scheduler.sim.simulator import simulate

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "bench" / "scenarios" / "nine-models.yaml"
# The seed as the steering repo gave it, copied verbatim (the suite needs nothing outside the repo).
SEED = ROOT / "bench" / "scenarios" / "seeds" / "nine-models.yaml"


@pytest.fixture(scope="module")
def scenario():  # type: ignore[no-untyped-def]
    return load_scenario(yaml.safe_load(SCENARIO.read_text()), "nine-models")


def test_the_reference_scenario_is_the_seeds_plus_three_modelled_tools(scenario) -> None:  # type: ignore[no-untyped-def]
    assert len(scenario.models) == 9
    ours = {m.name: m for m in scenario.models}
    for m in yaml.safe_load(SEED.read_text())["models"]:  # every seed figure kept as it is
        assert ours[m["name"]].memory_bytes == int(float(m["memory_gb"]) * 10**9)
        assert ours[m["name"]].peak_rps == m["peak_rps"]
        assert ours[m["name"]].min_replicas == m["min_replicas"]


def test_shared_serving_beats_one_model_per_gpu(scenario) -> None:  # type: ignore[no-untyped-def]
    dedicated = simulate(scenario, "dedicated", hours=24, seed=0)
    shared = simulate(scenario, "meshserve", hours=24, seed=0)
    assert dedicated.gpus_peak == 11  # codestral's 44 GB needs two 40 GB GPUs
    assert shared.gpus_peak < dedicated.gpus_peak
    assert shared.gpus_mean < 0.6 * dedicated.gpus_mean
    assert shared.memory_utilization > 1.5 * dedicated.memory_utilization
    assert shared.slo_miss_rate < 0.01
    assert shared.requests == pytest.approx(dedicated.requests)
    assert shared.unplaced_rounds == 0  # the node failure at 15:30 is absorbed


def test_runs_are_deterministic_per_seed(scenario) -> None:  # type: ignore[no-untyped-def]
    a = simulate(scenario, "meshserve", hours=6, seed=3)
    b = simulate(scenario, "meshserve", hours=6, seed=3)
    assert (a.gpu_hours, a.slo_misses, a.loads) == (b.gpu_hours, b.slo_misses, b.loads)


def test_idle_office_tools_scale_to_zero_overnight(scenario) -> None:  # type: ignore[no-untyped-def]
    night = simulate(scenario, "meshserve", hours=5, seed=0)  # 00:00-05:00
    day = simulate(scenario, "meshserve", hours=13, seed=0)  # through the morning peak
    assert max(g for _h, g in night.timeline) < max(g for _h, g in day.timeline)
    assert SHAPES["office"](3.0) == 0.0 and SHAPES["office"](12.0) == 1.0


def test_the_market_day_has_the_published_shape_and_is_regenerated_exactly() -> None:
    """market-day.yaml is what its generator makes (seeded), and its popularity is the shape of
    Aegaeon's trace: the 94 % least used models get 1.35 % of the requests."""
    from bench.economics import WORKLOADS, market_day

    doc = market_day()
    doc.pop("generated")
    assert yaml.safe_load(WORKLOADS["market"].read_text()) == doc
    rates = sorted((m["peak_rps"] for m in doc["models"]), reverse=True)
    assert len(rates) == 200
    assert sum(rates[12:]) / sum(rates) == pytest.approx(0.0135, abs=5e-4)


def test_a_flash_crowd_multiplies_the_rate_for_twenty_minutes_and_dedicated_sizes_for_it() -> None:
    from meshserve.scheduler.sim.scenario import SimModel
    from meshserve.scheduler.sim.simulator import dedicated_replicas

    m = SimModel("m", 16 * 10**9, 0, 2.0, 1000, "constant", bursts=(10.0,), burst_x=10.0)
    calm = SimModel("m", 16 * 10**9, 0, 2.0, 1000, "constant")
    assert m.rate(10.1) == pytest.approx(10 * calm.rate(10.1))
    assert m.rate(10.4) == pytest.approx(calm.rate(10.4))  # over after 20 minutes
    model = {"name": "m", "memory_gb": 16, "peak_rps": 2.0, "tokens_per_request": 1000}
    gpu = {"throughput_tokens_per_s": 10000}
    sc = load_scenario({"gpu": gpu, "models": [{**model, "bursts": [10.0], "burst_x": 10.0}]})
    assert dedicated_replicas(calm, sc, 34 * 10**9) == 1
    # The burst's peak (20 x 1,000 tokens/s at most) needs ceil(20,000 / 9,000) = 3 GPUs.
    assert dedicated_replicas(sc.models[0], sc, 34 * 10**9) == 3


def test_loads_count_the_bytes_they_move(scenario) -> None:  # type: ignore[no-untyped-def]
    r = simulate(scenario, "meshserve", hours=12, seed=0)  # through the office tools' loads
    sizes = {m.name: m.memory_bytes for m in scenario.models}
    assert r.loads > 0 and min(sizes.values()) * r.loads <= r.bytes_moved
    assert r.bytes_moved <= max(sizes.values()) * r.loads


def test_background_repack_recovers_what_incremental_rounds_leave_fragmented(scenario) -> None:  # type: ignore[no-untyped-def]
    """The nine-model day through the scheduler's own round: without re-pack, the evening's
    scale-downs leave more GPUs in use than a full re-plan of the same demand would take; the
    default profile's re-pack gives most of that back, in GPU-hours too."""
    from meshserve.scheduler.profile import Profile

    off = simulate(
        scenario, "meshserve", hours=24, seed=0, profile=Profile(repack_moves_per_minute=0)
    )
    on = simulate(scenario, "meshserve", hours=24, seed=0, profile=Profile())
    assert len(off.replan_samples) == 96  # every 15 simulated minutes
    assert off.fragmentation_gpus > 0.15 and off.repack_moves == 0
    assert 0 < on.repack_moves <= 24 * 60 * 2  # within the budget of 2 a minute
    assert on.fragmentation_gpus < 0.5 * off.fragmentation_gpus
    assert on.gpu_hours < off.gpu_hours


def test_the_day_starts_from_a_fleet_already_loaded_as_the_dedicated_one_does(scenario) -> None:  # type: ignore[no-untyped-def]
    # Two hours of warm-up run uncounted: the first requests of the day do not wait for the
    # first loads from the source (a dedicated fleet starts loaded), and the day's traffic is
    # the same draw either way.
    warm = simulate(scenario, hours=1)
    cold = simulate(scenario, hours=1, warmup_h=0)
    assert cold.cold_start_misses > 0 and cold.loads > 0
    assert warm.cold_start_misses == 0
    assert warm.requests == pytest.approx(cold.requests, rel=0.01)


def test_the_router_sends_less_to_a_replica_whose_device_serves_other_models_too() -> None:
    """Least-loaded routing, as the simulator models it: a model with one replica beside a busy
    neighbour and one alone sends the lone one more, so the shared device is not saturated by
    an even split (what made the market day's hottest model miss its SLO)."""
    from meshserve.scheduler.sim import serving
    from meshserve.scheduler.sim import simulator as sim
    from meshserve.scheduler.sim.records import SimReplica

    doc = yaml.safe_load(SCENARIO.read_text())
    doc["models"] = [
        {"name": "hot", "memory_gb": 8, "min_replicas": 2, "peak_rps": 1, "tokens_per_request": 1,
         "shape": "constant"},
        {"name": "busy", "memory_gb": 8, "min_replicas": 1, "peak_rps": 1, "tokens_per_request": 1,
         "shape": "constant"},
    ]  # fmt: skip
    sc = load_scenario(doc, "two")
    fleet = sim._Fleet(sc)
    a, b = "n0-g0", "n1-g0"
    ready = {
        "hot": [SimReplica("n0", (a,), 0.0), SimReplica("n1", (b,), 0.0)],
        "busy": [SimReplica("n0", (a,), 0.0)],
    }
    rates = {"hot": 10_000.0, "busy": 9_000.0}  # tokens/s: capacity is 15,000 a GPU
    load: dict[str, float] = {}
    serving.route(fleet.devices, {m.name: m for m in sc.models}, rates, ready, load)
    assert load[a] + load[b] == pytest.approx(19_000.0)  # nothing lost
    assert load[a] < 9_000 + 5_000 - 1_000  # an even split would put 14,000 (93 %) on a
    assert load[b] > 5_000 + 1_000


def test_a_rarely_used_model_gets_whole_requests_and_idles_out_between_them() -> None:
    """Sparse traffic is drawn as whole requests (Poisson): their mean is the rate, most steps of
    a model asked a few times an hour see none, so it is loaded for its requests (cold starts)
    and leaves the GPUs between them, as the router's measured rate would let it."""
    import random

    from meshserve.scheduler.sim.simulator import arrivals

    rng = random.Random(3)
    draws = [arrivals(1 / 900, 60.0, rng) for _ in range(20_000)]  # 4 an hour, 1-min steps
    assert all(d * 60 == round(d * 60) for d in draws)  # whole requests
    assert sum(draws) / len(draws) == pytest.approx(1 / 900, rel=0.1)
    assert sum(1 for d in draws if d == 0) > 0.9 * len(draws)
    assert arrivals(2.0, 60.0, rng) == 2.0  # busy models keep their rate
    doc = yaml.safe_load(SCENARIO.read_text())
    doc["models"] = [
        {"name": "rare", "memory_gb": 30, "min_replicas": 0, "peak_rps": 1 / 3600,
         "tokens_per_request": 64, "shape": "constant"},
        {"name": "busy", "memory_gb": 30, "min_replicas": 1, "peak_rps": 1,
         "tokens_per_request": 64, "shape": "constant"},
    ]  # fmt: skip
    doc.pop("failures", None)
    r = simulate(load_scenario(doc, "rare"), "meshserve", hours=24, seed=0)
    assert r.cold_starts >= 5  # loaded for its requests ...
    assert r.gpu_hours < 1.5 * 24  # ... not held all day on a GPU of its own beside the busy one


def test_a_cold_start_s_first_request_waits_for_the_whole_load() -> None:
    """The request that sets off a cold start waits for all of it (the scheduler loads on its
    arrival): a model too big to load within the SLO misses at least one request per cold start,
    not the sliver of the step a uniform spread would put before the replica is ready."""
    doc = yaml.safe_load(SCENARIO.read_text())
    doc["models"] = [
        {"name": "rare", "memory_gb": 30, "min_replicas": 0, "peak_rps": 1 / 3600,
         "tokens_per_request": 64, "shape": "constant"},
    ]  # fmt: skip
    doc.pop("failures", None)
    r = simulate(load_scenario(doc, "rare"), "meshserve", hours=24, seed=0)
    assert r.cold_starts >= 5
    assert r.cold_start_misses >= 0.99 * r.cold_starts  # 34.5 GB: over a second even from RAM
