"""The router's endpoint table: READY replicas per model, aliases resolved.

Kept from watches on ``models/`` and ``replicas/`` one change at a time (`TableBuilder`): a
replica that appears, leaves or changes state rebuilds its model's `Route` (O(that model's
replicas)); one whose load figures alone moved (the engine stats every replica writes about once
a second) updates its `Endpoint` in place, O(1), rebuilding nothing; a model spec change also
recomputes aliases. Each `Route` is immutable and swapped in with one assignment, so the request
path reads the table without locks, awaits or etcd (STYLE). `build_table` (a fresh table from
whole lists) goes through the same builder; a property test holds the two equal.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

import aetcd
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Change, Mirror
from meshserve.modelspec import alias_map
from meshserve.router.routing.endpoints import Endpoint, Route, RouteTable
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2, common_pb2

S = cluster_pb2
ASLEEP = (S.TIER_HOST, S.TIER_DISK)  # the tiers an OFFLOADED replica may be woken from


def _routing(r: cluster_pb2.ReplicaStatus) -> tuple[object, ...]:
    """What of a replica's status the route depends on (all but its load figures)."""
    return (
        r.model, r.node_id, r.address, r.state, r.max_streams, r.incarnation, r.generation,
        r.signature, r.kv_block_tokens, r.kv_events, r.device_kind, r.tier, r.restore_seconds,
        tuple(r.adapters), r.max_adapters,
    )  # fmt: skip


def _endpoint(r: cluster_pb2.ReplicaStatus) -> Endpoint:
    return Endpoint(
        r.node_id, r.address, r.waiting, r.kv_cache_usage, r.max_streams, r.incarnation,
        r.generation, r.running, r.kv_block_tokens, r.kv_events, r.device_kind,
        0.0 if r.state == S.REPLICA_STATE_READY else r.restore_seconds, tuple(r.adapters),
        r.max_adapters,
    )  # fmt: skip


class TableBuilder:
    """The route table, kept one change at a time (module docstring). ``table`` is one object
    for the builder's life; its mappings are live read-only views."""

    def __init__(self) -> None:
        self.specs: dict[str, cluster_pb2.ModelSpec] = {}
        self.statuses: dict[str, dict[bytes, cluster_pb2.ReplicaStatus]] = defaultdict(dict)
        self.endpoints: dict[bytes, Endpoint] = {}  # READY replicas by key
        self._routes: dict[str, Route] = {}
        self._aliases: dict[str, str] = {}
        self._adapters: dict[str, set[str]] = defaultdict(set)  # base → its adapters' names
        self.table = RouteTable(MappingProxyType(self._routes), MappingProxyType(self._aliases))

    def spec(self, name: str, spec: cluster_pb2.ModelSpec | None) -> set[str]:
        """A model spec put (or deleted: None); returns the models whose route changed."""
        old = self.specs.get(name)
        if old is not None and old.base:
            self._adapters[old.base].discard(name)
        if spec is None:
            self.specs.pop(name, None)
        else:
            self.specs[name] = spec  # in place: the aliases' order stays the specs' order
            if spec.base:
                self._adapters[spec.base].add(name)
        self._aliases.clear()
        self._aliases.update(alias_map(self.specs.values()))
        changed = {name, *self._adapters.get(name, ())}  # a base's adapters follow its spec
        for model in changed:
            self._rebuild(model)
        return changed

    def replica(
        self,
        key: bytes,
        status: cluster_pb2.ReplicaStatus | None,
        old: cluster_pb2.ReplicaStatus | None,
    ) -> set[str]:
        """A replica's status put (or deleted: None); ``old`` is what it was. Returns the
        models whose route changed (none when only load figures moved)."""
        if status is not None and old is not None and _routing(status) == _routing(old):
            self.statuses[status.model][key] = status
            e = self.endpoints.get(key)
            if e is not None:
                e.waiting, e.kv_cache_usage = status.waiting, status.kv_cache_usage
                e.running = status.running
            return set()
        changed = set()
        if old is not None:
            self.statuses[old.model].pop(key, None)
            self.endpoints.pop(key, None)
            changed.add(old.model)
        if status is not None:
            self.statuses[status.model][key] = status
            changed.add(status.model)
        for base in list(changed):  # adapters are routed to their base's replicas
            changed.update(self._adapters.get(base, ()))
        for model in sorted(changed, key=lambda m: m in self.specs and bool(self.specs[m].base)):
            self._rebuild(model)  # bases first: their adapters reuse the endpoints they made
        return changed

    def _rebuild(self, model: str) -> None:
        spec = self.specs.get(model)
        statuses = self.statuses.get(model, {})
        if spec is None:
            self._routes.pop(model, None)
            if not statuses:
                self.statuses.pop(model, None)
            return
        if spec.base:  # an adapter: its base's replicas
            statuses = self.statuses.get(spec.base, {})
        ready: list[Endpoint] = []
        asleep: list[Endpoint] = []
        loading = 0
        alive: set[tuple[str, int, int]] = set()
        signature: common_pb2.TensorSignature | None = None
        for key, r in statuses.items():
            if not r.address:
                continue
            if r.signature.inputs and (r.state == S.REPLICA_STATE_READY or signature is None):
                signature = r.signature
            if r.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_DRAINING):
                alive.add((r.address, r.incarnation, r.generation))
            if r.state == S.REPLICA_STATE_READY:
                e = self.endpoints.get(key)
                if e is None or (e.node_id, e.max_streams, e.identity, e.adapters) != (
                    r.node_id,
                    r.max_streams,
                    (r.address, r.incarnation, r.generation),
                    tuple(r.adapters),
                ):
                    e = self.endpoints[key] = _endpoint(r)
                ready.append(e)
            else:
                self.endpoints.pop(key, None)
                if r.state in (S.REPLICA_STATE_LOADING, S.REPLICA_STATE_WARMING):
                    loading += 1
                elif r.state == S.REPLICA_STATE_OFFLOADED and r.tier in ASLEEP:
                    asleep.append(_endpoint(r))
        ready.sort(key=lambda e: e.node_id)
        asleep.sort(key=lambda e: e.node_id)
        self._routes[model] = Route(
            spec, tuple(ready), loading, frozenset(alive), signature, tuple(asleep),
            self.specs.get(spec.base) if spec.base else None,
        )  # fmt: skip


def build_table(
    specs: Iterable[cluster_pb2.ModelSpec], replicas: Iterable[cluster_pb2.ReplicaStatus]
) -> RouteTable:
    """A table from whole lists (what the builder holds after the same puts)."""
    b = TableBuilder()
    for spec in specs:
        b.spec(spec.name, spec)
    for r in replicas:
        b.replica(f"{r.model}/{r.node_id}".encode(), r, None)
    return b.table


class EndpointTable:
    """Owns the two mirrors and keeps `current` from their changes; tells listeners which
    models' routes changed, and streams when their replica is gone (`departure`)."""

    def __init__(self, client: aetcd.Client, keys: Keyspace) -> None:
        self.models = Mirror(client, keys.models(), cluster_pb2.ModelSpec)
        self.replicas = Mirror(client, keys.replicas(), cluster_pb2.ReplicaStatus)
        self.builder = TableBuilder()
        self.current = self.builder.table
        self._listeners: list[Callable[[RouteTable, set[str]], None]] = []
        # (model, replica identity) → [event set when it is gone, streams watching it]
        self._departures: dict[tuple[str, tuple[str, int, int]], list[Any]] = {}

    def start(self) -> None:
        self.models.subscribe_changes(self._on_models)
        self.replicas.subscribe_changes(self._on_replicas)
        self.models.start()
        self.replicas.start()

    def _on_models(self, changes: list[Change[cluster_pb2.ModelSpec]]) -> None:
        started = time.perf_counter()
        changed: set[str] = set()
        for _key, old, new in changes:
            spec = new if new is not None else old
            assert spec is not None
            changed |= self.builder.spec(spec.name, new)
        self._changed(changed, started)

    def _on_replicas(self, changes: list[Change[cluster_pb2.ReplicaStatus]]) -> None:
        started = time.perf_counter()
        changed: set[str] = set()
        for key, old, new in changes:
            changed |= self.builder.replica(key, new, old)
        self._changed(changed, started)

    def _changed(self, models: set[str], started: float) -> None:
        if models:
            self.publish(models)
        metrics.ROUTER_TABLE_UPDATE.observe(time.perf_counter() - started)

    async def synced(self) -> None:
        await self.models.synced.wait()
        await self.replicas.synced.wait()

    async def stop(self) -> None:
        await self.models.stop()
        await self.replicas.stop()

    def subscribe(self, listener: Callable[[RouteTable, set[str]], None]) -> None:
        """Calls ``listener(table, models)`` after routes of ``models`` changed (keep it quick:
        it runs on the loop)."""
        self._listeners.append(listener)

    def publish(self, models: set[str]) -> None:
        """Tells the listeners, and the streams whose replica left one of ``models``."""
        for (model, identity), (event, _n) in self._departures.items():
            if model not in models:
                continue
            route = self.current.routes.get(model)
            if route is None or identity not in route.alive:
                event.set()
        for listener in self._listeners:
            listener(self.current, models)

    def departure(self, model: str, identity: tuple[str, int, int]) -> asyncio.Event:
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

    def status_of(self, model: str, endpoint: Endpoint) -> cluster_pb2.ReplicaStatus | None:
        """The last published status of ``endpoint``'s replica of ``model`` (rare paths only:
        a scan of the model's replicas)."""
        for status in self.builder.statuses.get(model, {}).values():
            if (status.address, status.incarnation, status.generation) == endpoint.identity:
                return status
        return None

    def forget_departure(self, model: str, identity: tuple[str, int, int]) -> None:
        key = (model, identity)
        watch = self._departures.get(key)
        if watch is not None:
            watch[1] -= 1
            if watch[1] <= 0:
                del self._departures[key]
