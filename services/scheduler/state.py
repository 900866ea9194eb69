"""The mutable working state of one scheduling round: free memory and expected load per device
(free memory indexed for O(log n) best-fit search), who is placed where, and whom the round
evicted."""

from __future__ import annotations

from meshserve.scheduler.views import ClusterSnapshot, ModelView, type_ok
from meshserve.v1 import cluster_pb2
from sortedcontainers import SortedList

FAILED = cluster_pb2.DEVICE_HEALTH_FAILED
DEGRADED = cluster_pb2.DEVICE_HEALTH_DEGRADED


class PlanState:
    """The mutable working state of one round: free memory per device (indexed), who is where.

    ``strategy`` is the default for models that name none ("binpack" | "spread");
    ``compute_target`` the share of a device's throughput its expected load may reach."""

    def __init__(self, snap: ClusterSnapshot, strategy: str, compute_target: float) -> None:
        self.strategy = strategy
        self.compute_target = compute_target
        self.evictions: list[tuple[str, str]] = []  # (model, node) removed this round, in order
        self.evicted: set[str] = set()  # models evicted this round (never evict others for them)
        # (model, node) replicas moving off a drained node or a FAILED device, in order: they
        # stay until replaced elsewhere, and the replacement never goes to the same node
        self.leaving: dict[tuple[str, str], None] = {}
        self.models = {m.name: m for m in snap.models}
        self.nodes = {n.node_id: n for n in sorted(snap.nodes, key=lambda n: n.node_id)}
        self.failed = snap.failed
        self.offloaded = snap.offloaded
        self.capacity: list[int] = []
        self.free: list[int] = []
        self.dev_node: list[str] = []
        self.dev_id: list[str] = []
        self.dev_type: list[str] = []
        self.dev_health: list[int] = []  # cluster_pb2.DeviceHealth
        self.dev_models: list[set[str]] = []
        self.throughput: list[float] = []
        self.load: list[float] = []  # expected tokens/s on each device
        self.node_devices: dict[str, list[int]] = {}
        self.node_models: dict[str, set[str]] = {}
        self.node_capacity: dict[str, int] = {}
        self.model_nodes: dict[str, set[str]] = {}
        self.node_priority_bytes: dict[str, dict[int, int]] = {}  # node → priority → bytes held
        self.placed: dict[tuple[str, str], tuple[int, ...]] = {}
        self.index: SortedList = SortedList()  # (free, device) on nodes that take new replicas
        for node in self.nodes.values():
            devs = []
            for d in node.all_devices():
                i = len(self.capacity)
                self.capacity.append(d.capacity_bytes)
                self.free.append(d.capacity_bytes)
                self.dev_node.append(node.node_id)
                self.dev_id.append(d.device_id)
                self.dev_type.append(d.gpu_type)
                self.dev_health.append(d.health)
                self.dev_models.append(set())
                self.throughput.append(d.throughput_tokens_per_s)
                self.load.append(0.0)
                devs.append(i)
                if self._indexed(node.draining, i):
                    self.index.add((d.capacity_bytes, i))
            self.node_devices[node.node_id] = devs
            self.node_models[node.node_id] = set()
            self.node_capacity[node.node_id] = sum(self.capacity[d] for d in devs)
            self.node_priority_bytes[node.node_id] = {}
        self.largest_device = max(self.capacity, default=1) or 1
        self.any_degraded = DEGRADED in self.dev_health  # health is fixed for the round

    def replicas(self, model: str) -> int:
        """Replicas of ``model`` placed in this round's state."""
        return len(self.model_nodes.get(model, ()))

    def strategy_of(self, m: ModelView) -> str:
        return m.strategy or self.strategy

    def _indexed(self, draining: bool, d: int) -> bool:
        """Devices that take new replicas are in the best-fit index: not on a draining node,
        not FAILED."""
        return not draining and self.dev_health[d] != FAILED

    def allowed(self, m: ModelView, d: int) -> bool:
        """A device the model may be placed on: of an allowed type, not FAILED."""
        return type_ok(m.gpu_types, self.dev_type[d]) and self.dev_health[d] != FAILED

    def compute_ok(self, m: ModelView, d: int) -> bool:
        """The device keeps up with what it already serves plus this replica's share, within
        the profile's compute target (devices that report no throughput always pass)."""
        cap = self.throughput[d]
        return not cap or self.load[d] + m.per_device_load <= cap * self.compute_target

    def fits(self, m: ModelView, d: int) -> bool:
        return self.free[d] >= m.per_device_bytes and self.compute_ok(m, d) and self.allowed(m, d)

    def set_free(self, d: int, free: int) -> None:
        if self._indexed(self.nodes[self.dev_node[d]].draining, d):
            self.index.remove((self.free[d], d))
            self.index.add((free, d))
        self.free[d] = free

    def bind(self, m: ModelView, node_id: str, devices: tuple[int, ...]) -> None:
        for d in devices:
            self.set_free(d, self.free[d] - m.per_device_bytes)
            self.dev_models[d].add(m.name)
            self.load[d] += m.per_device_load
        self.node_models[node_id].add(m.name)
        self.model_nodes.setdefault(m.name, set()).add(node_id)
        held = self.node_priority_bytes[node_id]
        held[m.priority] = held.get(m.priority, 0) + m.need_bytes
        self.placed[(m.name, node_id)] = devices

    def reserve(self, m: ModelView, devices: tuple[int, ...]) -> None:
        """Holds a leaving replica's memory and load on its devices (it still runs there until
        its replacement is READY) without counting it as placed."""
        for d in devices:
            self.set_free(d, self.free[d] - m.per_device_bytes)
            self.load[d] += m.per_device_load

    def unbind(self, model: str, node_id: str) -> None:
        m = self.models[model]
        for d in self.placed.pop((model, node_id)):
            self.set_free(d, self.free[d] + m.per_device_bytes)
            self.dev_models[d].discard(model)
            self.load[d] -= m.per_device_load
        self.node_models[node_id].discard(model)
        self.model_nodes[model].discard(node_id)
        self.node_priority_bytes[node_id][m.priority] -= m.need_bytes

    def evict(self, model: str, node_id: str) -> None:
        """Removes a replica to make room for another; the round remembers it."""
        self.unbind(model, node_id)
        self.evictions.append((model, node_id))
        self.evicted.add(model)

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
        # Healthy devices first (a DEGRADED one only when nothing else fits), then by fit.
        fit.sort(
            key=lambda d: (
                self.dev_health[d] == DEGRADED,
                -self.free[d] if spread else self.free[d],
                d,
            )
        )
        return tuple(sorted(fit[: m.gpus]))
