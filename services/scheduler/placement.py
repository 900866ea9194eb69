"""Placement and eviction as a pure function of a snapshot (STYLE: no I/O, no clock, no randomness).

Policy (issue 3's skeleton; issue 5 turns it into a plugin pipeline):
- keep what is placed while its node is alive, not draining, and the model still wants it
  (plans are incremental: nothing moves without a reason);
- place missing replicas first-fit-decreasing: models by priority, then by memory need
  (weights + KV headroom + overhead), largest first; nodes in a stable order;
- anti-affinity: at most one replica of a model per node;
- when no node has room, evict: victims are models of lower priority, or of equal priority that
  are above their ``min_replicas`` and were used less recently (LRU); the node needing the fewest
  evictions wins. A model evicted in this round is not placed again by evicting others in the same
  round, so two models cannot evict each other back and forth;
- an evicted model that is still wanted is demoted, not discarded: to CPU RAM on its node while
  the node's host budget allows, else to local disk; a model is placed first on a node that holds
  it offloaded (restoring beats loading from the source). Models scaled to zero go away entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

OVERHEAD_FRACTION = 0.15  # seed: runtime overhead on top of weights + KV headroom
HOST, DISK = 2, 3  # meshserve.v1.Tier values (this module stays free of protobuf)


@dataclass(frozen=True)
class NodeView:
    node_id: str
    capacity_bytes: int  # memory offered to models
    draining: bool = False
    host_capacity_bytes: int = 0  # CPU RAM offered to offloaded models


@dataclass(frozen=True)
class ModelView:
    name: str
    need_bytes: int  # memory one replica takes: weights + KV headroom + overhead
    wanted: int  # replicas wanted now (min_replicas, or 1 while in demand)
    min_replicas: int = 0
    priority: int = 2  # meshserve.v1.Priority; higher wins
    last_used: float = 0.0  # s since the epoch of the last request; 0 = never


@dataclass(frozen=True)
class ClusterSnapshot:
    nodes: tuple[NodeView, ...]
    models: tuple[ModelView, ...]
    current: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node → models placed
    failed: frozenset[tuple[str, str]] = frozenset()  # (model, node) whose replica FAILED
    offloaded: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # node → model → tier


@dataclass(frozen=True)
class Verdict:
    node_id: str
    feasible: bool
    reason: str
    score: float = 0.0  # in [0, 1]: fraction of the node used after placing; higher packs tighter
    free_bytes: int = 0
    evicts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelDecision:
    model: str
    placed_on: tuple[str, ...]
    verdicts: tuple[Verdict, ...] = ()  # from the last replica placed or attempted this round
    unschedulable: str = ""  # why a wanted replica could not be placed


@dataclass(frozen=True)
class Plan:
    assignments: Mapping[str, frozenset[str]]  # node → models on the device
    decisions: Mapping[str, ModelDecision]
    evictions: tuple[tuple[str, str], ...] = ()  # (model, node) removed to make room
    offloads: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # node → model → tier


def need_bytes(memory: int, kv_headroom: int, overhead: float = OVERHEAD_FRACTION) -> int:
    return round((memory + kv_headroom) * (1.0 + overhead))


def wanted_replicas(min_replicas: int, max_replicas: int, in_demand: bool) -> int:
    wanted = max(min_replicas, 1 if in_demand else 0)
    return min(wanted, max_replicas) if max_replicas else wanted


def place(snap: ClusterSnapshot) -> Plan:
    """Filter every node, pick the first that fits, evict when none does. Deterministic."""
    models = {m.name: m for m in snap.models}
    nodes = sorted(snap.nodes, key=lambda n: n.node_id)
    held_offloaded = {(m, n) for n, ms in snap.offloaded.items() for m in ms}
    usable = {n.node_id: n for n in nodes if not n.draining}
    assign: dict[str, set[str]] = {n.node_id: set() for n in nodes}
    for node_id, held in snap.current.items():
        if node_id in usable:
            assign[node_id] = {
                m
                for m in held
                if m in models and models[m].wanted > 0 and (m, node_id) not in snap.failed
            }

    def used(node_id: str) -> int:
        return sum(models[m].need_bytes for m in assign[node_id])

    def count(model: str) -> int:
        return sum(model in held for held in assign.values())

    evictions: list[tuple[str, str]] = []
    # Surplus replicas go first from the fullest node.
    for m in models.values():
        while count(m.name) > m.wanted:
            holders = [n for n in assign if m.name in assign[n]]
            victim = max(holders, key=lambda n: (used(n), n))
            assign[victim].discard(m.name)
    # A node that shrank below what it holds sheds its least valuable models.
    for node_id in usable:
        while used(node_id) > usable[node_id].capacity_bytes and assign[node_id]:
            victim = min(
                assign[node_id], key=lambda x: (models[x].priority, models[x].last_used, x)
            )
            assign[node_id].discard(victim)
            evictions.append((victim, node_id))

    decisions: dict[str, ModelDecision] = {}
    evicted: set[str] = {m for m, _ in evictions}
    order = sorted(models.values(), key=lambda m: (-m.priority, -m.need_bytes, m.name))
    for m in order:
        verdicts: tuple[Verdict, ...] = ()
        reason = ""
        while count(m.name) < m.wanted:
            verdicts = tuple(
                _verdict(m, n, assign, models, snap.failed, allow_evict=m.name not in evicted)
                for n in nodes
            )
            fits = [v for v in verdicts if v.feasible and not v.evicts]
            with_eviction = [v for v in verdicts if v.feasible and v.evicts]
            # Locality: a node holding the model offloaded restores it instead of loading it.
            fits.sort(key=lambda v: (m.name, v.node_id) not in held_offloaded)
            if fits:
                chosen = fits[0]  # first fit (local first)
            elif with_eviction:
                chosen = min(
                    with_eviction,
                    key=lambda v: (
                        len(v.evicts),
                        sum(models[x].priority for x in v.evicts),
                        (m.name, v.node_id) not in held_offloaded,
                        v.node_id,
                    ),
                )
                for victim in chosen.evicts:
                    assign[chosen.node_id].discard(victim)
                    evictions.append((victim, chosen.node_id))
                    evicted.add(victim)
            else:
                reason = _unschedulable_reason(m, verdicts)
                break
            assign[chosen.node_id].add(m.name)
        placed = tuple(n for n in sorted(assign) if m.name in assign[n])
        decisions[m.name] = ModelDecision(m.name, placed, verdicts, reason)
    # Victims placed nowhere else get a decision saying so.
    for victim, node_id in evictions:
        d = decisions.get(victim)
        if d is not None and count(victim) < models[victim].wanted:
            why = (
                f"evicted from {node_id} for a model that needed the room; no free space elsewhere"
            )
            decisions[victim] = ModelDecision(victim, d.placed_on, d.verdicts, why)
    offloads = _demote(snap, models, assign, evictions, count)
    return Plan(
        {n: frozenset(ms) for n, ms in assign.items() if ms}, decisions, tuple(evictions), offloads
    )


def _demote(
    snap: ClusterSnapshot,
    models: Mapping[str, ModelView],
    assign: Mapping[str, set[str]],
    evictions: list[tuple[str, str]],
    count: Callable[[str], int],
) -> dict[str, dict[str, int]]:
    """Where evicted (or already offloaded) models that are still wanted wait: CPU RAM while the
    node's host budget allows, else disk. Victims of this round first, then older ones."""
    alive = {n.node_id: n for n in snap.nodes}
    candidates = list(evictions) + sorted((m, n) for n, ms in snap.offloaded.items() for m in ms)
    out: dict[str, dict[str, int]] = {}
    host_used: dict[str, int] = {}
    for model, node_id in candidates:
        m = models.get(model)
        node = alive.get(node_id)
        if m is None or node is None or m.wanted == 0 or model in out.get(node_id, {}):
            continue  # gone, dead node, scaled to zero, or already decided
        if model in assign.get(node_id, set()) or count(model) >= m.wanted:
            continue  # on the device here, or enough replicas elsewhere
        used = host_used.get(node_id, 0)
        if used + m.need_bytes <= node.host_capacity_bytes:
            out.setdefault(node_id, {})[model] = HOST
            host_used[node_id] = used + m.need_bytes
        else:
            out.setdefault(node_id, {})[model] = DISK
    return out


def _verdict(
    m: ModelView,
    node: NodeView,
    assign: Mapping[str, set[str]],
    models: Mapping[str, ModelView],
    failed: frozenset[tuple[str, str]],
    allow_evict: bool,
) -> Verdict:
    held = assign.get(node.node_id, set())
    free = node.capacity_bytes - sum(models[x].need_bytes for x in held)
    if node.draining:
        return Verdict(node.node_id, False, "node is draining", free_bytes=free)
    if m.name in held:
        return Verdict(
            node.node_id, False, "anti-affinity: already holds a replica", free_bytes=free
        )
    if (m.name, node.node_id) in failed:
        return Verdict(node.node_id, False, "replica failed here", free_bytes=free)
    if m.need_bytes > node.capacity_bytes:
        return Verdict(
            node.node_id,
            False,
            f"needs {_mb(m.need_bytes)}, node offers {_mb(node.capacity_bytes)} in all",
            free_bytes=free,
        )
    if m.need_bytes <= free:
        score = (node.capacity_bytes - free + m.need_bytes) / node.capacity_bytes
        return Verdict(node.node_id, True, f"fits: {_mb(free)} free", round(score, 4), free)
    if not allow_evict:
        return Verdict(
            node.node_id, False, f"needs {_mb(m.need_bytes)}, {_mb(free)} free", free_bytes=free
        )
    victims = sorted(
        (models[x] for x in held if _evictable(models[x], m, assign)),
        key=lambda v: (v.priority, v.last_used, v.name),
    )
    chosen: list[str] = []
    room = free
    for v in victims:
        if room >= m.need_bytes:
            break
        chosen.append(v.name)
        room += v.need_bytes
    if room < m.need_bytes:
        return Verdict(
            node.node_id,
            False,
            f"needs {_mb(m.need_bytes)}, {_mb(free)} free and only {_mb(room - free)} evictable",
            free_bytes=free,
        )
    score = (node.capacity_bytes - room + m.need_bytes) / node.capacity_bytes
    return Verdict(
        node.node_id,
        True,
        f"fits after evicting {', '.join(chosen)} (least recently used)",
        round(score, 4),
        free,
        tuple(chosen),
    )


def _evictable(victim: ModelView, for_model: ModelView, assign: Mapping[str, set[str]]) -> bool:
    """Lower priority always yields; equal priority yields only a replica above its min_replicas
    that was used less recently than the model asking."""
    if victim.name == for_model.name or victim.priority > for_model.priority:
        return False
    if victim.priority < for_model.priority:
        return True
    replicas = sum(victim.name in held for held in assign.values())
    return replicas > victim.min_replicas and victim.last_used < for_model.last_used


def _unschedulable_reason(m: ModelView, verdicts: tuple[Verdict, ...]) -> str:
    if not verdicts:
        return "no live node"
    if all(m.need_bytes > 0 and "in all" in v.reason for v in verdicts):
        return f"needs {_mb(m.need_bytes)}; no node is that large (unresolvable)"
    return "no node has room, even after evicting: " + "; ".join(
        f"{v.node_id}: {v.reason}" for v in verdicts
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
