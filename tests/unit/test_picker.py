"""Endpoint picking and outlier detection (pure)."""

from __future__ import annotations

from meshserve.router.core.table import build_table
from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.picker import AFFINITY_SLACK, rank, rendezvous
from meshserve.v1 import cluster_pb2

from tests.factories import spec

A, B, C = Endpoint("a", "h:1"), Endpoint("b", "h:2"), Endpoint("c", "h:3")


def test_least_outstanding_first() -> None:
    assert rank([A, B, C], {"h:1": 3, "h:2": 0, "h:3": 1}) == (B, C, A)


def test_engine_queue_from_other_routers_counts_as_load() -> None:
    busy_b = Endpoint("b", "h:2", waiting=6)  # other routers' streams queue in b's engine
    assert rank([A, busy_b], {"h:1": 2}) == (A, busy_b)


def test_nearly_full_kv_cache_goes_after_the_rest() -> None:
    full_a = Endpoint("a", "h:1", kv_cache_usage=0.95)
    assert rank([full_a, B], {"h:2": 5}) == (B, full_a)


def test_ejected_go_last_even_when_idle() -> None:
    assert rank([A, B], {"h:2": 5}, ejected={"h:1"}) == (B, A)


def test_ties_rotate_with_tiebreak() -> None:
    firsts = {rank([A, B, C], {}, tiebreak=t)[0].node_id for t in range(3)}
    assert firsts == {"a", "b", "c"}


def test_session_key_sticks_to_one_replica() -> None:
    preferred = rendezvous("user-42", [A, B, C])
    for t in range(5):
        assert rank([A, B, C], {}, session_key="user-42", tiebreak=t)[0] == preferred


def test_session_key_yields_when_its_replica_is_overloaded() -> None:
    preferred = rendezvous("user-42", [A, B, C])
    load = {preferred.address: AFFINITY_SLACK + 1}
    assert rank([A, B, C], load, session_key="user-42")[0] != preferred


def test_rendezvous_keeps_keys_when_a_replica_leaves() -> None:
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, [A, B, C]) for k in keys}
    after = {k: rendezvous(k, [A, B]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == C for k in moved)  # only C's keys move


def test_empty() -> None:
    assert rank([], {}) == ()


def test_table_resolves_aliases_and_keeps_only_ready() -> None:
    R = cluster_pb2
    table = build_table(
        [spec("demo", aliases=["tiny"])],
        [
            R.ReplicaStatus(model="demo", node_id="n2", address="h:2", state=R.REPLICA_STATE_READY),
            R.ReplicaStatus(model="demo", node_id="n1", address="h:1", state=R.REPLICA_STATE_READY),
            R.ReplicaStatus(
                model="demo", node_id="n3", address="h:3", state=R.REPLICA_STATE_LOADING
            ),
        ],
    )
    route = table.resolve("tiny")
    assert route is not None and route.spec.name == "demo"
    assert [e.node_id for e in route.ready] == ["n1", "n2"]
    assert route.loading == 1  # a wait for this model will end
    assert table.resolve("nope") is None
