"""A replica its routers cannot reach (their breakers for it are open: a partition between them,
while the agent keeps its lease) is wanted once more elsewhere; the placement keeps it (the link
may heal) and adds one on another node (scheduler/snapshot.py `unreachable`)."""

from __future__ import annotations

from meshserve.scheduler.placement import place
from meshserve.scheduler.snapshot import build_snapshot, unreachable
from meshserve.v1 import cluster_pb2 as S

from tests.factories import spec

GIB = 2**30


def status(node: str) -> S.NodeStatus:
    return S.NodeStatus(node_id=node, address=f"{node}:1", capacity_bytes=8 * GIB)


def replica(node: str) -> S.ReplicaStatus:
    return S.ReplicaStatus(
        model="m", node_id=node, address=f"{node}:1", state=S.REPLICA_STATE_READY
    )


def demand(breaker_state: str) -> S.RouterDemand:
    d = S.RouterDemand(router_id="r0")
    d.breakers.add(address="a:1", model="m", state=breaker_state)
    return d


def plan_for(breaker_state: str) -> dict[str, frozenset[str]]:
    m = spec("m", memory_bytes=GIB, min_replicas=1)
    placed = [S.Placement(model="m", node_id="a", tier=S.TIER_DEVICE)]
    snap = build_snapshot(
        [m], [status("a"), status("b")], [replica("a")], placed, {}, {},
        demands=[demand(breaker_state)],
    )  # fmt: skip
    return dict(place(snap).assignments)


def test_an_unreachable_replica_gets_a_second_one_elsewhere_and_is_kept() -> None:
    # half-open: not proven back until a probe succeeds (dropping the surplus then would flap)
    for state in ("open", "half_open"):
        assert unreachable([demand(state)], [replica("a")]) == {"m": 1}
        assert plan_for(state) == {"a": frozenset({"m"}), "b": frozenset({"m"})}


def test_a_reachable_replica_is_enough() -> None:
    assert unreachable([demand("closed")], [replica("a")]) == {}
    assert plan_for("closed") == {"a": frozenset({"m"})}
