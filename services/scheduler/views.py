"""The frozen data the placement policy reads and writes (STYLE: plain dataclasses at the
boundary, a unit or meaning per field). Built from etcd records by snapshot.py, or by a simulator
or a benchmark; no protobuf here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

HOST, DISK = 2, 3  # meshserve.v1.Tier values (policy stays free of protobuf)


@dataclass(frozen=True)
class Device:
    device_id: str  # GPU or MIG uuid; "" for the memory of a node without GPUs
    capacity_bytes: int
    gpu_type: str = ""  # e.g. "A100-40GB"; "" on CPU nodes
    mig: bool = False
    throughput_tokens_per_s: float = 0.0  # what it generates at full load; 0 = unknown
    health: int = 0  # cluster_pb2.DeviceHealth as its agent judged it (0: not judged, as OK)
    health_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeView:
    node_id: str
    capacity_bytes: int  # memory offered to models (sum over devices)
    draining: bool = False
    host_capacity_bytes: int = 0  # CPU RAM offered to offloaded models
    devices: tuple[Device, ...] = ()  # empty: one device of capacity_bytes (a CPU node)
    labels: Mapping[str, str] = field(default_factory=dict)
    cordon: str = ""  # an operator's hold: "cordon" or "drain" (nothing new goes there)
    cached: frozenset[str] = frozenset()  # model revisions its artifact cache holds whole

    @property
    def closed(self) -> bool:
        """Takes no new placements: its agent drains, or an operator cordoned or drained it."""
        return self.draining or bool(self.cordon)

    def all_devices(self) -> tuple[Device, ...]:
        return self.devices or (Device("", self.capacity_bytes),)


@dataclass(frozen=True)
class ModelView:
    name: str
    need_bytes: int  # one replica in all: weights + KV headroom + overhead
    wanted: int  # replicas wanted now (from min/max replicas and the autoscaler)
    min_replicas: int = 0  # on devices (a warm-in-host model has none there)
    priority: int = 2  # meshserve.v1.Priority; higher wins
    last_used: float = 0.0  # s since the epoch of the last request; 0 = never
    gpus: int = 1  # devices per replica (tensor parallel gang on one node)
    strategy: str = ""  # "binpack" | "spread" | "" (the profile's)
    gpu_types: frozenset[str] = frozenset()  # allowed GPU types; empty = any
    node_selector: Mapping[str, str] = field(default_factory=dict)
    revision: str = ""  # a registry model's pinned revision ("" for a local source)
    request_rate: float = 0.0  # requests/s now (eviction cost)
    tokens_per_s: float = 0.0  # tokens/s its demand asks for, over all replicas; 0 = unknown
    warm_host: int = 0  # copies kept asleep in CPU RAM while fewer are wanted on devices

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
    ready: frozenset[tuple[str, str]] = frozenset()  # (model, node) whose replica is READY
    # Background re-pack (Profile.repack_*): (model, node) replicas a re-pack is moving off
    # (kept until replaced by a READY one elsewhere), and how many more it may start this round
    # (the leader's disruption budget); 0: none.
    moving: frozenset[tuple[str, str]] = frozenset()
    repack_budget: int = 0


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
    repacked: tuple[tuple[str, str], ...] = ()  # (model, old node) a re-pack started to move


def wanted_replicas(min_replicas: int, max_replicas: int, in_demand: bool) -> int:
    wanted = max(min_replicas, 1 if in_demand else 0)
    return min(wanted, max_replicas) if max_replicas else wanted


def type_ok(types: frozenset[str], gpu_type: str) -> bool:
    """A device's type (NVML's name, e.g. "NVIDIA A100-SXM4-40GB") matches an allowed type
    given as any part of it ("A100", "A100-SXM4-40GB"); no allowed types means any."""
    return not types or any(t in gpu_type for t in types)


def mib(n: int) -> str:
    """Bytes as MiB or GiB for messages."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
