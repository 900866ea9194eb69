"""The placement pipeline's plugins, devices, gangs, eviction policies and profile (pure), plus
property tests over GPU-level fleets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.scheduler.placement import Placer, place
from meshserve.scheduler.plugins import UNRESOLVABLE, UNSCHEDULABLE, ReloadCosts
from meshserve.scheduler.profile import Profile, load_profile
from meshserve.scheduler.views import ClusterSnapshot, Device, ModelView, NodeView

from tests.factories import GiB


def gpu_node(
    node_id: str,
    gpus: int,
    gib: float,
    kind: str = "NVIDIA A100-SXM4-40GB",
    labels: dict[str, str] | None = None,
    host_gib: float = 0,
    draining: bool = False,
) -> NodeView:
    devices = tuple(Device(f"{node_id}-g{i}", int(gib * GiB), kind) for i in range(gpus))
    return NodeView(
        node_id,
        int(gpus * gib * GiB),
        draining,
        int(host_gib * GiB),
        devices,
        labels or {},
    )


def m(name: str, gib: float, wanted: int = 1, **kw: object) -> ModelView:
    return ModelView(name, int(gib * GiB), wanted, **kw)  # type: ignore[arg-type]


def snap(nodes: list[NodeView], models: list[ModelView], **kw: object) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(nodes), tuple(models), **kw)  # type: ignore[arg-type]


def devices_of(plan: object, model: str) -> list[str]:
    return sorted(d for (mm, _n), ds in plan.devices.items() if mm == model for d in ds)  # type: ignore[attr-defined]


# --- filters ----------------------------------------------------------------------------------


def test_never_splits_a_replica_across_gpus_that_only_fit_it_together() -> None:
    # 2 x 40 GiB GPUs hold 60 GiB in all, but a 30 GiB model fits on each, a 50 GiB one on none.
    plan = place(snap([gpu_node("a", 2, 40)], [m("big", 50), m("ok", 30)]))
    assert plan.decisions["big"].unresolvable
    assert "no node is that large" in plan.decisions["big"].unschedulable
    assert devices_of(plan, "ok") == ["a-g0"] or devices_of(plan, "ok") == ["a-g1"]


def test_tensor_parallel_gang_takes_devices_on_one_node_or_nothing() -> None:
    # 70 GiB over 2 GPUs: 35 GiB each. Node a has one free 40 GiB GPU, b has two.
    nodes = [gpu_node("a", 2, 40), gpu_node("b", 2, 40)]
    plan = place(
        snap(
            nodes,
            [m("filler", 30, min_replicas=1), m("llama70", 70, gpus=2)],
            current={"a": frozenset({"filler"})},
            current_devices={("filler", "a"): ("a-g0",)},
        ),
    )
    assert devices_of(plan, "llama70") == ["b-g0", "b-g1"]
    assert plan.assignments["a"] == {"filler"}
    # Three GPUs needed, nodes have two: unresolvable, never placed partly.
    plan = place(snap(nodes, [m("huge", 90, gpus=3)]))
    assert plan.decisions["huge"].unresolvable and plan.assignments == {}


def test_gpu_type_and_node_selector_filter_nodes() -> None:
    nodes = [
        gpu_node("a100", 1, 40),
        gpu_node("h100", 1, 80, kind="NVIDIA H100 80GB HBM3", labels={"zone": "eu"}),
    ]
    plan = place(snap(nodes, [m("x", 10, gpu_types=frozenset({"H100"}))]))
    assert plan.assignments == {"h100": frozenset({"x"})}
    plan = place(snap(nodes, [m("y", 10, node_selector={"zone": "us"})]))
    assert plan.decisions["y"].unresolvable
    verdicts = {v.node_id: v for v in plan.decisions["y"].verdicts}
    assert verdicts["a100"].filter == "node_selector"


def test_mig_slices_are_devices_of_their_own() -> None:
    slices = tuple(
        Device(f"MIG-{i}", 10 * GiB, "NVIDIA A100 MIG 2g.10gb", mig=True) for i in range(4)
    )
    node = NodeView("mig", 40 * GiB, devices=slices)
    plan = place(snap([node], [m("small", 8), m("mid", 12)]))
    assert plan.assignments == {"mig": frozenset({"small"})}
    assert "no node is that large" in plan.decisions["mid"].unschedulable


def test_filter_outcomes_distinguish_unschedulable_from_unresolvable() -> None:
    placer = Placer(snap([gpu_node("a", 1, 40)], [m("held", 30, min_replicas=1), m("x", 20)]))
    placer.run()
    fits = next(f for f in placer.pipeline.filters if f.name == "fits_memory")
    node = placer.st.nodes["a"]
    full = fits.check(m("x", 20), node, placer.st)
    assert full is not None and full.code == UNSCHEDULABLE  # evicting could help
    too_big = fits.check(m("y", 50), node, placer.st)
    assert too_big is not None and too_big.code == UNRESOLVABLE


# --- scorers ----------------------------------------------------------------------------------


def test_binpack_fills_used_gpus_first_and_opens_the_largest_new_one() -> None:
    nodes = [gpu_node("small", 1, 40), gpu_node("large", 1, 80, kind="H100")]
    plan = place(snap(nodes, [m("first", 30), m("second", 30)]))
    # The first opens the 80 GiB GPU; the second fills it instead of opening the other.
    assert plan.assignments == {"large": frozenset({"first", "second"})}


def test_spread_strategy_uses_the_emptiest_gpus() -> None:
    nodes = [gpu_node("a", 1, 40), gpu_node("b", 1, 40)]
    plan = place(snap(nodes, [m("x", 5, strategy="spread"), m("y", 5, strategy="spread")]))
    assert sorted(len(ms) for ms in plan.assignments.values()) == [1, 1]
    packed = place(snap(nodes, [m("x", 5), m("y", 5)]))
    assert len(packed.assignments) == 1


def test_locality_prefers_the_node_holding_the_model_in_cpu_ram() -> None:
    nodes = [gpu_node("a", 1, 40), gpu_node("b", 1, 40)]
    plan = place(snap(nodes, [m("x", 10)], offloaded={"b": {"x": 2}}))
    assert plan.assignments == {"b": frozenset({"x"})}
    verdicts = {v.node_id: v for v in plan.decisions["x"].verdicts}
    assert verdicts["b"].scores["locality"] == 1.0 and verdicts["a"].scores["locality"] == 0.0


# --- eviction ---------------------------------------------------------------------------------


def eviction_case(policy: str) -> tuple[str, ...]:
    # "busy" was used least recently but serves 50 req/s; "quiet" was used lately, by nobody now.
    models = [
        m("busy", 20, last_used=10, request_rate=50.0),
        m("quiet", 20, last_used=20, request_rate=0.0),
        m("new", 20, last_used=30),
    ]
    nodes = [gpu_node("a", 1, 40, host_gib=64)]
    current = {"a": frozenset({"busy", "quiet"})}
    plan = place(snap(nodes, models, current=current), Profile(eviction=policy))
    return tuple(v for v, _ in plan.evictions)


def test_cost_aware_eviction_spares_the_model_with_traffic_lru_does_not() -> None:
    assert eviction_case("cost_aware") == ("quiet",)
    assert eviction_case("lru") == ("busy",)


def test_reload_cost_grows_with_slower_tiers() -> None:
    costs = ReloadCosts()
    assert costs.seconds(14 * 10**9, 2) == pytest.approx(0.4375)  # CPU RAM at PCIe speed
    assert costs.seconds(14 * 10**9, 3) == pytest.approx(2.0)  # NVMe
    assert costs.seconds(14 * 10**9, 0) > 60  # from the source


def test_preemption_evicts_lower_priority_gangs_whole() -> None:
    nodes = [gpu_node("a", 2, 40)]
    models = [m("low", 60, gpus=2, priority=1), m("vip", 30, priority=4)]
    plan = place(snap(nodes, models, current={"a": frozenset({"low"})}))
    assert plan.evictions == (("low", "a"),) and plan.assignments == {"a": frozenset({"vip"})}


def test_full_replan_consolidates_and_incremental_rounds_move_nothing() -> None:
    nodes = [gpu_node("a", 4, 40)]
    models = [m(f"x{i}", 9) for i in range(8)]
    plan = place(snap(nodes, models))
    assert len({d for ds in plan.devices.values() for d in ds}) == 2  # 4 x 9 GiB per 40 GiB GPU
    # Held where they are, a new model lands without moving anything.
    again = place(
        snap(nodes, [*models, m("new", 3)], current=plan.assignments, current_devices=plan.devices)
    )
    assert all(again.devices[k] == v for k, v in plan.devices.items())
    assert again.moves == 1 and not again.evictions


def test_incremental_add_model_on_a_planned_fleet() -> None:
    placer = Placer(snap([gpu_node("a", 2, 40), gpu_node("b", 2, 40)], [m("x", 30, wanted=2)]))
    placer.run()
    decision = placer.add_model(m("y", 30, wanted=2))
    assert decision.placed_on == ("a", "b") and not decision.unschedulable


# --- profile ----------------------------------------------------------------------------------


def test_profile_from_config_and_its_errors() -> None:
    p = load_profile(
        {"strategy": "spread", "eviction": "lru", "scorers": {"fit": 2, "locality": 1}}
    )
    assert (
        p.strategy == "spread"
        and p.eviction == "lru"
        and p.scorers == {"fit": 2.0, "locality": 1.0}
    )
    cases: list[tuple[dict[str, object], str]] = [
        ({"filters": ["node_draining"]}, "fits_memory cannot be left out"),
        ({"filters": ["fits_memory", "gpu_magic"]}, "unknown filter 'gpu_magic'"),
        ({"scorers": {"fit": -1}}, "negative weight"),
        ({"strategy": "random"}, "strategy must be one of"),
        ({"eviction": "fifo"}, "eviction must be one of"),
        ({"bogus": 1}, "unknown profile keys"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            load_profile(bad)


# --- properties -------------------------------------------------------------------------------


@st.composite
def fleets(draw):  # type: ignore[no-untyped-def]
    nodes = [
        gpu_node(f"n{i}", draw(st.integers(1, 4)), draw(st.sampled_from([10, 40, 80])))
        for i in range(draw(st.integers(1, 5)))
    ]
    models = [
        m(
            f"m{i}",
            draw(st.floats(0.5, 90)),
            wanted=draw(st.integers(0, 3)),
            priority=draw(st.integers(1, 4)),
            last_used=draw(st.floats(0, 1000)),
            gpus=draw(st.sampled_from([1, 1, 1, 2])),
            request_rate=draw(st.floats(0, 10)),
        )
        for i in range(draw(st.integers(0, 14)))
    ]
    names = [x.name for x in models]
    current = {n.node_id: frozenset(x for x in names if draw(st.booleans())) for n in nodes}
    policy = draw(st.sampled_from(["cost_aware", "lru"]))
    return snap(nodes, models, current=current), Profile(eviction=policy)


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_plans_never_overcommit_a_gpu_respect_anti_affinity_and_priority(case) -> None:  # type: ignore[no-untyped-def]
    s, profile = case
    plan = place(s, profile)
    models = {x.name: x for x in s.models}
    capacity = {d.device_id: d.capacity_bytes for n in s.nodes for d in n.all_devices()}
    used: dict[str, int] = {}
    for (model, node), devices in plan.devices.items():
        assert model in plan.assignments[node]
        assert len(devices) == models[model].gpus == len(set(devices))
        assert all(d.startswith(f"{node}-") for d in devices)  # a gang stays on one node
        for d in devices:
            used[d] = used.get(d, 0) + models[model].per_device_bytes
    for d, b in used.items():
        assert b <= capacity[d], "a GPU is over-committed"
    for x in s.models:
        holders = [n for n, ms in plan.assignments.items() if x.name in ms]
        assert len(holders) <= x.wanted  # one per node by construction, never above wanted
    # An eviction never makes room for a lower priority: every victim on a node that had room
    # for what it held yields to a newcomer of at least its priority.
    for victim, node in set(plan.evictions) - set(plan.shed):  # shed: its device cannot hold it
        held_before = s.current.get(node, frozenset())
        newcomers = plan.assignments.get(node, frozenset()) - held_before
        assert any(models[n].priority >= models[victim].priority for n in newcomers)


def test_priority_scorer_prefers_nodes_without_higher_priority_neighbours() -> None:
    nodes = [gpu_node("busy", 1, 80), gpu_node("calm", 1, 80)]
    models = [m("vip", 40, priority=4), m("low", 40, priority=1), m("new", 10)]
    current = {"busy": frozenset({"vip"}), "calm": frozenset({"low"})}
    plan = place(snap(nodes, models, current=current), Profile(scorers={"priority": 1.0}))
    verdicts = {v.node_id: v for v in plan.decisions["new"].verdicts}
    assert verdicts["calm"].scores["priority"] == 1.0
    assert verdicts["busy"].scores["priority"] == pytest.approx(1 - 40 / 80, abs=0.01)
    assert plan.assignments["calm"] == {"low", "new"}


def test_draining_nodes_are_rejected_as_unresolvable_with_the_filter_named() -> None:
    plan = place(snap([gpu_node("a", 1, 40, draining=True)], [m("x", 5)]))
    (v,) = plan.decisions["x"].verdicts
    assert v.filter == "node_draining" and v.unresolvable
    assert plan.decisions["x"].unresolvable


def test_compute_aware_placement_keeps_two_hot_models_apart() -> None:
    def hot(name: str) -> ModelView:
        return m(name, 2, tokens_per_s=10_000.0)

    devices = tuple(Device(f"a-g{i}", 40 * GiB, "A100", False, 15_000.0) for i in range(2))
    node = NodeView("a", 80 * GiB, devices=devices)
    plan = place(snap([node], [hot("bert"), hot("bge")]))
    assert devices_of(plan, "bert") != devices_of(plan, "bge")  # memory alone would pack them
    cold = place(snap([node], [m("p", 2), m("q", 2)]))
    assert devices_of(cold, "p") == devices_of(cold, "q")
