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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshserve.scheduler.plugins import (
    DISK,
    FILTERS,
    HOST,
    SCORERS,
    UNRESOLVABLE,
    VICTIM_ORDERS,
    Filter,
    Rejection,
    Scorer,
    may_evict,
    mib,
    type_ok,
)
from meshserve.scheduler.profile import Profile
from sortedcontainers import SortedList

OVERHEAD_FRACTION = 0.15  # seed: runtime overhead on top of weights + KV headroom
RELOCATE_TRIES = 16  # devices tried per replica that fits nowhere in a full re-plan
DEFAULT_PROFILE = Profile()
__all__ = ["DISK", "HOST", "ClusterSnapshot", "ModelView", "NodeView", "Plan", "place"]


@dataclass(frozen=True)
class Device:
    device_id: str  # GPU or MIG uuid; "" for the memory of a node without GPUs
    capacity_bytes: int
    gpu_type: str = ""  # e.g. "A100-40GB"; "" on CPU nodes
    mig: bool = False
    throughput_tokens_per_s: float = 0.0  # what it generates at full load; 0 = unknown


@dataclass(frozen=True)
class NodeView:
    node_id: str
    capacity_bytes: int  # memory offered to models (sum over devices)
    draining: bool = False
    host_capacity_bytes: int = 0  # CPU RAM offered to offloaded models
    devices: tuple[Device, ...] = ()  # empty: one device of capacity_bytes (a CPU node)
    labels: Mapping[str, str] = field(default_factory=dict)

    def all_devices(self) -> tuple[Device, ...]:
        return self.devices or (Device("", self.capacity_bytes),)


@dataclass(frozen=True)
class ModelView:
    name: str
    need_bytes: int  # one replica in all: weights + KV headroom + overhead
    wanted: int  # replicas wanted now (from min/max replicas and the autoscaler)
    min_replicas: int = 0
    priority: int = 2  # meshserve.v1.Priority; higher wins
    last_used: float = 0.0  # s since the epoch of the last request; 0 = never
    gpus: int = 1  # devices per replica (tensor parallel gang on one node)
    strategy: str = ""  # "binpack" | "spread" | "" (the profile's)
    gpu_types: frozenset[str] = frozenset()  # allowed GPU types; empty = any
    node_selector: Mapping[str, str] = field(default_factory=dict)
    request_rate: float = 0.0  # requests/s now (eviction cost)
    tokens_per_s: float = 0.0  # tokens/s its demand asks for, over all replicas; 0 = unknown

    @property
    def per_device_bytes(self) -> int:
        return -(-self.need_bytes // max(1, self.gpus))

    @property
    def per_device_load(self) -> float:
        """Tokens/s each device of one replica is expected to generate (demand split evenly)."""
        return self.tokens_per_s / max(1, self.wanted) / max(1, self.gpus)


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeView, ...]
    models: tuple[ModelView, ...]
    current: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node → models placed
    failed: frozenset[tuple[str, str]] = frozenset()  # (model, node) whose replica FAILED
    offloaded: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # node → model → tier
    # (model, node) → device ids it was given; missing: chosen again on that node
    current_devices: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    node_id: str
    feasible: bool
    reason: str
    score: float = 0.0  # in [0, 1]: the weighted scorers; higher is better
    free_bytes: int = 0
    evicts: tuple[str, ...] = ()
    filter: str = ""  # the filter that rejected the node
    scores: Mapping[str, float] = field(default_factory=dict)  # each scorer's value
    unresolvable: bool = False  # evicting would not help on this node


@dataclass(frozen=True)
class ModelDecision:
    model: str
    placed_on: tuple[str, ...]
    verdicts: tuple[Verdict, ...] = ()  # from the last replica placed or attempted this round
    unschedulable: str = ""  # why a wanted replica could not be placed
    unresolvable: bool = False  # no node could take it, even after evictions


@dataclass(frozen=True)
class Plan:
    assignments: Mapping[str, frozenset[str]]  # node → models on the device
    decisions: Mapping[str, ModelDecision]
    evictions: tuple[tuple[str, str], ...] = ()  # (model, node) removed to make room
    offloads: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # node → model → tier
    devices: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    moves: int = 0  # replicas placed this round that were not placed before (loads)
    shed: tuple[tuple[str, str], ...] = ()  # evictions because a device could not hold them


def need_bytes(memory: int, kv_headroom: int, overhead: float = OVERHEAD_FRACTION) -> int:
    return round((memory + kv_headroom) * (1.0 + overhead))


def wanted_replicas(min_replicas: int, max_replicas: int, in_demand: bool) -> int:
    wanted = max(min_replicas, 1 if in_demand else 0)
    return min(wanted, max_replicas) if max_replicas else wanted


class PlanState:
    """The mutable working state of one round: free memory per device (indexed), who is where."""

    def __init__(self, snap: ClusterSnapshot, profile: Profile) -> None:
        self.profile = profile
        self.models = {m.name: m for m in snap.models}
        self.nodes = {n.node_id: n for n in sorted(snap.nodes, key=lambda n: n.node_id)}
        self.failed = snap.failed
        self.offloaded = snap.offloaded
        self.capacity: list[int] = []
        self.free: list[int] = []
        self.dev_node: list[str] = []
        self.dev_id: list[str] = []
        self.dev_type: list[str] = []
        self.dev_models: list[set[str]] = []
        self.throughput: list[float] = []
        self.load: list[float] = []  # expected tokens/s on each device
        self.node_devices: dict[str, list[int]] = {}
        self.node_models: dict[str, set[str]] = {}
        self.node_capacity: dict[str, int] = {}
        self.model_nodes: dict[str, set[str]] = {}
        self.node_priority_bytes: dict[str, dict[int, int]] = {}  # node → priority → bytes held
        self.placed: dict[tuple[str, str], tuple[int, ...]] = {}
        self.count: dict[str, int] = dict.fromkeys(self.models, 0)
        self.index: SortedList = SortedList()  # (free, device) on nodes that take new replicas
        self.largest_device = 1
        for node in self.nodes.values():
            devs = []
            for d in node.all_devices():
                i = len(self.capacity)
                self.capacity.append(d.capacity_bytes)
                self.free.append(d.capacity_bytes)
                self.dev_node.append(node.node_id)
                self.dev_id.append(d.device_id)
                self.dev_type.append(d.gpu_type)
                self.dev_models.append(set())
                self.throughput.append(d.throughput_tokens_per_s)
                self.load.append(0.0)
                devs.append(i)
                if not node.draining:
                    self.index.add((d.capacity_bytes, i))
            self.node_devices[node.node_id] = devs
            self.node_models[node.node_id] = set()
            self.node_capacity[node.node_id] = sum(self.capacity[d] for d in devs)
            self.node_priority_bytes[node.node_id] = {}
        self.largest_device = max(self.capacity, default=1) or 1

    def strategy_of(self, m: ModelView) -> str:
        return m.strategy or self.profile.strategy

    def allowed(self, m: ModelView, d: int) -> bool:
        return type_ok(m.gpu_types, self.dev_type[d])

    def compute_ok(self, m: ModelView, d: int) -> bool:
        """The device keeps up with what it already serves plus this replica's share, within
        the profile's compute target (devices that report no throughput always pass)."""
        cap = self.throughput[d]
        return not cap or self.load[d] + m.per_device_load <= cap * self.profile.compute_target

    def fits(self, m: ModelView, d: int) -> bool:
        return self.free[d] >= m.per_device_bytes and self.compute_ok(m, d) and self.allowed(m, d)

    def _set_free(self, d: int, free: int) -> None:
        if not self.nodes[self.dev_node[d]].draining:
            self.index.remove((self.free[d], d))
            self.index.add((free, d))
        self.free[d] = free

    def bind(self, m: ModelView, node_id: str, devices: tuple[int, ...]) -> None:
        for d in devices:
            self._set_free(d, self.free[d] - m.per_device_bytes)
            self.dev_models[d].add(m.name)
            self.load[d] += m.per_device_load
        self.node_models[node_id].add(m.name)
        self.model_nodes.setdefault(m.name, set()).add(node_id)
        held = self.node_priority_bytes[node_id]
        held[m.priority] = held.get(m.priority, 0) + m.need_bytes
        self.placed[(m.name, node_id)] = devices
        self.count[m.name] = self.count.get(m.name, 0) + 1

    def unbind(self, model: str, node_id: str) -> None:
        m = self.models[model]
        for d in self.placed.pop((model, node_id)):
            self._set_free(d, self.free[d] + m.per_device_bytes)
            self.dev_models[d].discard(model)
            self.load[d] -= m.per_device_load
        self.node_models[node_id].discard(model)
        self.model_nodes[model].discard(node_id)
        self.node_priority_bytes[node_id][m.priority] -= m.need_bytes
        self.count[model] -= 1

    def used(self, node_id: str) -> int:
        return sum(self.capacity[d] - self.free[d] for d in self.node_devices[node_id])

    def free_on(self, node_id: str) -> int:
        return sum(self.free[d] for d in self.node_devices[node_id])

    def best_devices(self, m: ModelView, node_id: str) -> tuple[int, ...] | None:
        """The devices this node would give the replica (best fit, or most free for spread)."""
        fit = [d for d in self.node_devices[node_id] if self.fits(m, d)]
        if len(fit) < m.gpus:
            return None
        spread = self.strategy_of(m) == "spread"
        fit.sort(key=lambda d: (-self.free[d] if spread else self.free[d], d))
        return tuple(sorted(fit[: m.gpus]))


class Placer:
    """One round of the pipeline over a snapshot; `run()` returns the Plan. After `run()`,
    `add_model` places one more model incrementally (what a new model or an EnsureModel costs)."""

    def __init__(
        self, snap: ClusterSnapshot, profile: Profile = DEFAULT_PROFILE, order: str = "size"
    ) -> None:
        self.snap = snap
        self.order_name = order
        self.profile = profile
        self.st = PlanState(snap, profile)
        self.filters: list[Filter] = [FILTERS[f]() for f in profile.filters]
        self.pre_filters = [f for f in self.filters if f.name != "fits_memory"]
        self.scorers: list[tuple[Scorer, float]] = [
            (SCORERS[s](), w) for s, w in profile.scorers.items() if w > 0
        ]
        self.order = VICTIM_ORDERS[profile.eviction]
        self.weight_sum = sum(w for _s, w in self.scorers) or 1.0
        self.evictions: list[tuple[str, str]] = []
        self.shed: list[tuple[str, str]] = []
        self.evicted: set[str] = set()
        self.decisions: dict[str, ModelDecision] = {}
        self._sweep: tuple[dict[str, Rejection], list[tuple[str, float]]] = ({}, [])
        self.moves = 0
        self.full = False  # a full re-plan: nothing was placed before this round

    # --- the round ---------------------------------------------------------------------------

    def run(self) -> Plan:
        st, snap = self.st, self.snap
        self._keep_current()
        # Surplus replicas go first from the fullest node.
        for m in st.models.values():
            while st.count[m.name] > m.wanted:
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
                st.unbind(victim, st.dev_node[d])
                self.evictions.append((victim, st.dev_node[d]))
                self.shed.append((victim, st.dev_node[d]))
                self.evicted.add(victim)
        self.evicted.update(m for m, _ in self.evictions)
        full = self.full = not any(snap.current.values())
        for m in sorted(st.models.values(), key=self._order_key):
            self._place_model(m)
        if full and self.profile.consolidate:
            self._consolidate()
        # Victims placed nowhere else get a decision saying so.
        for victim, node_id in self.evictions:
            dec = self.decisions.get(victim)
            if dec is not None and st.count[victim] < st.models[victim].wanted:
                why = f"evicted from {node_id} for a model that needed the room; no room elsewhere"
                self.decisions[victim] = ModelDecision(victim, dec.placed_on, dec.verdicts, why)
        return self.plan()

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
        assignments = {n: frozenset(ms) for n, ms in st.node_models.items() if ms}
        devices = {k: tuple(st.dev_id[d] for d in v) for k, v in st.placed.items()}
        offloads = _demote(self.snap, st.models, assignments, self.evictions, st.count)
        return Plan(
            assignments,
            dict(self.decisions),
            tuple(self.evictions),
            offloads,
            devices,
            self.moves,
            tuple(self.shed),
        )

    def add_model(self, m: ModelView) -> ModelDecision:
        """Places a model that was not in the snapshot (incremental placement)."""
        self.st.models[m.name] = m
        self.st.count.setdefault(m.name, 0)
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
                if len(st.node_devices[node_id]) < m.gpus:
                    continue  # a gang can no longer fit this node: placed again elsewhere
                st.bind(m, node_id, self._kept_devices(m, node_id))

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
        st = self.st
        verdicts: tuple[Verdict, ...] = ()
        reason, unresolvable = "", False
        small = len(st.nodes) <= self.profile.explain_nodes
        searched = False
        while st.count[m.name] < m.wanted:
            if small:  # what Explain shows: every node as this replica saw it
                verdicts = self._verdicts(m)
            chosen = self._choose(m)
            if chosen is None and self.full:
                chosen = self._relocate_for(m)
            if chosen is None:
                chosen = self._evict_for(m) if m.name not in self.evicted else None
            if chosen is None:
                verdicts = self._verdicts(m)
                reason, unresolvable = self._why_not(m, verdicts)
                break
            searched = True
            if verdicts and chosen[0] not in {v.node_id for v in verdicts if v.feasible}:
                verdicts = self._mark_evictions(verdicts, chosen[0], m)
            node_id, devices, _score = chosen
            st.bind(m, node_id, devices)
            self.moves += 1
        if searched and not small and not reason:
            verdicts = self._sweep_verdicts(m)
        placed = tuple(sorted(st.model_nodes.get(m.name, ())))
        self.decisions[m.name] = ModelDecision(m.name, placed, verdicts, reason, unresolvable)

    # --- filter and score --------------------------------------------------------------------

    def _rejects(self, m: ModelView, node_id: str, filters: Iterable[Filter]) -> Rejection | None:
        node = self.st.nodes[node_id]
        for f in filters:
            r = f.check(m, node, self.st)
            if r is not None:
                return r
        return None

    def _score(self, m: ModelView, node_id: str, devices: tuple[int, ...]) -> dict[str, float]:
        node = self.st.nodes[node_id]
        return {s.name: s.score(m, node, devices, self.st) for s, _w in self.scorers}

    def _total(self, scores: Mapping[str, float]) -> float:
        return sum(scores[s.name] * w for s, w in self.scorers) / self.weight_sum

    def _weighted(self, m: ModelView, node_id: str, devices: tuple[int, ...]) -> float:
        node, st = self.st.nodes[node_id], self.st
        total = 0.0
        for s, w in self.scorers:
            total += s.score(m, node, devices, st) * w
        return total / self.weight_sum

    def _choose(self, m: ModelView) -> tuple[str, tuple[int, ...], float] | None:
        """Up to `candidates` feasible nodes from the free-memory index, scored; the best."""
        st = self.st
        share = m.per_device_bytes
        spread = st.strategy_of(m) == "spread"
        passes: dict[str, bool] = {}
        rejected: dict[str, Rejection] = {}
        found: list[tuple[str, tuple[int, ...]]] = []
        k = self.profile.candidates
        # binpack: the tightest fits (used devices), then the largest free devices (a new device
        # is best opened large); spread: the most free first.
        sweeps = [(True, k)] if spread else [(False, k), (True, max(1, k // 2))]
        for reverse, limit in sweeps:
            hits: dict[str, list[int]] = {}
            got = 0
            for _free, d in st.index.irange((share, -1), None, reverse=reverse):
                if (m.gpu_types and not st.allowed(m, d)) or not st.compute_ok(m, d):
                    continue
                node_id = st.dev_node[d]
                ok = passes.get(node_id)
                if ok is None:
                    why = self._rejects(m, node_id, self.pre_filters)
                    ok = passes[node_id] = why is None
                    if why is not None and len(rejected) < 4:
                        rejected[node_id] = why
                if not ok:
                    continue
                devs = hits.setdefault(node_id, [])
                if len(devs) == m.gpus:
                    continue
                devs.append(d)
                if len(devs) == m.gpus:
                    cand = (node_id, tuple(sorted(devs)))
                    if cand not in found:
                        found.append(cand)
                    got += 1
                    if got >= limit:
                        break
        # Locality: nodes that hold this model offloaded are always candidates.
        have = {n for n, _ in found}
        for node_id, held in self.snap.offloaded.items():
            if (
                m.name in held
                and node_id in st.nodes
                and node_id not in have
                and self._rejects(m, node_id, self.pre_filters) is None
            ):
                devs_t = st.best_devices(m, node_id)
                if devs_t is not None and not st.nodes[node_id].draining:
                    found.append((node_id, devs_t))
        if not found:
            return None
        best: tuple[str, tuple[int, ...], float] | None = None
        scored: list[tuple[str, float]] = []
        self._sweep = (rejected, scored)
        for rank, (node_id, devs_t) in enumerate(found):
            total = self._weighted(m, node_id, devs_t)
            scored.append((node_id, total))
            # Ties keep index order (best fit first) for determinism.
            if best is None or total > best[2] + 1e-12 * (rank + 1):
                best = (node_id, devs_t, total)
        return best

    # --- eviction ----------------------------------------------------------------------------

    def _evict_for(self, m: ModelView) -> tuple[str, tuple[int, ...], float] | None:
        st = self.st
        share = m.per_device_bytes
        best_key: tuple[object, ...] | None = None
        best: tuple[str, tuple[int, ...], list[str]] | None = None
        for node_id, node in st.nodes.items():
            if node.draining or self._rejects(m, node_id, self.pre_filters) is not None:
                continue
            options: list[tuple[tuple[float, ...], list[str], int]] = []
            for d in st.node_devices[node_id]:
                if not st.allowed(m, d) or st.capacity[d] < share:
                    continue
                room, chosen = st.free[d], []
                load = st.load[d]
                cap = st.throughput[d] * self.profile.compute_target
                victims = sorted(
                    (
                        st.models[x]
                        for x in st.dev_models[d]
                        if may_evict(st.models[x], m, st.count[x])
                    ),
                    key=lambda v: (
                        *self.order(v, self._wait_tier(v, node), self.profile.reload),
                        v.name,
                    ),
                )
                for v in victims:
                    if room >= share and (not cap or load + m.per_device_load <= cap):
                        break
                    chosen.append(v.name)
                    room += v.per_device_bytes
                    load -= v.per_device_load
                if room >= share and (not cap or load + m.per_device_load <= cap):
                    options.append((self._victims_cost(chosen, node), chosen, d))
            if len(options) < m.gpus:
                continue
            options.sort(key=lambda o: (o[0], o[2]))
            take = options[: m.gpus]
            victims_all = sorted({v for o in take for v in o[1]})
            if not victims_all:
                continue  # it fits without eviction: _choose handles that
            tier = self.snap.offloaded.get(node_id, {}).get(m.name, 0)
            key = (self._victims_cost(victims_all, node, m, tier), tier == 0, node_id)
            if best_key is None or key < best_key:
                best_key, best = key, (node_id, tuple(sorted(o[2] for o in take)), victims_all)
        if best is None:
            return None
        node_id, devices, victims_all = best
        for name in victims_all:
            st.unbind(name, node_id)
            self.evictions.append((name, node_id))
            self.evicted.add(name)
        # A victim's other devices freed room too; re-pick the best devices on the node.
        devices = st.best_devices(m, node_id) or devices
        return node_id, devices, 0.0

    def _wait_tier(self, v: ModelView, node: NodeView) -> int:
        return HOST if node.host_capacity_bytes >= v.need_bytes else DISK

    def _victims_cost(
        self,
        victims: list[str],
        node: NodeView,
        asker: ModelView | None = None,
        asker_tier: int = 0,
    ) -> tuple[float, ...]:
        """lru: (victims, their priorities). cost_aware: (highest victim priority, expected
        reload cost = reload seconds from where each victim will wait x its request rate, plus
        the asker's own load time on this node (a restore from CPU RAM beats a load from the
        source) as if one request/s waited for it, victims)."""
        ms = [self.st.models[v] for v in victims]
        if self.profile.eviction == "lru":
            return (float(len(ms)), float(sum(v.priority for v in ms)))
        reload = self.profile.reload
        cost = sum(
            reload.seconds(v.need_bytes, self._wait_tier(v, node)) * v.request_rate for v in ms
        )
        if asker is not None:
            cost += reload.seconds(asker.need_bytes, asker_tier) * max(asker.request_rate, 1.0)
        return (float(max((v.priority for v in ms), default=0)), cost, float(len(ms)))

    # --- explain -----------------------------------------------------------------------------

    def _verdicts(self, m: ModelView) -> tuple[Verdict, ...]:
        st = self.st
        out = []
        for node_id in st.nodes:
            free = st.free_on(node_id)
            r = self._rejects(m, node_id, self.filters)
            if r is not None:
                out.append(
                    Verdict(
                        node_id,
                        False,
                        r.reason,
                        free_bytes=free,
                        filter=r.filter,
                        unresolvable=r.code == UNRESOLVABLE,
                    )
                )
                continue
            devices = st.best_devices(m, node_id) or ()
            scores = self._score(m, node_id, devices)
            out.append(
                Verdict(
                    node_id,
                    True,
                    f"fits: {mib(free)} free",
                    round(self._total(scores), 4),
                    free,
                    scores={k: round(v, 4) for k, v in scores.items()},
                )
            )
        return tuple(out)

    def _sweep_verdicts(self, m: ModelView) -> tuple[Verdict, ...]:
        """Large fleets: the nodes the last search met (rejected on the way, then scored)."""
        rejected, scored = self._sweep
        out = [
            Verdict(n, False, r.reason, filter=r.filter, unresolvable=r.code == UNRESOLVABLE)
            for n, r in rejected.items()
        ]
        out += [Verdict(n, True, "scored candidate", round(t, 4)) for n, t in scored]
        return tuple(out)

    def _mark_evictions(
        self, verdicts: tuple[Verdict, ...], node_id: str, m: ModelView
    ) -> tuple[Verdict, ...]:
        """The node chosen by eviction: its verdict says whom it evicts."""
        evicted = tuple(v for v, n in self.evictions if n == node_id)
        return tuple(
            Verdict(
                v.node_id,
                True,
                f"fits after evicting {', '.join(evicted)} ({self.profile.eviction})",
                v.score,
                v.free_bytes,
                evicted,
                scores=v.scores,
            )
            if v.node_id == node_id
            else v
            for v in verdicts
        )

    def _why_not(self, m: ModelView, verdicts: tuple[Verdict, ...]) -> tuple[str, bool]:
        if not verdicts:
            return "no live node", True
        if all(v.unresolvable for v in verdicts if not v.feasible):
            if all(v.filter == "fits_memory" for v in verdicts):
                what = (
                    f"{m.gpus} devices of {mib(m.per_device_bytes)}"
                    if m.gpus > 1
                    else mib(m.need_bytes)
                )
                return f"needs {what}; no node is that large (unresolvable)", True
            return "no node can take it, even after evictions (unresolvable): " + "; ".join(
                f"{v.node_id}: {v.reason}" for v in verdicts
            ), True
        return "no node has room, even after evicting: " + "; ".join(
            f"{v.node_id}: {v.reason}" for v in verdicts
        ), False

    # --- consolidation (full re-plans only) --------------------------------------------------

    def _consolidate(self) -> None:
        """Empty the least-used devices when everything on them fits on the other used devices."""
        st = self.st
        for _ in range(len(st.capacity)):
            used = [d for d in range(len(st.capacity)) if st.dev_models[d]]
            progress = False
            for d in sorted(used, key=lambda d: (st.capacity[d] - st.free[d], d)):
                if self._try_empty(d):
                    progress = True
                    break
            if not progress:
                return

    def _try_empty(self, d: int) -> bool:
        """Moves every model off device ``d`` into other used devices, or changes nothing."""
        st = self.st
        node_id = st.dev_node[d]
        movers = sorted(st.dev_models[d], key=lambda x: (-st.models[x].need_bytes, x))
        if any(st.models[x].gpus > 1 or st.strategy_of(st.models[x]) == "spread" for x in movers):
            return False  # gangs stay where they are; spread models were spread on purpose
        moved: list[tuple[ModelView, int]] = []
        for x in movers:
            m = st.models[x]
            st.unbind(x, node_id)
            target = self._consolidation_target(m, d)
            if target is None:
                st.bind(m, node_id, (d,))
                for y, to in reversed(moved):  # undo
                    st.unbind(y.name, st.dev_node[to])
                    st.bind(y, node_id, (d,))
                return False
            st.bind(m, st.dev_node[target], (target,))
            moved.append((m, target))
        return True

    def _relocate_for(self, m: ModelView) -> tuple[str, tuple[int, ...], float] | None:
        """Full re-plans: room for ``m`` on one device by moving single-device models elsewhere
        (never evicting); the device needing the fewest bytes moved is tried first."""
        st = self.st
        share = m.per_device_bytes
        if m.gpus > 1:
            return None
        options = []
        for node_id, node in st.nodes.items():
            if node.draining or self._rejects(m, node_id, self.pre_filters) is not None:
                continue
            for d in st.node_devices[node_id]:
                if st.allowed(m, d) and st.capacity[d] >= share:
                    options.append((share - st.free[d], d))
        options.sort()
        for _missing, d in options[:RELOCATE_TRIES]:
            node_id = st.dev_node[d]
            moved: list[tuple[ModelView, tuple[int, ...], str, tuple[int, ...]]] = []
            movers = sorted(
                (st.models[x] for x in st.dev_models[d]), key=lambda x: (x.need_bytes, x.name)
            )
            for x in movers:
                if st.free[d] >= share:
                    break
                old = st.placed[(x.name, node_id)]
                st.unbind(x.name, node_id)
                target = self._elsewhere(x, d)
                if target is None:
                    st.bind(x, node_id, old)
                    continue
                st.bind(x, target[0], target[1])
                moved.append((x, old, target[0], target[1]))
            if st.free[d] >= share:
                return node_id, (d,), 0.0
            for x, old, new_node, _new in reversed(moved):  # undo
                st.unbind(x.name, new_node)
                st.bind(x, node_id, old)
        return None

    def _elsewhere(self, x: ModelView, hidden: int) -> tuple[str, tuple[int, ...]] | None:
        """Where ``x`` would go now if device ``hidden`` were not there."""
        st = self.st
        saved = st.free[hidden]
        st._set_free(hidden, -1)
        try:
            chosen = self._choose(x)
        finally:
            st._set_free(hidden, saved)
        return (chosen[0], chosen[1]) if chosen is not None else None

    def _consolidation_target(
        self, m: ModelView, source: int, used_only: bool = True
    ) -> int | None:
        """A device (used ones only, unless told) other than ``source`` with room, on a node that
        passes the filters; the tightest fit."""
        st = self.st
        share = m.per_device_bytes
        for _free, d in st.index.irange((share, -1), None):
            if d == source or (used_only and not st.dev_models[d]) or not st.fits(m, d):
                continue
            if self._rejects(m, st.dev_node[d], self.pre_filters) is None:
                return int(d)
        return None


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


def _demote(
    snap: ClusterSnapshot,
    models: Mapping[str, ModelView],
    assign: Mapping[str, frozenset[str]],
    evictions: list[tuple[str, str]],
    count: Mapping[str, int],
) -> dict[str, dict[str, int]]:
    """Where models off the device wait. Evicted (or already offloaded) models that are still
    wanted: CPU RAM while the node's host budget allows, else disk; victims of this round first,
    then older ones. Models scaled to zero: CPU RAM only, with what budget is left (their next
    request restores in well under a second instead of loading from the source), else nothing."""
    alive = {n.node_id: n for n in snap.nodes}
    waiting = sorted((m, n) for n, ms in snap.offloaded.items() for m in ms)
    idle = sorted(
        (m, n)
        for n, ms in snap.current.items()
        for m in ms
        if m in models and models[m].wanted == 0
    )
    out: dict[str, dict[str, int]] = {}
    host_used: dict[str, int] = {}

    def room(node: NodeView, m: ModelView) -> bool:
        return host_used.get(node.node_id, 0) + m.need_bytes <= node.host_capacity_bytes

    for model, node_id in [*evictions, *waiting]:
        m = models.get(model)
        node = alive.get(node_id)
        if m is None or node is None or m.wanted == 0 or model in out.get(node_id, {}):
            continue  # gone, dead node, scaled to zero (below), or already decided
        if model in assign.get(node_id, frozenset()) or count.get(model, 0) >= m.wanted:
            continue  # on the device here, or enough replicas elsewhere
        tier = HOST if room(node, m) else DISK
        out.setdefault(node_id, {})[model] = tier
        if tier == HOST:
            host_used[node_id] = host_used.get(node_id, 0) + m.need_bytes
    for model, node_id in [*idle, *waiting]:
        m = models.get(model)
        node = alive.get(node_id)
        if m is None or node is None or m.wanted > 0 or model in out.get(node_id, {}):
            continue
        if snap.offloaded.get(node_id, {}).get(model, HOST) == HOST and room(node, m):
            out.setdefault(node_id, {})[model] = HOST
            host_used[node_id] = host_used.get(node_id, 0) + m.need_bytes
    return out
