"""Placement and eviction as a pure function of a snapshot (STYLE: no I/O, no clock, no randomness),
run as a plugin pipeline in the manner of the Kubernetes scheduling framework (plugins.py,
profile.py).

One round:
1. keep what is placed while its node is alive, not draining, and the model still wants it
   (plans are incremental: nothing moves without a reason); drop surplus replicas; a device that
   shrank below what it holds sheds its least valuable models;
2. place missing replicas, models by priority, gangs first, then by memory need, largest first
   (first-fit-decreasing's order: the hardest to fit first). For each replica,
   candidate devices come from an index of free memory (best fit first for `binpack`, most free
   first for `spread`), nodes are filtered (draining, labels/GPU type, anti-affinity, failed here,
   memory), up to `candidates` feasible nodes are scored (weighted scorers in [0, 1]) and the best
   is bound. A replica larger than one device is a gang of `gpus` devices on one node, all or
   nothing;
3. when no node fits, eviction (Kubernetes' post-filter/preemption): on each node that passes the
   other filters, victims in the profile's order (`cost_aware`: expected reload cost = reload
   seconds from the tier it would wait in x its request rate; `lru`) until the replica fits; a
   higher priority is never evicted for a lower one; the cheapest node wins. A model evicted in
   this round is not placed again by evicting others in the same round (no ping-pong);
4. evicted models that are still wanted are demoted, not discarded: CPU RAM while the node's host
   budget allows, else local disk;
5. a full re-plan (nothing placed yet) may move what it placed itself: a replica that fits
   nowhere first tries to make room by relocating single-device models off one device into the
   others (anti-affinity leaves replicated models few nodes), and at the end it consolidates:
   it tries to empty the least-used devices by moving their models into the others.

A model that fits nowhere is reported with the reason; `unresolvable` when no node could take it
even after evictions (every node rejected it with an UNRESOLVABLE filter), as Kubernetes'
UnschedulableAndUnresolvable.
"""

from __future__ import annotations

from meshserve.scheduler import evict, explain, repair
from meshserve.scheduler.demote import demote
from meshserve.scheduler.pipeline import Pipeline
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.state import FAILED, PlanState
from meshserve.scheduler.views import ClusterSnapshot, ModelDecision, ModelView, Plan, Verdict

DEFAULT_PROFILE = Profile()


class Placer:
    """One round over a snapshot; `run()` returns the Plan. After `run()`, `add_model` places one
    more model incrementally (what a new model or an EnsureModel costs). The runner owns the
    order of the steps; choosing, evicting, explaining and repairing are the pipeline's and its
    helpers', over the round's state."""

    def __init__(
        self, snap: ClusterSnapshot, profile: Profile = DEFAULT_PROFILE, order: str = "size"
    ) -> None:
        self.snap = snap
        self.order_name = order
        self.profile = profile
        self.st = PlanState(snap, profile.strategy, profile.compute_target)
        self.pipeline = Pipeline(self.st, profile)
        self.shed: list[tuple[str, str]] = []
        self.decisions: dict[str, ModelDecision] = {}
        self.moves = 0
        self.staying: list[tuple[str, str]] = []  # ... kept until replaced by READY elsewhere
        self.repacked: list[tuple[str, str]] = []  # (model, old node) re-pack moves begun
        self.full = False  # a full re-plan: nothing was placed before this round

    # --- the round ---------------------------------------------------------------------------

    def run(self) -> Plan:
        st, snap = self.st, self.snap
        self._keep_current()
        # Surplus replicas go first from the fullest node.
        for m in st.models.values():
            while st.replicas(m.name) > m.wanted:
                holders = [n for n in st.nodes if m.name in st.node_models[n]]
                victim = max(holders, key=lambda n: (st.used(n), n))
                st.unbind(m.name, victim)
        # A device that shrank below what it holds sheds its least valuable models.
        for d in range(len(st.capacity)):
            while st.free[d] < 0 and st.dev_models[d]:
                victim = min(
                    st.dev_models[d],
                    key=lambda x: (st.models[x].priority, st.models[x].last_used, x),
                )
                st.evict(victim, st.dev_node[d])
                self.shed.append((victim, st.dev_node[d]))
        full = self.full = not any(snap.current.values())
        for m in sorted(st.models.values(), key=self._order_key):
            self._place_model(m)
        self._stay_until_replaced()
        if full and self.profile.consolidate:
            repair.consolidate(self.pipeline)
        elif snap.repack_budget > 0 and self.profile.repack_moves_per_minute > 0:
            self._repack()
        # Victims placed nowhere else get a decision saying so.
        for victim, node_id in st.evictions:
            dec = self.decisions.get(victim)
            if dec is not None and st.replicas(victim) < st.models[victim].wanted:
                why = f"evicted from {node_id} for a model that needed the room; no room elsewhere"
                self.decisions[victim] = ModelDecision(victim, dec.placed_on, dec.verdicts, why)
        return self.plan()

    def _stay_until_replaced(self) -> None:
        """Make before break off a drained node or a FAILED device: a replica there stays
        placed (serving, if it can) until the model has its wanted READY replicas elsewhere;
        then its placement goes and the agent unloads it after its streams end."""
        for model, node_id in self.st.leaving:
            elsewhere = self.st.model_nodes.get(model, set())
            ready = sum(1 for n in elsewhere if (model, n) in self.snap.ready)
            if ready < self.st.models[model].wanted:
                self.staying.append((model, node_id))

    def _repack(self) -> None:
        """Background re-pack within the round's budget: each replica moved is placed on its
        new device now and stays on its old one (make before break) until the new is READY."""
        st, snap = self.st, self.snap
        settled = frozenset(
            (model, node_id)
            for node_id, models in snap.current.items()
            for model in models
            if (model, node_id) in snap.ready and (model, node_id) in st.placed
        )
        budget, slack = snap.repack_budget, self.profile.repack_slack_gpus
        for model, node_id, device, to in repair.repack(self.pipeline, budget, slack, settled):
            self.staying.append((model, node_id))
            self.repacked.append((model, node_id))
            why = (
                f"re-pack: moved off {node_id} device {st.dev_id[device] or '(node memory)'} "
                f"to empty it (fragmentation cost over {self.profile.repack_slack_gpus} GPUs); "
                "the old replica serves until this one is READY"
            )
            placed = tuple(sorted(st.model_nodes[model]))
            self.decisions[model] = ModelDecision(model, placed, (Verdict(to, True, why),))

    def _order_key(self, m: ModelView) -> tuple[object, ...]:
        """size: first-fit-decreasing (gangs, then largest first); constrained: replicated models
        before single ones (anti-affinity leaves them fewer nodes), then by size."""
        if self.order_name == "constrained":
            return (-m.priority, -m.gpus, -min(m.wanted, 2), -m.need_bytes, m.name)
        return (-m.priority, -m.gpus, -m.need_bytes, -m.wanted, m.name)

    def devices_used(self) -> int:
        return sum(1 for ms in self.st.dev_models if ms)

    def plan(self) -> Plan:
        st = self.st
        held: dict[str, set[str]] = {n: set(ms) for n, ms in st.node_models.items() if ms}
        for model, node_id in self.staying:
            held.setdefault(node_id, set()).add(model)
        assignments = {n: frozenset(ms) for n, ms in held.items()}
        devices = {k: tuple(st.dev_id[d] for d in v) for k, v in st.placed.items()}
        for key in self.staying:
            if key in self.snap.current_devices:
                devices[key] = self.snap.current_devices[key]
        counts = {m: len(ns) for m, ns in st.model_nodes.items()}
        gone = st.failed | frozenset(st.leaving)  # failed here, or leaving a failed device or drain
        offloads = demote(self.snap, st.models, assignments, st.evictions, counts, gone)
        return Plan(
            assignments,
            dict(self.decisions),
            tuple(st.evictions),
            offloads,
            devices,
            self.moves,
            tuple(self.shed),
            tuple(self.repacked),
        )

    def add_model(self, m: ModelView) -> ModelDecision:
        """Places a model that was not in the snapshot (incremental placement)."""
        self.st.models[m.name] = m
        self._place_model(m)
        return self.decisions[m.name]

    def _keep_current(self) -> None:
        st, snap = self.st, self.snap
        for node_id in sorted(snap.current):
            node = st.nodes.get(node_id)
            if node is None or node.draining:
                continue  # lease gone or draining: its models are placed again elsewhere
            for model in sorted(snap.current[node_id]):
                m = st.models.get(model)
                if m is None or m.wanted == 0 or (model, node_id) in st.failed:
                    continue
                if (model, node_id) in snap.moving:  # a re-pack moves it: its memory stays
                    st.leaving[(model, node_id)] = None  # held until it goes (the device
                    st.reserve(m, self._kept_devices(m, node_id))  # takes new replicas)
                    continue
                if node.cordon == "drain" or self._on_failed_device(model, node_id):
                    st.leaving[(model, node_id)] = None  # placed elsewhere first: see
                    continue  # _stay_until_replaced
                if len(st.node_devices[node_id]) < m.gpus:
                    continue  # a gang can no longer fit this node: placed again elsewhere
                st.bind(m, node_id, self._kept_devices(m, node_id))

    def _on_failed_device(self, model: str, node_id: str) -> bool:
        """The replica sits on a device its agent judges FAILED: it moves, make before break."""
        st = self.st
        failed = {st.dev_id[d] for d in st.node_devices[node_id] if st.dev_health[d] == FAILED}
        return bool(failed & set(self.snap.current_devices.get((model, node_id), ())))

    def _kept_devices(self, m: ModelView, node_id: str) -> tuple[int, ...]:
        st = self.st
        ids = self.snap.current_devices.get((m.name, node_id), ())
        by_id = {st.dev_id[d]: d for d in st.node_devices[node_id]}
        if len(ids) == m.gpus and all(i in by_id for i in ids):
            return tuple(by_id[i] for i in ids)
        best = st.best_devices(m, node_id)
        if best is not None:
            return best
        devs = sorted(st.node_devices[node_id], key=lambda d: (-st.free[d], d))
        return tuple(sorted(devs[: m.gpus]))  # may over-commit: shed right after

    def _place_model(self, m: ModelView) -> None:
        st, pipe = self.st, self.pipeline
        verdicts: tuple[Verdict, ...] = ()
        reason, unresolvable = "", False
        small = len(st.nodes) <= self.profile.explain_nodes
        searched = False
        while st.replicas(m.name) < m.wanted:
            if small:  # what Explain shows: every node as this replica saw it
                verdicts = explain.verdicts_of(pipe, m)
            chosen = pipe.choose(m)
            if chosen is None and self.full:
                chosen = repair.relocate_for(pipe, m)
            if chosen is None:
                chosen = evict.evict_for(pipe, m) if m.name not in st.evicted else None
            if chosen is None:
                verdicts = explain.verdicts_of(pipe, m)
                reason, unresolvable = explain.why_not(m, verdicts)
                break
            searched = True
            if verdicts and chosen[0] not in {v.node_id for v in verdicts if v.feasible}:
                verdicts = explain.mark_evictions(pipe, verdicts, chosen[0])
            node_id, devices, _score = chosen
            st.bind(m, node_id, devices)
            self.moves += 1
        if searched and not small and not reason:
            verdicts = explain.sweep_verdicts(pipe)
        placed = tuple(sorted(st.model_nodes.get(m.name, ())))
        self.decisions[m.name] = ModelDecision(m.name, placed, verdicts, reason, unresolvable)


MULTI_START_MODELS = 500  # full re-plans up to this many models try both orders


def place(snap: ClusterSnapshot, profile: Profile = DEFAULT_PROFILE) -> Plan:
    """One scheduling round over ``snap`` (deterministic). A full re-plan of a modest fleet runs
    the pipeline with both model orders and keeps the better plan (fewer models left out, then
    fewer devices): first-fit-decreasing alone is a local optimum when anti-affinity binds."""
    first = Placer(snap, profile)
    plan = first.run()
    if any(snap.current.values()) or len(snap.models) > MULTI_START_MODELS:
        return plan
    other = Placer(snap, profile, order="constrained")
    alt = other.run()

    def cost(p: Plan, placer: Placer) -> tuple[int, int]:
        return (sum(1 for d in p.decisions.values() if d.unschedulable), placer.devices_used())

    return alt if cost(alt, other) < cost(plan, first) else plan
