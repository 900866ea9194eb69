"""SLO-aware autoscaling (Profile.slo_quantile): the fewest replicas at which the queue law
predicts the TTFT quantile within the SLO on the model's busiest device, beside that device's
other load as the agents measure it (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from meshserve.scheduler.autoscale import (
    SLO_SEARCH,
    Load,
    ScalePolicy,
    ScaleState,
    recommend,
    step,
)
from meshserve.scheduler.latency import QueueLaw
from meshserve.scheduler.pressure import pressures
from meshserve.scheduler.profile import load_profile
from meshserve.v1 import cluster_pb2

CAP = 15_000.0  # tokens/s a device decodes
SLO = ScalePolicy(target_rps=10, slo_ttft_s=1.0, slo_quantile=0.99, max_replicas=8)
LAW = QueueLaw()


def busy(tokens: float, others: float = 0.0, gang: int = 1) -> Load:
    return Load(
        rate=1.0,
        in_flight=1,
        tokens_per_s=tokens,
        others_tokens_per_s=others,
        capacity_tokens_per_s=CAP,
        devices_per_replica=gang,
    )


def predicted_p99(policy: ScalePolicy, load: Load, k: int) -> float:
    grow = 1 + policy.slo_headroom
    u = grow * (load.others_tokens_per_s + load.tokens_per_s / load.devices_per_replica / k)
    return LAW.quantile(u / CAP, 0.99)


def test_the_law_s_quantile_and_late_share_agree_and_saturation_is_never_in_time() -> None:
    for u in (0.8, 0.9, 0.95):
        p99 = LAW.quantile(u, 0.99)
        assert p99 > LAW.base_ttft_s and LAW.late(u, p99) == pytest.approx(0.01, rel=1e-6)
    assert LAW.quantile(0.3, 0.99) == LAW.base_ttft_s  # under 1 % wait at all
    assert LAW.quantile(0.999, 0.99) == float("inf") and LAW.late(1.2, 5.0) == 1.0
    assert LAW.quantile(0.5, 0.99) < LAW.quantile(0.9, 0.99)


def test_the_fewest_replicas_whose_predicted_p99_meets_the_slo() -> None:
    load = busy(tokens=40_000)  # 2.7 devices' worth
    n = recommend(SLO, load, 3, now=0)
    assert predicted_p99(SLO, load, n) <= 1.0 < predicted_p99(SLO, load, n - 1)
    # The rate threshold alone (1 request/s at 10 a replica) would ask for one replica.
    assert recommend(ScalePolicy(target_rps=10, slo_ttft_s=1.0), load, 3, now=0) == 1
    # Another model's load on the busiest device needs more replicas of this one.
    crowded = busy(tokens=40_000, others=6_000)
    assert recommend(SLO, crowded, 3, now=0) > n


def test_scale_down_stops_where_fewer_replicas_would_miss_the_slo() -> None:
    load = busy(tokens=13_500)  # one replica: its device at 90 % (99 % with 10 % headroom)
    assert predicted_p99(SLO, load, 1) > 1.0
    state = ScaleState(3, changed_at=0.0)
    for t in range(0, 3600, 60):  # an hour of the same load: down to 2, never 1
        state = step(SLO, load, state, float(t))
    assert state.replicas == 2
    # Without the prediction, the rate threshold (1 request/s) takes it down to 1.
    rate_only = ScalePolicy(target_rps=10, slo_ttft_s=1.0, max_replicas=8)
    state = ScaleState(3, changed_at=0.0)
    for t in range(0, 3600, 60):
        state = step(rate_only, load, state, float(t))
    assert state.replicas == 1


def test_no_prediction_without_an_slo_a_measured_capacity_or_a_replica() -> None:
    many = Load(rate=35.0, in_flight=1, tokens_per_s=1_000.0)  # no capacity reported
    assert recommend(SLO, many, 2, now=0) == 4  # the rate threshold: 35 / 10
    assert recommend(ScalePolicy(target_rps=10, slo_quantile=0.99), busy(40_000), 2, now=0) == 1
    assert recommend(SLO, Load(rate=35.0, queued=1), 0, now=0) == 4  # cold: rate until measured
    # A load needing far more replicas than now: as many as one prediction looks at, never the
    # rate threshold's answer (which would scale it down into a miss).
    huge = busy(tokens=250_000)
    assert recommend(replace(SLO, max_replicas=100), huge, 2, now=0) == 2 + SLO_SEARCH
    # A device whose other load alone misses the SLO: no replica of this model would cure it
    # (a light model beside a saturating one once asked for max_replicas): the rate decides.
    assert recommend(SLO, busy(tokens=1_000, others=15_000), 2, now=0) == 1


def node(node_id: str, devices: dict[str, float]) -> cluster_pb2.NodeStatus:
    return cluster_pb2.NodeStatus(
        node_id=node_id,
        throughput=[
            cluster_pb2.DeviceThroughput(
                device_id=d, decode_tokens_per_s=rate, capacity_tokens_per_s=CAP
            )
            for d, rate in devices.items()
        ],
    )


def test_pressure_reads_the_busiest_device_and_the_other_models_on_it() -> None:
    nodes = [node("a", {"g0": 9_000, "g1": 2_000}), node("b", {"g0": 2_000, "g1": 5_000})]
    placements = [
        cluster_pb2.Placement(model="m", node_id="a", devices=["g0"]),
        cluster_pb2.Placement(model="m", node_id="b", devices=["g1"]),
        cluster_pb2.Placement(model="big", node_id="b", devices=["g0", "g1"]),
        cluster_pb2.Placement(model="m", node_id="c", tier=cluster_pb2.TIER_HOST),
    ]
    replicas = [
        cluster_pb2.ReplicaStatus(model="m", node_id="a", decode_tokens_per_s=3_000),
        cluster_pb2.ReplicaStatus(model="m", node_id="b", decode_tokens_per_s=2_000),
        cluster_pb2.ReplicaStatus(model="big", node_id="b", decode_tokens_per_s=4_000),
    ]
    p = pressures(nodes, placements, replicas)
    # m's busiest device is a/g0 (60 %): 3,000 of its 9,000 are m's own.
    assert (p["m"].tokens_per_s, p["m"].others_tokens_per_s) == (5_000, 6_000)
    assert p["m"].capacity_tokens_per_s == CAP and p["m"].devices_per_replica == 1
    # big spans two devices, 2,000 a device; its busiest, b/g1 (5,000), also carries m's 2,000
    # and 1,000 of a model placed nowhere the records say.
    assert p["big"].devices_per_replica == 2 and p["big"].tokens_per_s == 4_000
    assert p["big"].others_tokens_per_s == 3_000


def test_the_profile_reads_the_slo_quantile_and_the_law() -> None:
    p = load_profile({"slo_quantile": 0.95, "latency": {"slots": 32, "base_ttft_s": 0.3}})
    assert p.slo_quantile == 0.95 and p.latency == QueueLaw(32, 0.3)
    assert load_profile({"slo_quantile": 0}).slo_quantile == 0
    for bad in ({"slo_quantile": 1.0}, {"latency": {"slot": 3}}, {"latency": {"slots": 0}}):
        with pytest.raises(ValueError, match=r"slo_quantile|latency"):
            load_profile(bad)
