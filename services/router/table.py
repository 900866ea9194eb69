"""The router's endpoint table: READY replicas per model, aliases resolved.

Built from watches on ``models/`` and ``replicas/``; each change builds a new immutable
`RouteTable` and swaps it in one assignment, so the request path reads it without locks, awaits or
etcd (STYLE).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import aetcd
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.modelspec import alias_map
from meshserve.v1 import cluster_pb2


@dataclass(frozen=True)
class Endpoint:
    node_id: str
    address: str  # host:port of the agent
    waiting: int = 0  # streams queued in the engine (its last ReplicaStatus, all routers')
    kv_cache_usage: float = 0.0  # [0, 1], engines with a paged KV cache


@dataclass(frozen=True)
class Route:
    spec: cluster_pb2.ModelSpec
    ready: tuple[Endpoint, ...]  # sorted by node id


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
    for r in replicas:
        if r.state == cluster_pb2.REPLICA_STATE_READY and r.address:
            ready[r.model].append(Endpoint(r.node_id, r.address, r.waiting, r.kv_cache_usage))
    specs = list(specs)
    routes = {
        spec.name: Route(spec, tuple(sorted(ready.get(spec.name, []), key=lambda e: e.node_id)))
        for spec in specs
    }
    return RouteTable(MappingProxyType(routes), MappingProxyType(alias_map(specs)))


class EndpointTable:
    """Owns the two mirrors and publishes a new `RouteTable` after every change."""

    def __init__(self, client: aetcd.Client, keys: Keyspace) -> None:
        self.models = Mirror(client, keys.models(), cluster_pb2.ModelSpec)
        self.replicas = Mirror(client, keys.replicas(), cluster_pb2.ReplicaStatus)
        self.current = RouteTable()
        self._changed = asyncio.Event()

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

    def _rebuild(self) -> None:
        self.current = build_table(self.models.snapshot.values(), self.replicas.snapshot.values())
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, timeout: float) -> None:
        """Returns after the next change or after ``timeout`` s, whichever is first."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
