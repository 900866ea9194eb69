"""Endpoint picking and outlier detection (pure)."""

from __future__ import annotations

from meshserve.modelspec import ROUTING_SCORERS
from meshserve.router.core.table import build_table
from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.pipeline import (
    AFFINITY_SLACK,
    DEFAULT_WEIGHTS,
    SCORERS,
    Ask,
    View,
    pick,
    rank,
    rendezvous,
)
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


def _view(outstanding: dict[str, int] | None = None, broken: frozenset[str] = frozenset()) -> View:
    return View(outstanding or {}, {}, lambda key: key[0] not in broken)


def test_a_decision_names_each_filter_verdict_and_each_score() -> None:
    full = Endpoint("a", "h:1", max_streams=1)
    view = View({"h:1": 1}, {("h:1", "m"): 1}, lambda key: key[0] != "h:3")
    d = pick("m", [full, B, C], Ask(), view)
    rows = {c.endpoint.node_id: c for c in d.candidates}
    assert rows["a"].rejected.startswith("slot:") and not rows["a"].scores
    assert rows["c"].rejected == "breaker: circuit breaker open"
    assert d.chosen is B
    assert rows["b"].scores == {"ttft": 0.0, "affinity": 0.0, "kv": 1.0, "load": 1.0}
    assert rows["b"].total == 3.0 and not d.note


def test_excluded_replicas_are_filtered_and_a_soft_filter_lifts_when_nothing_is_left() -> None:
    d = pick("m", [A, B], Ask(exclude={A.identity}), _view(broken=frozenset({"h:2"})))
    assert d.chosen is B and "soft filters lifted" in d.note  # the broken one, as a last resort
    assert {c.endpoint.node_id: c.rejected for c in d.candidates}["a"].startswith("excluded:")
    none = pick("m", [A], Ask(exclude={A.identity}), _view())
    assert none.chosen is None and none.candidates[0].rejected


def test_weights_are_the_profile_a_load_only_profile_ignores_affinity() -> None:
    preferred = rendezvous("user-42", [A, B, C])
    others = [e for e in (A, B, C) if e is not preferred]
    load = {preferred.address: 2, others[0].address: 1}  # preferred busier, within the slack
    assert pick("m", [A, B, C], Ask("user-42"), _view(load)).chosen is preferred
    d = pick("m", [A, B, C], Ask("user-42"), _view(load), {"load": 1.0})
    assert d.chosen is others[1] and set(d.candidates[0].scores) == {"load"}


def test_the_scorers_are_the_ones_model_specs_may_weigh() -> None:
    assert set(SCORERS) == set(ROUTING_SCORERS) >= set(DEFAULT_WEIGHTS)


def test_ties_share_the_load_evenly_among_the_replicas_left() -> None:
    """With one of three replicas filtered out, the two left tie and take turns (1:1)."""
    full = Endpoint("a", "h:1", max_streams=1)
    view = View({}, {("h:1", "m"): 1})
    chosen = [pick("m", [full, B, C], Ask(), view, tiebreak=t).chosen for t in range(6)]
    assert chosen.count(B) == chosen.count(C) == 3
