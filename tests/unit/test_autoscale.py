"""Autoscaling from demand: recommendations, hysteresis, cooldowns, scale to zero (pure)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshserve.scheduler.autoscale import (
    UP_COOLDOWN_S,
    Load,
    ScalePolicy,
    ScaleState,
    merge,
    recommend,
    step,
)
from meshserve.scheduler.snapshot import autoscale, loads
from meshserve.v1 import cluster_pb2

POLICY = ScalePolicy(
    min_replicas=0, max_replicas=4, target_rps=10, idle_timeout_s=60, scale_down_delay_s=30
)


def test_recommendation_from_rate_concurrency_and_slo() -> None:
    assert recommend(POLICY, Load(rate=25, last_request=99), 1, now=100) == 3
    assert recommend(POLICY, Load(rate=500, last_request=99), 1, now=100) == 4  # max_replicas
    assert recommend(POLICY, Load(), 0, now=100) == 0  # never used: nothing
    assert recommend(POLICY, Load(queued=1), 0, now=100) == 1  # a cold start waiting
    with_concurrency = ScalePolicy(target_in_flight=8)
    assert recommend(with_concurrency, Load(in_flight=17), 1, now=0) == 3
    slo = ScalePolicy(slo_ttft_s=0.5, max_replicas=5)
    assert recommend(slo, Load(in_flight=1, ttft_p99_s=0.9), 2, now=0) == 3  # SLO missed: +1
    assert recommend(ScalePolicy(min_replicas=2), Load(), 0, now=0) == 2
    hot = Load(in_flight=3, gpu_utilization=0.99)
    assert recommend(ScalePolicy(max_replicas=5), hot, 2, now=0) == 3  # saturated GPU: +1
    assert recommend(ScalePolicy(max_replicas=5, busy_gpu=0), hot, 2, now=0) == 1


def run(loads_by_second: list[Load]) -> list[int]:
    state: ScaleState | None = None
    out = []
    for t, load in enumerate(loads_by_second):
        state = step(POLICY, load, state, float(t))
        out.append(state.replicas)
    return out


def test_scales_up_one_step_per_cooldown_and_down_only_after_the_window() -> None:
    busy = [Load(rate=35, last_request=t) for t in range(40)]  # wants 4
    calm = [Load(rate=5, last_request=40 + t) for t in range(80)]  # wants 1
    replicas = run(busy + calm)
    assert replicas[0] == 4  # from zero straight to what is asked (cold start)
    assert replicas[39] == 4
    # The load drops at t=40: nothing changes for the 30 s stabilization window ...
    assert set(replicas[40:69]) == {4}
    # ... then it goes down to the window's highest recommendation, and stays there.
    assert replicas[75] == 1 and replicas[-1] == 1


def test_a_burst_adds_replicas_one_cooldown_at_a_time() -> None:
    low = [Load(rate=8, last_request=t) for t in range(5)]
    burst = [Load(rate=39, last_request=5 + t) for t in range(40)]
    replicas = run(low + burst)
    assert replicas[4] == 1
    ups = [t for t in range(1, len(replicas)) if replicas[t] > replicas[t - 1]]
    assert all(b - a >= UP_COOLDOWN_S for a, b in itertools.pairwise(ups))
    assert replicas[-1] == 4


def test_flapping_load_does_not_flap_replicas() -> None:
    flap = [Load(rate=25 if t % 4 < 2 else 5, last_request=t) for t in range(120)]
    replicas = run(flap)
    changes = sum(1 for a, b in itertools.pairwise(replicas) if a != b)
    assert changes <= 3


def test_scale_to_zero_after_the_idle_timeout_and_back_on_demand() -> None:
    t0 = 1000.0  # the last request
    state = step(POLICY, Load(rate=1, last_request=t0), None, t0)
    assert state.replicas == 1
    for t in range(1, 60):  # idle, but within the idle timeout: kept (window or not)
        state = step(POLICY, Load(last_request=t0), state, t0 + t)
        assert state.replicas == 1, t
    state = step(POLICY, Load(last_request=t0), state, t0 + 60)
    assert state.replicas == 0
    state = step(POLICY, Load(queued=1, last_request=t0), state, t0 + 61)
    assert state.replicas == 1  # the router's cold start brings it back at once


def test_demand_from_routers_is_merged_and_a_new_leader_keeps_what_is_placed() -> None:
    demand = [
        cluster_pb2.RouterDemand(
            router_id=r,
            models=[
                cluster_pb2.ModelDemand(
                    model="x", request_rate=6, in_flight=2, last_request_unix_ms=1000 * (90 + i)
                )
            ],
        )
        for i, r in enumerate(("r0", "r1"))
    ]
    merged = loads(demand, {"y": 95.0})
    assert merged["x"] == merge([Load(6, 2, 0, 90.0), Load(6, 2, 0, 91.0)])
    assert merged["x"].rate == 12 and merged["x"].last_request == 91.0
    assert merged["y"].last_request == 95.0  # EnsureModel counts as a request
    spec = cluster_pb2.ModelSpec(
        name="x", target_rps_per_replica=10, max_replicas=3, scale_down_delay_s=30
    )
    # A new leader (no state) with 3 replicas placed does not drop to 2 at once.
    states = autoscale([spec], merged, {}, {"x": 3}, now=100.0)
    assert states["x"].replicas == 3


def test_an_unloaded_model_wants_nothing_until_a_later_request() -> None:
    spec = cluster_pb2.ModelSpec(name="x", unloaded_unix_ms=100_000)  # unloaded at t = 100 s
    busy_before = {"x": Load(rate=5, in_flight=2, last_request=99.0)}
    states = autoscale([spec], busy_before, {}, {"x": 2}, now=101.0)
    assert states["x"].replicas == 0  # at once: not after the idle timeout or the window
    asked_after = {"x": Load(rate=1, in_flight=1, last_request=102.0)}
    states = autoscale([spec], asked_after, states, {}, now=102.0)
    assert states["x"].replicas == 1  # a request after the unload brings it back (cold start)


@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.floats(0, 60)), min_size=1, max_size=200))
def test_the_window_keeps_its_maximum_in_a_few_entries(steps: list[tuple[float, float]]) -> None:
    """However often rounds run, the stabilization window's highest recommendation equals the
    highest over every round in the last scale_down_delay_s, and the window stays short."""
    state: ScaleState | None = None
    history: list[tuple[float, int]] = []
    now = 0.0
    for dt, rate in steps:
        now += dt
        load = Load(rate=rate, last_request=now)
        rec = recommend(POLICY, load, state.replicas if state else 0, now)
        history.append((now, rec))
        state = step(POLICY, load, state, now)
        expected = max(r for t, r in history if now - t < POLICY.scale_down_delay_s)
        assert max(r for _t, r in state.window) == expected
        assert len(state.window) <= (POLICY.max_replicas or 0) + 1  # a decreasing run of values


def test_a_router_s_wake_adds_one_replica_at_once_within_max_replicas() -> None:
    """EnsureModel ``wake`` (a router judged an asleep replica faster than queueing): one more
    replica than was placed, without the up cooldown, never past max_replicas; merged by max."""
    policy = ScalePolicy(min_replicas=1, max_replicas=3, scale_down_delay_s=30)
    steady = ScaleState(1, changed_at=99.0)  # just changed: a plain +1 would wait the cooldown
    assert step(policy, Load(in_flight=1), steady, now=100.0).replicas == 1
    assert step(policy, Load(in_flight=1, wake_to=2), steady, now=100.0).replicas == 2
    assert recommend(policy, Load(wake_to=9), 1, now=0) == 3  # clamped
    assert merge([Load(wake_to=2), Load(wake_to=3)]).wake_to == 3
    demand = cluster_pb2.RouterDemand(router_id="r")
    assert loads([demand], {}, None, {"m": 2})["m"].wake_to == 2


def test_demand_averages_the_rate_over_about_an_hour_and_feeds_eviction_cost() -> None:
    """ScaleState.demand: an exponential average of the routers' rate (time constant 1 h), so a
    rarely used model, whose 10 s rate is 0 between its requests, keeps a demand that cost-aware
    eviction weighs it by (it tied with LRU before: every sparse model cost 0)."""
    import math

    from meshserve.scheduler.snapshot import round_snapshot

    policy = ScalePolicy(idle_timeout_s=60)
    state = step(policy, Load(rate=0.5, last_request=0.1), None, 0.0)
    assert state.demand == 0.5  # the first sample is all there is
    state = step(policy, Load(last_request=0.1), state, 3600.0)  # an hour without a request
    assert state.demand == pytest.approx(0.5 / math.e)
    spec = cluster_pb2.ModelSpec(name="m", memory_bytes=2**30)
    snap, _state, _ = round_snapshot([spec], [], [], [], [], {"m": state}, 3600.0)
    (view,) = snap.models
    assert view.request_rate == pytest.approx(0.5 / math.e)  # though the routers report 0 now
