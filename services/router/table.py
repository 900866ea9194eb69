"""The router's endpoint table: READY replicas per model, aliases resolved.

Built from watches on ``models/`` and ``replicas/``; each change builds a new immutable
`RouteTable` and swaps it in one assignment, so the request path reads it without locks, awaits or
etcd (STYLE).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import aetcd
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.modelspec import alias_map
from meshserve.v1 import cluster_pb2, common_pb2

S = cluster_pb2


@dataclass(frozen=True)
class Endpoint:
    node_id: str
    address: str  # host:port of the agent
    waiting: int = 0  # streams queued in the engine (its last ReplicaStatus, all routers')
    kv_cache_usage: float = 0.0  # [0, 1], engines with a paged KV cache
    max_streams: int = 0  # streams the replica admits at once; 0 = unknown (no limit here)
    incarnation: int = 0  # the agent's lease when it wrote the status: a restart changes it

    @property
    def identity(self) -> tuple[str, int]:
        """One replica in one agent process (a restarted agent is another replica)."""
        return (self.address, self.incarnation)


@dataclass(frozen=True)
class Route:
    spec: cluster_pb2.ModelSpec
    ready: tuple[Endpoint, ...]  # sorted by node id
    loading: int = 0  # replicas loading or warming up (a wait will end)
    # READY or DRAINING replicas: a stream on one of these may go on; one that leaves this set
    # (lease expired, unloaded, FAILED) is gone, and its streams fail over at once.
    alive: frozenset[tuple[str, int]] = frozenset()
    # A tensor model's inputs and outputs, as its replicas published them (None: none has yet)
    signature: common_pb2.TensorSignature | None = None


@dataclass(frozen=True)
class RouteTable:
    routes: Mapping[str, Route] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias → model

    def resolve(self, name: str) -> Route | None:
        """The route for a model name, else for an alias (`modelspec.find_model`'s rule)."""
        return self.routes.get(name) or self.routes.get(self.aliases.get(name, ""))


def build_table(
    specs: Iterable[cluster_pb2.ModelSpec], replicas: Iterable[cluster_pb2.ReplicaStatus]
) -> RouteTable:
    ready: dict[str, list[Endpoint]] = defaultdict(list)
    loading: dict[str, int] = defaultdict(int)
    alive: dict[str, set[tuple[str, int]]] = defaultdict(set)
    signatures: dict[str, common_pb2.TensorSignature] = {}
    for r in replicas:
        if not r.address:
            continue
        if r.signature.inputs and (r.state == S.REPLICA_STATE_READY or r.model not in signatures):
            signatures[r.model] = r.signature
        if r.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_DRAINING):
            alive[r.model].add((r.address, r.incarnation))
        if r.state == S.REPLICA_STATE_READY:
            ready[r.model].append(
                Endpoint(
                    r.node_id, r.address, r.waiting, r.kv_cache_usage, r.max_streams, r.incarnation
                )
            )
        elif r.state in (S.REPLICA_STATE_LOADING, S.REPLICA_STATE_WARMING):
            loading[r.model] += 1
    specs = list(specs)
    routes = {
        spec.name: Route(
            spec,
            tuple(sorted(ready.get(spec.name, []), key=lambda e: e.node_id)),
            loading.get(spec.name, 0),
            frozenset(alive.get(spec.name, ())),
            signatures.get(spec.name),
        )
        for spec in specs
    }
    return RouteTable(MappingProxyType(routes), MappingProxyType(alias_map(specs)))


class EndpointTable:
    """Owns the two mirrors and publishes a new `RouteTable` after every change; tells streams
    when their replica is gone (`departure`)."""

    def __init__(self, client: aetcd.Client, keys: Keyspace) -> None:
        self.models = Mirror(client, keys.models(), cluster_pb2.ModelSpec)
        self.replicas = Mirror(client, keys.replicas(), cluster_pb2.ReplicaStatus)
        self.current = RouteTable()
        self._listeners: list[Callable[[RouteTable], None]] = []
        # (model, replica identity) → [event set when it is gone, streams watching it]
        self._departures: dict[tuple[str, tuple[str, int]], list[Any]] = {}

    def start(self) -> None:
        for m in (self.models, self.replicas):
            m.subscribe(lambda _s: self._rebuild())
            m.start()

    async def synced(self) -> None:
        await self.models.synced.wait()
        await self.replicas.synced.wait()

    async def stop(self) -> None:
        await self.models.stop()
        await self.replicas.stop()

    def subscribe(self, listener: Callable[[RouteTable], None]) -> None:
        """Calls ``listener(table)`` after every rebuild (keep it quick: it runs on the loop)."""
        self._listeners.append(listener)

    def _rebuild(self) -> None:
        self.publish(build_table(self.models.snapshot.values(), self.replicas.snapshot.values()))

    def publish(self, table: RouteTable) -> None:
        """Swaps in ``table`` and tells the listeners and the streams whose replica left."""
        self.current = table
        for (model, identity), (event, _n) in self._departures.items():
            route = self.current.routes.get(model)
            if route is None or identity not in route.alive:
                event.set()
        for listener in self._listeners:
            listener(self.current)

    def departure(self, model: str, identity: tuple[str, int]) -> asyncio.Event:
        """An event set once the replica ``identity`` of ``model`` is no longer alive (already
        set if it is not alive now). Call `forget_departure` when done."""
        key = (model, identity)
        watch = self._departures.get(key)
        if watch is None:
            watch = self._departures[key] = [asyncio.Event(), 0]
            route = self.current.routes.get(model)
            if route is None or identity not in route.alive:
                watch[0].set()
        watch[1] += 1
        event: asyncio.Event = watch[0]
        return event

    def forget_departure(self, model: str, identity: tuple[str, int]) -> None:
        key = (model, identity)
        watch = self._departures.get(key)
        if watch is not None:
            watch[1] -= 1
            if watch[1] <= 0:
                del self._departures[key]
