"""Placement policy: first-fit-decreasing, anti-affinity, eviction (pure, no etcd)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.scheduler.placement import place
from meshserve.scheduler.views import DISK, HOST, ClusterSnapshot, NodeView, Plan, wanted_replicas
from meshserve.weights import need_bytes

from tests.factories import GiB, model, node, snapshot


def held(plan: Plan, node_id: str) -> set[str]:
    return set(plan.assignments.get(node_id, ()))


def test_ffd_places_largest_first_on_first_fitting_node() -> None:
    # Two 40 GiB GPUs; 30+10 fill the first, 25+14 the second: FFD order 30, 25, 14, 10.
    plan = place(
        snapshot(
            [node("a", 40), node("b", 40)],
            [model("m10", 10), model("m25", 25), model("m30", 30), model("m14", 14)],
        )
    )
    assert held(plan, "a") == {"m30"} | {"m10"}
    assert held(plan, "b") == {"m25", "m14"}
    assert not plan.evictions


def test_higher_priority_is_placed_first() -> None:
    # Only one fits; the high-priority small model wins over the larger normal one.
    plan = place(snapshot([node("a", 10)], [model("big", 8), model("vip", 6, priority=3)]))
    assert held(plan, "a") == {"vip"}
    assert plan.decisions["big"].unschedulable


def test_anti_affinity_spreads_replicas() -> None:
    plan = place(
        snapshot([node("a", 40), node("b", 40)], [model("m", 1, wanted=2, min_replicas=2)])
    )
    assert held(plan, "a") == {"m"} and held(plan, "b") == {"m"}


def test_anti_affinity_leaves_extra_replica_unplaced() -> None:
    # Three replicas wanted, two nodes: never two on one node.
    plan = place(snapshot([node("a", 40), node("b", 40)], [model("m", 1, wanted=3)]))
    assert sum("m" in ms for ms in plan.assignments.values()) == 2
    assert "anti-affinity" in plan.decisions["m"].unschedulable


def test_existing_placement_is_kept_even_if_ffd_would_choose_elsewhere() -> None:
    plan = place(snapshot([node("a", 40), node("b", 40)], [model("m", 5)], current={"b": {"m"}}))
    assert held(plan, "b") == {"m"} and held(plan, "a") == set()


def test_lost_node_replica_is_replaced_on_a_live_node() -> None:
    # "dead" is absent from the snapshot (its lease expired); its model moves to "b".
    plan = place(snapshot([node("b", 40)], [model("m", 5)], current={"dead": {"m"}}))
    assert held(plan, "b") == {"m"}


def test_draining_node_gets_nothing_and_loses_its_models() -> None:
    plan = place(
        snapshot(
            [node("a", 40, draining=True), node("b", 40)], [model("m", 5)], current={"a": {"m"}}
        )
    )
    assert held(plan, "a") == set() and held(plan, "b") == {"m"}


def test_cordoned_node_keeps_what_runs_and_gets_nothing_new() -> None:
    cordoned = replace(node("a", 40), cordon="cordon")
    plan = place(
        snapshot([cordoned, node("b", 40)], [model("old", 5), model("new", 5)], {"a": {"old"}})
    )
    assert held(plan, "a") == {"old"} and held(plan, "b") == {"new"}
    why = plan.decisions["new"].verdicts
    assert any("cordoned" in v.reason for v in why if v.node_id == "a"), why


def test_drained_node_keeps_serving_until_the_replacement_is_ready() -> None:
    """Make before break: the replica on the drained node stays placed while its replacement
    loads elsewhere, and goes once the replacement is READY."""
    drained = replace(node("a", 40), cordon="drain")
    before = snapshot([drained, node("b", 40)], [model("m", 5)], current={"a": {"m"}})
    plan = place(before)
    assert held(plan, "a") == {"m"} and held(plan, "b") == {"m"}  # both, for now
    loading = replace(before, current={k: frozenset(v) for k, v in plan.assignments.items()})
    assert held(place(loading), "a") == {"m"}  # the new one is not READY yet: still both
    ready = replace(loading, ready=frozenset({("m", "b")}))
    after = place(ready)
    assert held(after, "a") == set() and held(after, "b") == {"m"}


def test_a_drained_node_s_replica_stays_when_there_is_nowhere_else() -> None:
    drained = replace(node("a", 40), cordon="drain")
    plan = place(snapshot([drained, node("b", 2)], [model("m", 5)], current={"a": {"m"}}))
    assert held(plan, "a") == {"m"} and held(plan, "b") == set()


def test_evicts_least_recently_used_when_full() -> None:
    # Node fits two of the three; "new" was just asked for, "old" is the LRU of the two placed.
    plan = place(
        snapshot(
            [node("a", 10)],
            [
                model("old", 4, last_used=100),
                model("recent", 4, last_used=200),
                model("new", 4, last_used=300),
            ],
            current={"a": {"old", "recent"}},
        )
    )
    assert held(plan, "a") == {"recent", "new"}
    assert plan.evictions == (("old", "a"),)
    assert "evicted" in plan.decisions["old"].unschedulable


def test_lower_priority_is_evicted_before_lru() -> None:
    plan = place(
        snapshot(
            [node("a", 10)],
            [
                model("low", 4, priority=1, last_used=500),
                model("lru", 4, last_used=1),
                model("new", 4, last_used=900),
            ],
            current={"a": {"low", "lru"}},
        )
    )
    assert plan.evictions == (("low", "a"),)


def test_never_evicts_higher_priority_or_min_replicas_of_equal_priority() -> None:
    plan = place(
        snapshot(
            [node("a", 10)],
            [
                model("vip", 6, priority=3),
                model("pinned", 4, min_replicas=1),
                model("new", 4, last_used=999),
            ],
            current={"a": {"vip", "pinned"}},
        )
    )
    assert not plan.evictions
    assert held(plan, "a") == {"vip", "pinned"}
    assert "no node has room" in plan.decisions["new"].unschedulable


def test_too_large_for_any_node_is_unresolvable() -> None:
    plan = place(snapshot([node("a", 40), node("b", 40)], [model("codestral", 44 * 1.15)]))
    assert "unresolvable" in plan.decisions["codestral"].unschedulable
    assert plan.assignments == {}


def test_failed_replica_is_moved_to_another_node() -> None:
    plan = place(
        snapshot(
            [node("a", 40), node("b", 40)],
            [model("m", 5)],
            current={"a": {"m"}},
            failed={("m", "a")},
        )
    )
    assert held(plan, "b") == {"m"}


def test_scaled_to_zero_model_is_removed() -> None:
    plan = place(snapshot([node("a", 40)], [model("idle", 5, wanted=0)], current={"a": {"idle"}}))
    assert plan.assignments == {}


def test_evicted_model_does_not_evict_back_in_the_same_round() -> None:
    # One slot, two demand-driven models: the newer wins, the other is not placed by evicting it.
    plan = place(
        snapshot(
            [node("a", 5)],
            [model("x", 4, last_used=1), model("y", 4, last_used=2)],
            current={"a": {"x"}},
        )
    )
    assert held(plan, "a") == {"y"} and plan.evictions == (("x", "a"),)


def test_need_and_wanted_helpers() -> None:
    assert need_bytes(100, 0) == 115
    assert wanted_replicas(0, 0, in_demand=False) == 0
    assert wanted_replicas(0, 0, in_demand=True) == 1
    assert wanted_replicas(3, 2, in_demand=True) == 2


def test_explain_verdicts_name_the_rejecting_filter() -> None:
    plan = place(snapshot([node("small", 1), node("big", 40)], [model("m", 5)]))
    verdicts = {v.node_id: v for v in plan.decisions["m"].verdicts}
    assert not verdicts["small"].feasible and "node offers" in verdicts["small"].reason
    assert verdicts["big"].feasible and 0 < verdicts["big"].score <= 1


@st.composite
def clusters(draw):  # type: ignore[no-untyped-def]
    nodes = [node(f"n{i}", draw(st.integers(1, 40))) for i in range(draw(st.integers(1, 6)))]
    models = [
        model(
            f"m{i}",
            draw(st.floats(0.1, 30)),
            wanted=draw(st.integers(0, 3)),
            priority=draw(st.integers(1, 4)),
            last_used=draw(st.floats(0, 1000)),
        )
        for i in range(draw(st.integers(0, 12)))
    ]
    current = {n.node_id: {m.name for m in models if draw(st.booleans())} for n in nodes}
    return snapshot(nodes, models, current)


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_plan_invariants(snap) -> None:  # type: ignore[no-untyped-def]
    plan = place(snap)
    needs = {m.name: m.need_bytes for m in snap.models}
    prio = {m.name: m.priority for m in snap.models}
    caps = {n.node_id: n.capacity_bytes for n in snap.nodes}
    for node_id, ms in plan.assignments.items():
        # never over-commits a node
        assert sum(needs[m] for m in ms) <= caps[node_id]
    for m in snap.models:
        # anti-affinity is structural (a set per node); replicas never exceed wanted
        assert sum(m.name in ms for ms in plan.assignments.values()) <= m.wanted
    for victim, node_id in plan.evictions:
        # an eviction only ever makes room for a model of at least the victim's priority
        newcomers = plan.assignments.get(node_id, frozenset()) - snap.current.get(
            node_id, frozenset()
        )
        if caps[node_id] >= sum(needs[x] for x in snap.current.get(node_id, ()) if x in needs):
            assert any(prio[n] >= prio[victim] for n in newcomers)


def test_gib_constant() -> None:
    assert GiB == 1024**3


def test_evicted_model_is_demoted_to_cpu_ram_when_the_host_budget_allows() -> None:
    snap = snapshot(
        [NodeView("a", 10 * GiB, host_capacity_bytes=8 * GiB)],
        [model("old", 6, last_used=1), model("new", 6, last_used=2)],
        current={"a": {"old"}},
    )
    plan = place(snap)
    assert held(plan, "a") == {"new"}
    assert plan.offloads == {"a": {"old": HOST}}


def test_evicted_model_goes_to_disk_when_cpu_ram_is_full() -> None:
    snap = snapshot(
        [NodeView("a", 10 * GiB, host_capacity_bytes=2 * GiB)],
        [model("old", 6, last_used=1), model("new", 6, last_used=2)],
        current={"a": {"old"}},
    )
    assert place(snap).offloads == {"a": {"old": DISK}}


def test_offloaded_model_is_restored_where_it_waits_and_the_other_is_demoted() -> None:
    # "x" waits in CPU RAM on b; asked for again (newest), it evicts "y" on b rather than loading
    # fresh elsewhere, and "y" takes its place in CPU RAM.
    snap = ClusterSnapshot(
        nodes=(
            NodeView("a", 10 * GiB, host_capacity_bytes=8 * GiB),
            NodeView("b", 10 * GiB, host_capacity_bytes=8 * GiB),
        ),
        models=(
            model("z", 6, last_used=5),
            model("y", 6, last_used=1),
            model("x", 6, last_used=9),
        ),
        current={"a": frozenset({"z"}), "b": frozenset({"y"})},
        offloaded={"b": {"x": HOST}},
    )
    plan = place(snap)
    assert held(plan, "b") == {"x"} and held(plan, "a") == {"z"}
    assert plan.offloads == {"b": {"y": HOST}}


def test_scaled_to_zero_model_waits_in_cpu_ram_only_while_there_is_room() -> None:
    def plan_for(
        host_gib: float, current: dict[str, frozenset[str]], off: dict[str, dict[str, int]]
    ) -> Plan:
        return place(
            ClusterSnapshot(
                nodes=(NodeView("a", 10 * GiB, host_capacity_bytes=int(host_gib * GiB)),),
                models=(model("idle", 6, wanted=0), model("busy", 6, wanted=1, last_used=9)),
                current=current,
                offloaded=off,
            )
        )

    # Leaving the GPU after its idle timeout, it waits in CPU RAM (a restore beats a reload) ...
    assert plan_for(8, {"a": frozenset({"idle"})}, {}).offloads == {"a": {"idle": HOST}}
    # ... unless the host budget has no room: then it is dropped, never sent to disk.
    assert plan_for(4, {"a": frozenset({"idle"})}, {}).offloads == {}
    assert plan_for(8, {}, {"a": {"idle": DISK}}).offloads == {}


def test_a_spare_replica_scaled_down_waits_in_cpu_ram_unless_it_failed_or_its_node_drains() -> None:
    """Scaled from 2 replicas to 1: the one dropped waits in CPU RAM while the host budget has
    room (a router may wake it), not on a draining node, not where it FAILED, not without room."""

    def plan_for(
        host_gib: float = 8,
        draining: bool = False,
        failed: frozenset[tuple[str, str]] = frozenset(),
    ) -> Plan:
        return place(
            ClusterSnapshot(
                nodes=(
                    NodeView("a", 10 * GiB, host_capacity_bytes=8 * GiB),
                    NodeView(
                        "b", 10 * GiB, host_capacity_bytes=int(host_gib * GiB), draining=draining
                    ),
                ),
                models=(model("m", 6, wanted=1, last_used=9),),
                current={"a": frozenset({"m"}), "b": frozenset({"m"})},
                failed=failed,
            )
        )

    plan = plan_for()
    kept = next(n for n in ("a", "b") if held(plan, n) == {"m"})
    spare = "b" if kept == "a" else "a"
    assert plan.offloads == {spare: {"m": HOST}}
    no_room_on_b = plan_for(host_gib=4).offloads
    assert no_room_on_b == ({} if spare == "b" else {"a": {"m": HOST}})
    assert plan_for(draining=True).offloads == {}  # b drains: m stays on a, nothing kept on b
    assert plan_for(failed=frozenset({("m", "b")})).offloads == {}
