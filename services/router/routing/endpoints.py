"""What the router routes to (pure data): a replica (`Endpoint`), a model's replicas
(`Route`) and the table of routes with aliases resolved (`RouteTable`). The table itself is
kept from etcd by `core.table`; routing policy reads only these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshserve.v1 import cluster_pb2, common_pb2


@dataclass
class Endpoint:
    """One READY replica. ``waiting`` and ``kv_cache_usage`` are its last published load
    figures, updated in place (the picker reads them); the rest says which replica it is."""

    node_id: str
    address: str  # host:port of the agent
    waiting: int = 0  # streams queued in the engine (its last ReplicaStatus, all routers')
    kv_cache_usage: float = 0.0  # [0, 1], engines with a paged KV cache
    max_streams: int = 0  # streams the replica admits at once; 0 = unknown (no limit here)
    incarnation: int = 0  # the agent's lease when it wrote the status: a restart changes it
    generation: int = 0  # the agent's load of it: a reload (after FAILED) changes it
    running: int = 0  # streams it decodes (its last ReplicaStatus, all routers')
    kv_block_tokens: int = 0  # its KV block size (0: no prefix cache): prompts hash in these
    kv_events: bool = False  # its agent streams its block events (WatchKvBlocks)
    device_kind: str = ""  # "cpu" or the GPU's name: TTFT is fitted per model and kind
    restore_s: float = 0.0  # asleep (Route.asleep): the restore its agent expects, s; else 0
    adapters: tuple[str, ...] = ()  # LoRA adapters loaded there (ReplicaStatus.adapters)
    max_adapters: int = 0  # how many it may hold at once (0: it serves none)

    @property
    def identity(self) -> tuple[str, int, int]:
        """One load of a replica in one agent process (a restarted agent, or a replica loaded
        again after it failed, is another replica)."""
        return (self.address, self.incarnation, self.generation)


@dataclass(frozen=True)
class Route:
    # An adapter's route (spec.base set) has its base's replicas: the adapter is loaded into
    # them on demand (Endpoint.adapters says where it is already).
    spec: cluster_pb2.ModelSpec
    ready: tuple[Endpoint, ...]  # sorted by node id
    loading: int = 0  # replicas loading or warming up (a wait will end)
    # READY or DRAINING replicas: a stream on one of these may go on; one that leaves this set
    # (lease expired, unloaded, FAILED) is gone, and its streams fail over at once.
    alive: frozenset[tuple[str, int, int]] = frozenset()
    # A tensor model's inputs and outputs, as its replicas published them (None: none has yet)
    signature: common_pb2.TensorSignature | None = None
    # OFFLOADED replicas (asleep in CPU RAM or on disk), which a router may ask to wake
    # (core.wakes) when that beats queueing on the READY ones; sorted by node id
    asleep: tuple[Endpoint, ...] = ()
    # An adapter's base model spec (its tokenizer hashes the adapter's prompts); None otherwise
    base: cluster_pb2.ModelSpec | None = None


@dataclass(frozen=True)
class RouteTable:
    routes: Mapping[str, Route] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias → model

    def resolve(self, name: str) -> Route | None:
        """The route for a model name, else for an alias (`modelspec.find_model`'s rule)."""
        return self.routes.get(name) or self.routes.get(self.aliases.get(name, ""))
