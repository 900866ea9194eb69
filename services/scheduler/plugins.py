"""Placement plugins (STYLE: the Kubernetes scheduling framework's extension points, one small pure
object each). Filters say whether a node can take a replica; scorers rank the nodes that can, each
in [0, 1] with a one-line formula; victim orders decide whom eviction removes first.

Filter outcomes follow Kubernetes: UNSCHEDULABLE (evicting something could help: memory) and
UNRESOLVABLE (it cannot: draining, labels, anti-affinity, a device too small in all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meshserve.scheduler.state import DEGRADED, FAILED, PlanState
from meshserve.scheduler.views import DISK, HOST, ModelView, NodeView, mib, type_ok
from meshserve.weights import DISK_BYTES_PER_S, HOST_BYTES_PER_S

UNSCHEDULABLE, UNRESOLVABLE = 1, 2


@dataclass(frozen=True)
class Rejection:
    filter: str
    code: int  # UNSCHEDULABLE or UNRESOLVABLE
    reason: str


class Filter(Protocol):
    name: str

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None: ...


class Scorer(Protocol):
    name: str

    def score(self, m: ModelView, node: NodeView, devices: tuple[int, ...], st: PlanState) -> float:
        """In [0, 1]; higher is better."""

    def uniform(self, m: ModelView, st: PlanState) -> float | None:
        """The score every candidate would get for ``m`` now, where that is known without
        looking at them (the pipeline then skips ``score``: rounds call it ~100,000 times on a
        large fleet); None when candidates may differ."""


# --- filters --------------------------------------------------------------------------------


class NodeDraining:
    """Rejects draining nodes (unresolvable for this round)."""

    name = "node_draining"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        if node.draining:
            return Rejection(self.name, UNRESOLVABLE, "node is draining")
        if node.cordon:
            why = f"node is {node.cordon}ed (meshserve node uncordon {node.node_id})"
            return Rejection(self.name, UNRESOLVABLE, why)
        return None


class NodeSelector:
    """Node labels must match the model's node_selector; its GPU type must be one of the model's
    gpu_types (when it names any)."""

    name = "node_selector"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        for key, want in m.node_selector.items():
            if node.labels.get(key) != want:
                return Rejection(self.name, UNRESOLVABLE, f"label {key}={want} not on node")
        if m.gpu_types and not any(type_ok(m.gpu_types, d.gpu_type) for d in node.all_devices()):
            return Rejection(
                self.name, UNRESOLVABLE, f"no GPU of type {'/'.join(sorted(m.gpu_types))}"
            )
        return None


class AntiAffinity:
    """At most one replica of a model per node."""

    name = "anti_affinity"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        if m.name in st.node_models[node.node_id]:
            return Rejection(self.name, UNRESOLVABLE, "anti-affinity: already holds a replica")
        if (m.name, node.node_id) in st.leaving:
            return Rejection(self.name, UNRESOLVABLE, "anti-affinity: its replica here is moving")
        return None


class FailedHere:
    """A node where the model's replica FAILED is avoided until it is retried elsewhere."""

    name = "failed_here"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        if (m.name, node.node_id) in st.failed:
            return Rejection(self.name, UNRESOLVABLE, "replica failed here")
        return None


class GpuHealthy:
    """The node has ``gpus`` devices its agent does not judge FAILED (lost, uncorrectable memory
    errors, fatal Xids, engines dying on them: nodeagent/gpu_health.py)."""

    name = "gpu_unhealthy"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        devices = st.node_devices[node.node_id]
        failed = [d for d in devices if st.dev_health[d] == FAILED]
        if failed and len(devices) - len(failed) < m.gpus:
            sick = next(x for x in node.all_devices() if x.health == FAILED)
            why = "; ".join(sick.health_reasons) or "FAILED"
            return Rejection(
                self.name,
                UNRESOLVABLE,
                f"{len(failed)} of its {len(devices)} GPUs FAILED ({sick.device_id}: {why}; "
                f"meshserve node uncordon {node.node_id} --device UUID once repaired)",
            )
        return None


class FitsMemory:
    """The node has ``gpus`` devices (of an allowed type, a MIG slice counts as one) each with
    need/gpus bytes free: weights + KV headroom + overhead, a gang all on one node."""

    name = "fits_memory"

    def check(self, m: ModelView, node: NodeView, st: PlanState) -> Rejection | None:
        share = m.per_device_bytes
        usable = [d for d in st.node_devices[node.node_id] if st.allowed(m, d)]
        busy = [d for d in usable if st.free[d] >= share and not st.compute_ok(m, d)]
        big = [d for d in usable if st.capacity[d] >= share]
        if len(big) < m.gpus:
            what = f"{m.gpus} devices of {mib(share)}" if m.gpus > 1 else mib(share)
            largest = max((st.capacity[d] for d in usable), default=0)
            return Rejection(
                self.name,
                UNRESOLVABLE,
                f"needs {what}, node offers {len(big)} such (largest {mib(largest)}) in all",
            )
        free = sorted((st.free[d] for d in big if st.compute_ok(m, d)), reverse=True)
        if busy and len(free) < m.gpus:
            return Rejection(
                self.name,
                UNSCHEDULABLE,
                f"memory fits but {len(busy)} device(s) are busy: their expected load would pass "
                f"{st.compute_target:.0%} of their throughput",
            )
        if len(free) < m.gpus or free[m.gpus - 1] < share:
            if m.gpus == 1:
                why = f"needs {mib(share)}, {mib(max(free, default=0))} free"
            else:
                have = sum(1 for f in free if f >= share)
                why = f"needs {m.gpus} devices with {mib(share)} free, {have} have it"
            return Rejection(self.name, UNSCHEDULABLE, why)
        return None


FILTERS: Mapping[str, Callable[[], Filter]] = {
    "node_draining": NodeDraining,
    "node_selector": NodeSelector,
    "anti_affinity": AntiAffinity,
    "failed_here": FailedHere,
    "gpu_unhealthy": GpuHealthy,
    "fits_memory": FitsMemory,
}


# --- scorers --------------------------------------------------------------------------------


def _fill_after(m: ModelView, devices: tuple[int, ...], st: PlanState) -> float:
    if len(devices) == 1:
        d = devices[0]
        return (st.capacity[d] - st.free[d] + m.per_device_bytes) / max(1, st.capacity[d])
    used = sum(st.capacity[d] - st.free[d] + m.per_device_bytes for d in devices)
    return used / max(1, sum(st.capacity[d] for d in devices))


class BinPack:
    """binpack: score = 0.5 + 0.5 x fill after placing on devices already in use (best fit), else
    0.5 x capacity / the largest device's (open the largest device first: fewest devices in all);
    spread: score = 1 - fill after placing."""

    name = "fit"

    def score(self, m: ModelView, node: NodeView, devices: tuple[int, ...], st: PlanState) -> float:
        fill = _fill_after(m, devices, st)
        if st.strategy_of(m) == "spread":
            return 1.0 - fill
        if all(st.dev_models[d] for d in devices):
            return 0.5 + 0.5 * fill
        return 0.5 * min(st.capacity[d] for d in devices) / st.largest_device

    def uniform(self, m: ModelView, st: PlanState) -> float | None:
        return None


class Locality:
    """score = 1 where the node holds the model in CPU RAM, 0.5 on its disk, 0.25 where its
    artifact cache holds the model's registry revision (no download), else 0 (a restore beats a
    load from local files, which beats a download)."""

    name = "locality"

    def score(self, m: ModelView, node: NodeView, devices: tuple[int, ...], st: PlanState) -> float:
        tier = st.offloaded.get(node.node_id, {}).get(m.name)
        if tier == HOST:
            return 1.0
        if tier == DISK:
            return 0.5
        return 0.25 if m.revision and m.revision in node.cached else 0.0

    def uniform(self, m: ModelView, st: PlanState) -> float | None:
        if m.revision or any(m.name in held for held in st.offloaded.values()):
            return None
        return 0.0


class PriorityShelter:
    """score = 1 - share of the node's memory held by models of higher priority (they cannot be
    evicted for this one, so a node full of them is a worse home when demand grows)."""

    name = "priority"

    def score(self, m: ModelView, node: NodeView, devices: tuple[int, ...], st: PlanState) -> float:
        by_priority = st.node_priority_bytes[node.node_id]
        higher = sum(b for p, b in by_priority.items() if p > m.priority) if by_priority else 0
        return 1.0 - min(1.0, higher / (st.node_capacity[node.node_id] or 1))

    def uniform(self, m: ModelView, st: PlanState) -> float | None:
        return None


class DeviceHealthScore:
    """score = 1 - share of the chosen devices that are DEGRADED (throttled, a narrow link,
    waiting for a reset): such devices are taken last."""

    name = "gpu_health"

    def score(self, m: ModelView, node: NodeView, devices: tuple[int, ...], st: PlanState) -> float:
        return 1.0 - sum(st.dev_health[d] == DEGRADED for d in devices) / max(1, len(devices))

    def uniform(self, m: ModelView, st: PlanState) -> float | None:
        return None if st.any_degraded else 1.0


SCORERS: Mapping[str, Callable[[], Scorer]] = {
    "fit": BinPack,
    "locality": Locality,
    "priority": PriorityShelter,
    "gpu_health": DeviceHealthScore,
}


# --- eviction -------------------------------------------------------------------------------


def may_evict(victim: ModelView, for_model: ModelView, replicas: int) -> bool:
    """Lower priority always yields; a higher priority never yields to a lower one; equal
    priority yields only a replica above its min_replicas, used less recently than the asker."""
    if victim.name == for_model.name or victim.priority > for_model.priority:
        return False
    if victim.priority < for_model.priority:
        return True
    return replicas > victim.min_replicas and victim.last_used < for_model.last_used


@dataclass(frozen=True)
class ReloadCosts:
    """Seconds to bring a model back, per byte, by where it waits (seed figures: CPU RAM → GPU
    14 GB in 0.44 s at PCIe speed, NVMe ≈ 2 s, object storage minutes)."""

    host_bytes_per_s: float = HOST_BYTES_PER_S
    disk_bytes_per_s: float = DISK_BYTES_PER_S
    source_bytes_per_s: float = 0.2e9

    def seconds(self, need_bytes: int, tier: int) -> float:
        rate = {HOST: self.host_bytes_per_s, DISK: self.disk_bytes_per_s}.get(
            tier, self.source_bytes_per_s
        )
        return need_bytes / rate


VictimOrder = Callable[["ModelView", int, ReloadCosts], tuple[float, ...]]


def lru_order(v: ModelView, tier: int, costs: ReloadCosts) -> tuple[float, ...]:
    """Lowest priority first, then least recently used."""
    return (v.priority, v.last_used)


def cost_order(v: ModelView, tier: int, costs: ReloadCosts) -> tuple[float, ...]:
    """Lowest priority first, then the smallest expected reload cost: reload seconds from the
    tier it would wait in x its request rate (a model nobody calls costs nothing to evict)."""
    return (v.priority, costs.seconds(v.need_bytes, tier) * v.request_rate, v.last_used)


VICTIM_ORDERS: Mapping[str, VictimOrder] = {"lru": lru_order, "cost_aware": cost_order}
