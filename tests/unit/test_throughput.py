"""Measured decode throughput: the agent's meter (throughput.py) and how the scheduler reads what
agents publish (snapshot.node_view, device_busy, ModelView.tokens_per_s)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
from meshserve.nodeagent.throughput import TAU_S, DeviceRate, Sample, Throughput, moved
from meshserve.scheduler.snapshot import build_snapshot, device_busy, node_view
from meshserve.scheduler.state import PlanState
from meshserve.v1 import cluster_pb2 as S


def feed(
    meter: Throughput,
    rates: dict[str, float],
    seconds: int,
    devices: Mapping[str, tuple[str, ...]] | None = None,
    saturated: frozenset[str] | set[str] = frozenset(),
) -> float:
    """``rates`` tokens/s per model for ``seconds`` one-second samples; returns the end time."""
    totals = dict.fromkeys(rates, 0)
    devices = devices or {}
    t0 = 0.0
    for i in range(seconds + 1):
        meter.observe(
            t0 + i,
            [Sample(m, devices.get(m, ()), totals[m], m in saturated) for m in rates],
        )
        for m, r in rates.items():
            totals[m] += int(r)
    return t0 + seconds


def device(meter: Throughput, device_id: str) -> DeviceRate:
    return next(d for d in meter.devices() if d.device_id == device_id)


def test_steady_rate_converges_and_capacity_stays_configured_until_saturated() -> None:
    meter = Throughput(configured=500.0)
    feed(meter, {"a": 100.0}, 60, devices={"a": ("GPU-1",)})
    assert meter.replica_rate("a") == pytest.approx(100.0, rel=0.01)
    d = device(meter, "GPU-1")
    assert d.tokens_per_s == pytest.approx(100.0, rel=0.01)
    assert (d.capacity_tokens_per_s, d.measured) == (500.0, False)


def test_saturated_samples_measure_capacity_over_the_configured_figure() -> None:
    meter = Throughput(configured=500.0)
    feed(meter, {"a": 240.0}, 30, devices={"a": ("GPU-1",)}, saturated={"a"})
    d = device(meter, "GPU-1")
    assert d.measured
    assert d.capacity_tokens_per_s == pytest.approx(240.0, rel=0.01)


def test_unknown_capacity_stays_unknown_without_saturation() -> None:
    meter = Throughput()
    feed(meter, {"a": 50.0}, 20)
    d = device(meter, "")  # a CPU node's one device
    assert d.tokens_per_s == pytest.approx(50.0, rel=0.02)
    assert (d.capacity_tokens_per_s, d.measured) == (0.0, False)


def test_a_rate_above_the_estimate_raises_it() -> None:
    meter = Throughput(configured=100.0)
    feed(meter, {"a": 300.0}, 60)
    assert device(meter, "").capacity_tokens_per_s == pytest.approx(300.0, rel=0.01)


def test_devices_sum_their_replicas_and_a_gang_splits_evenly() -> None:
    meter = Throughput()
    devices = {"a": ("GPU-1",), "b": ("GPU-1",), "gang": ("GPU-5", "GPU-6")}
    feed(meter, {"a": 100.0, "b": 50.0, "gang": 200.0}, 60, devices=devices)
    assert device(meter, "GPU-1").tokens_per_s == pytest.approx(150.0, rel=0.01)
    assert device(meter, "GPU-5").tokens_per_s == pytest.approx(100.0, rel=0.01)
    assert device(meter, "GPU-6").tokens_per_s == pytest.approx(100.0, rel=0.01)


def test_the_average_decays_with_its_time_constant_and_reaches_zero() -> None:
    meter = Throughput()
    end = feed(meter, {"a": 100.0}, 60)
    # Traffic stops: the counter no longer moves.
    for i in range(1, 11):
        meter.observe(end + i, [Sample("a", (), 6000, False)])
    assert meter.replica_rate("a") == pytest.approx(100.0 * math.exp(-10 / TAU_S), rel=0.02)
    for i in range(11, 200):
        meter.observe(end + i, [Sample("a", (), 6000, False)])
    assert meter.replica_rate("a") == 0.0
    assert device(meter, "").tokens_per_s == 0.0


def test_a_reloaded_engine_restarts_its_count_without_a_negative_rate() -> None:
    meter = Throughput()
    feed(meter, {"a": 100.0}, 10)
    meter.observe(11, [Sample("a", (), 5, False)])  # a new engine: the counter starts again
    meter.observe(12, [Sample("a", (), 105, False)])
    assert meter.replica_rate("a") == pytest.approx(100.0, rel=0.01)


def test_a_replica_that_stops_serving_is_forgotten() -> None:
    meter = Throughput()
    feed(meter, {"a": 100.0}, 10)
    meter.observe(11, [])
    assert meter.replica_rate("a") == 0.0


@pytest.mark.parametrize(
    ("old", "new", "due"),
    [(0.0, 0.0, False), (0.0, 0.5, True), (0.4, 0.0, True), (100.0, 110.0, False),
     (100.0, 130.0, True), (2.0, 2.9, False), (100.0, 70.0, True)],
)  # fmt: skip
def test_moved_is_the_publishing_hysteresis(old: float, new: float, due: bool) -> None:
    assert moved(old, new) is due


# --- the scheduler's side -------------------------------------------------------------------


def gpu_node(util: float = 0.0) -> S.NodeStatus:
    return S.NodeStatus(
        node_id="n1",
        capacity_bytes=2 * 80 << 30,
        gpus=[
            S.GpuDevice(uuid="GPU-1", name="H100", memory_total_bytes=80 << 30, utilization=util),
            S.GpuDevice(uuid="GPU-2", name="H100", memory_total_bytes=80 << 30),
        ],
        throughput=[
            S.DeviceThroughput(
                device_id="GPU-1", decode_tokens_per_s=900, capacity_tokens_per_s=1000
            )
        ],
    )


def cpu_node() -> S.NodeStatus:
    return S.NodeStatus(
        node_id="c1",
        capacity_bytes=8 << 30,
        throughput=[S.DeviceThroughput(decode_tokens_per_s=40, capacity_tokens_per_s=50)],
    )


def test_node_view_gives_each_device_its_published_capacity() -> None:
    gpu = node_view(gpu_node())
    assert [(d.device_id, d.throughput_tokens_per_s) for d in gpu.devices] == [
        ("GPU-1", 1000.0),
        ("GPU-2", 0.0),
    ]
    cpu = node_view(cpu_node())
    assert [(d.device_id, d.capacity_bytes, d.throughput_tokens_per_s) for d in cpu.devices] == [
        ("", 8 << 30, 50.0)
    ]
    assert node_view(S.NodeStatus(node_id="c2", capacity_bytes=1 << 30)).devices == ()


def test_device_busy_takes_the_measured_rate_over_capacity_where_nvml_says_less() -> None:
    placements = [
        S.Placement(model="a", node_id="n1", devices=["GPU-1"]),
        S.Placement(model="b", node_id="n1", devices=["GPU-2"]),
        S.Placement(model="c", node_id="c1"),
    ]
    busy = device_busy([gpu_node(util=0.3), cpu_node()], placements)
    assert busy == {"a": pytest.approx(0.9), "b": 0.0, "c": pytest.approx(0.8)}


def test_the_snapshot_sums_measured_rates_and_the_compute_check_uses_them() -> None:
    spec = S.ModelSpec(name="m", memory_bytes=1 << 30, min_replicas=1)
    replicas = [
        S.ReplicaStatus(model="m", node_id="c1", decode_tokens_per_s=30.0),
        S.ReplicaStatus(model="m", node_id="c2", decode_tokens_per_s=15.0),
    ]
    nodes = [cpu_node()]
    snap = build_snapshot([spec], nodes, replicas, [], {}, {})
    (m,) = snap.models
    assert m.tokens_per_s == 45.0
    st = PlanState(snap, "binpack", compute_target=0.8)
    # one wanted replica expects all 45 tokens/s; the device does 50 at full load: 45 > 40
    assert not st.compute_ok(m, 0)
    st2 = PlanState(build_snapshot([spec], nodes, replicas[1:], [], {}, {}), "binpack", 0.8)
    assert st2.compute_ok(st2.models["m"], 0)  # 15 <= 40


def test_measured_memory_raises_a_model_s_need_but_never_counts_kv_twice() -> None:
    """An engine that holds its whole grant (vLLM on a GPU, sim) reports weights + KV: the need
    stays the estimate. One that measured more than estimated (after an OOM) needs more."""
    spec = S.ModelSpec(name="m", memory_bytes=1000, kv_headroom_bytes=500)
    nodes = [cpu_node()]
    estimate = build_snapshot([spec], nodes, [], [], {}, {}).models[0].need_bytes
    whole_grant = [S.ReplicaStatus(model="m", node_id="c1", memory_bytes=1500)]
    assert build_snapshot([spec], nodes, whole_grant, [], {}, {}).models[0].need_bytes == estimate
    weights_only = [S.ReplicaStatus(model="m", node_id="c1", memory_bytes=900)]
    assert build_snapshot([spec], nodes, weights_only, [], {}, {}).models[0].need_bytes == estimate
    grew = [S.ReplicaStatus(model="m", node_id="c1", memory_bytes=3000)]
    assert build_snapshot([spec], nodes, grew, [], {}, {}).models[0].need_bytes > estimate
