"""Background re-pack (Profile.repack_*): an incremental round empties the least-used devices of a
fragmented fleet within its disruption budget, make before break — the old replica stays placed
until the new one is READY, so a model never drops below its READY replicas — and the leader's
budget allows at most N moves a minute."""

from __future__ import annotations

from dataclasses import replace

import pytest
from meshserve.scheduler.placement import place
from meshserve.scheduler.profile import Profile, load_profile
from meshserve.scheduler.repack import Repacks
from meshserve.scheduler.views import ClusterSnapshot, Plan

from tests.factories import model, node, snapshot

REPACK = Profile(repack_moves_per_minute=4, repack_slack_gpus=1)


def fragmented(budget: int) -> ClusterSnapshot:
    """Four 40 GiB nodes each holding one 8 GiB model: they would fit on one (3 GPUs wasted)."""
    snap = snapshot(
        [node(f"n{i}", 40) for i in range(4)],
        [model(f"m{i}", 8) for i in range(4)],
        current={f"n{i}": {f"m{i}"} for i in range(4)},
    )
    return replace(
        snap, ready=frozenset((f"m{i}", f"n{i}") for i in range(4)), repack_budget=budget
    )


def holders(plan: Plan, m: str) -> set[str]:
    return {n for n, ms in plan.assignments.items() if m in ms}


def test_a_fragmented_fleet_is_repacked_within_the_budget_and_old_replicas_stay() -> None:
    plan = place(fragmented(budget=2), REPACK)
    assert len(plan.repacked) == 2  # the budget, though three devices could be emptied
    for m, old in plan.repacked:
        assert holders(plan, m) == {old, *holders(plan, m)} and len(holders(plan, m)) == 2
        why = plan.decisions[m].verdicts[0].reason
        assert why.startswith(f"re-pack: moved off {old}") and "READY" in why
    # Moved onto used devices only: no new node taken.
    assert set(plan.assignments) == {"n0", "n1", "n2", "n3"}


def test_no_repack_without_budget_or_when_fragmentation_is_within_the_slack() -> None:
    assert place(fragmented(budget=0), REPACK).repacked == ()
    off = Profile(repack_moves_per_minute=0)
    assert place(fragmented(budget=4), off).repacked == ()  # off when the profile says so
    lenient = replace(REPACK, repack_slack_gpus=3)
    assert place(fragmented(budget=4), lenient).repacked == ()
    # With budget to spare, moves stop once fragmentation is within the slack: 4 devices used
    # where 1 would do (3 wasted) → 2 moves leave 2 used (1 wasted, the slack).
    assert len(place(fragmented(budget=4), REPACK).repacked) == 2
    tight = place(fragmented(budget=4), replace(REPACK, repack_slack_gpus=0))
    assert len(tight.repacked) == 3
    new = {n for m, _old in tight.repacked for n in holders(tight, m)} - {
        o for _m, o in tight.repacked
    }
    assert len(new) == 1  # all onto one device


def test_the_old_replica_goes_only_once_the_new_one_is_ready() -> None:
    first = place(fragmented(budget=1), REPACK)
    ((m, old),) = first.repacked
    (new,) = holders(first, m) - {old}
    current = {n: set(ms) for n, ms in first.assignments.items()}
    loading = replace(
        fragmented(budget=0),
        current={n: frozenset(ms) for n, ms in current.items()},
        moving=frozenset(first.repacked),
    )
    assert holders(place(loading, REPACK), m) == {old, new}  # the new one is still loading
    ready = replace(loading, ready=loading.ready | {(m, new)})
    assert holders(place(ready, REPACK), m) == {new}  # READY elsewhere: the old one goes


def test_the_disruption_budget_allows_n_moves_a_minute_and_forgets_finished_moves() -> None:
    r = Repacks(per_minute=2)
    assert r.budget(0.0) == 2
    r.begun([("a", "n1"), ("b", "n2")], 0.0)
    assert r.budget(30.0) == 0
    assert r.budget(60.5) == 2
    assert r.in_flight([("a", "n1"), ("c", "n3")]) == {("a", "n1")}  # b's old replica is gone
    assert Repacks(0).budget(0.0) == 0


def test_the_profile_reads_the_repack_settings_and_refuses_negative_ones() -> None:
    p = load_profile({"repack_moves_per_minute": 3, "repack_slack_gpus": 2})
    assert (p.repack_moves_per_minute, p.repack_slack_gpus) == (3, 2)
    with pytest.raises(ValueError, match="repack_moves_per_minute"):
        load_profile({"repack_moves_per_minute": -1})


def test_only_settled_replicas_move_and_a_moving_one_keeps_its_memory() -> None:
    # Nothing READY yet (just placed, still loading): nothing moves.
    assert place(replace(fragmented(budget=4), ready=frozenset()), REPACK).repacked == ()
    # m0 is moving off n0 (its new replica on n1 loads): it is not moved again, and its 8 GiB
    # on n0 stay held — a 35 GiB model does not fit there beside it (40 GiB node).
    snap = fragmented(budget=4)
    moving = replace(
        snap,
        models=(*snap.models, model("big", 35)),
        current={**snap.current, "n1": frozenset({"m1", "m0"})},
        moving=frozenset({("m0", "n0")}),
    )
    plan = place(moving, REPACK)
    assert ("m0", "n0") not in plan.repacked and "m0" not in {m for m, _ in plan.repacked}
    assert "big" not in plan.assignments.get("n0", frozenset())
    assert holders(plan, "m0") == {"n0", "n1"}  # the old one serves until the new is READY


def test_a_device_with_more_replicas_than_the_budget_is_emptied_over_several_rounds() -> None:
    # n0 holds three 4 GiB models; n1 and n2 a 30 GiB one each: n0 could be emptied into the
    # others (one GPU wasted) but takes three moves, more than a round's budget of two.
    snap = replace(
        snapshot(
            [node(f"n{i}", 40) for i in range(3)],
            [model("a", 4), model("b", 4), model("c", 4), model("big1", 30), model("big2", 30)],
            current={"n0": {"a", "b", "c"}, "n1": {"big1"}, "n2": {"big2"}},
        ),
        repack_budget=2,
    )
    snap = replace(snap, ready=frozenset((m, n) for n, ms in snap.current.items() for m in ms))
    tight = replace(REPACK, repack_slack_gpus=0)
    first = place(snap, tight)
    assert len(first.repacked) == 2  # the budget: two now, the third waits on n0
    assert {o for _m, o in first.repacked} == {"n0"}
    # The moves finished (new replicas READY, old ones let go); the next minute's budget.
    moved = {m for m, _o in first.repacked}
    current = {n: frozenset(ms - moved if n == "n0" else ms) for n, ms in first.assignments.items()}
    ready = frozenset((m, n) for n, ms in current.items() for m in ms)
    second = place(replace(snap, current=current, ready=ready), tight)
    ((last, old),) = second.repacked
    assert old == "n0" and last not in moved
    assert not (second.assignments.get("n0", frozenset()) - {last})  # n0 only keeps the mover
