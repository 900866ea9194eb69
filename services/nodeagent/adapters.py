"""The LoRA adapters loaded into one replica's engine (ModelSpec.base, DESIGN §9): loaded on
demand when a request names one, at most the base's ``max_adapters`` at once, the least recently
used one that no stream uses evicted to make room; one load per adapter however many requests
wait for it; never unloaded under a stream. Published in ReplicaStatus.adapters (routers prefer
replicas that hold the adapter asked for) when the set changes, not on every use.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

import grpc
from meshserve.artifacts.cache import ArtifactError, NodeCache
from meshserve.artifacts.s3 import Location, is_registry
from meshserve.nodeagent.engines.base import Chunk, Engine
from meshserve.nodeagent.engines.params import adapter_rank
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import cluster_pb2

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

WAIT_S = 30.0  # longest a request waits for a slot while every adapter loaded is in use


class Replica(Protocol):
    """What of a replica (nodeagent.replica) the adapters use."""

    spec: cluster_pb2.ModelSpec
    status: cluster_pb2.ReplicaStatus
    adapters: Adapters | None


class AllBusy(Exception):
    """Every slot holds an adapter a stream uses."""


def check_adapter(path: Path, name: str, max_rank: int) -> None:
    """A PEFT LoRA directory whose rank the base admits; raises ServiceError
    FAILED_PRECONDITION saying what is wrong (the adapter's owner fixes it, a retry will not)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"adapter {name!r}: no readable adapter_config.json at {path} ({e})",
            "BAD_ADAPTER",
        ) from None
    kind, rank = config.get("peft_type", "LORA"), int(config.get("r", 0))
    limit = max_rank
    if kind != "LORA" or not 0 < rank <= limit:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"adapter {name!r}: a {kind} adapter of rank {rank}; its base serves LoRA adapters "
            f"of rank 1..{limit} (the base's max_adapter_rank)",
            "BAD_ADAPTER",
        )


async def with_adapter(
    r: Replica,
    spec: cluster_pb2.ModelSpec,
    generate: Callable[[str], AsyncIterator[Chunk]],
    remaining: float | None,
) -> AsyncIterator[Chunk]:
    """A generation with the adapter ``spec`` held loaded on replica ``r`` of its base
    throughout: loaded first if it is not (this counts in the time to first token), the engine's
    stream made by ``generate`` with the key the engine knows this load by, closed before the
    adapter is let go however the stream ends."""
    if r.adapters is None:
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"adapter {spec.name!r}: its base {spec.base!r} serves no adapters (set its "
            "max_adapters)",
            "NO_ADAPTERS",
        )
    adapters = r.adapters
    with _tracer.start_as_current_span(
        "adapter.acquire", attributes={"meshserve.adapter": spec.name}
    ) as span:
        span.set_attribute("meshserve.adapter.was_loaded", adapters.holds(spec))
        key = await adapters.acquire(spec, min(remaining or WAIT_S, WAIT_S))
    stream = generate(key)
    try:
        async for chunk in stream:
            yield chunk
    finally:
        try:
            await stream.aclose()  # type: ignore[attr-defined]  # the engine lets go first
        finally:
            adapters.release(spec.name)


def adapters_for(
    r: Replica, engine: Engine, cache: NodeCache, mark_dirty: Callable[[str], None]
) -> Adapters | None:
    """The adapter set of a replica just loaded (empty: adapters load on demand), published in
    its status; None for a base that serves none (max_adapters 0)."""
    r.status.ClearField("adapters")
    r.status.max_adapters = r.spec.max_adapters
    if not r.spec.max_adapters:
        return None
    status = r.status

    def changed(names: list[str]) -> None:
        del status.adapters[:]
        status.adapters.extend(names)
        mark_dirty(r.spec.name)

    async def files(spec: cluster_pb2.ModelSpec) -> Path:
        return await adapter_files(cache, spec)

    return Adapters(r.spec, engine, files, changed)


async def adapter_files(cache: NodeCache, spec: cluster_pb2.ModelSpec) -> Path:
    """An adapter's directory on this node: its own, or its registry revision in the node cache
    (fetched once, kept while loaded: `pinned_revisions`)."""
    if not is_registry(spec.source):
        return Path(spec.source)
    if not spec.revision:
        raise ArtifactError(f"{spec.source}: no revision pinned (`meshserve model apply`)")
    loc = Location.parse(spec.source, spec.source_endpoint, spec.source_region)
    return await cache.materialize(loc, spec.revision, lambda _held, _total: None)


def pinned_revisions(replicas: Iterable[Replica]) -> set[str]:
    """Registry revisions the node cache must keep: placed models' and their loaded adapters'."""
    out: set[str] = set()
    for r in replicas:
        out.add(r.spec.revision)
        if r.adapters is not None:
            out.update(r.adapters.revisions.values())
    return out


def version(spec: cluster_pb2.ModelSpec) -> tuple[str, str, str]:
    """What makes one adapter's weights these: a re-applied adapter with another is another."""
    return (spec.source, spec.source_endpoint, spec.revision)


class Adapters:
    def __init__(
        self,
        base: cluster_pb2.ModelSpec,
        engine: Engine,
        fetch: Callable[[cluster_pb2.ModelSpec], Awaitable[Path]],
        on_change: Callable[[list[str]], None],
    ) -> None:
        self.base = base.name
        self.limit = base.max_adapters
        self.max_rank = adapter_rank(base)
        self.engine = engine
        self.fetch = fetch  # an adapter's files on this node (its directory, or the node cache)
        self.on_change = on_change  # publish ReplicaStatus.adapters
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name → streams; LRU first
        self.keys: dict[str, str] = {}  # name → the engine's key for this load of it
        self.versions: dict[str, tuple[str, str, str]] = {}  # name → `version` loaded
        self.revisions: dict[str, str] = {}  # name → registry revision (the cache keeps them)
        # Requests waiting for an adapter's load: it is not evicted before they take it (else
        # two loads competing for the last slot would evict each other for ever).
        self._claims: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()  # one eviction + load at a time
        self._freed = asyncio.Condition()
        self._version = 0  # bumped whenever a stream or a waiter lets go of an adapter
        self._serial = itertools.count(1)
        self.closed = ""  # why no adapter loads here any more (a tier change); "" while open
        self.loads = 0
        self.evictions = 0

    def names(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self.loaded)

    def holds(self, spec: cluster_pb2.ModelSpec) -> bool:
        return spec.name in self.loaded and self.versions.get(spec.name) == version(spec)

    async def acquire(self, spec: cluster_pb2.ModelSpec, timeout: float = WAIT_S) -> str:
        """Holds ``spec`` (an adapter of this base) loaded for one stream until `release`;
        returns the engine's key for it. Raises RESOURCE_EXHAUSTED when every slot stays in use
        for ``timeout`` s, UNAVAILABLE while the replica changes tier, or the load's error."""
        try:
            async with asyncio.timeout(timeout):
                return await self._acquire(spec)
        except TimeoutError:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"adapter {spec.name!r}: no adapter slot of this replica of {self.base!r} "
                f"came free in {timeout:.0f} s; retry (a router tries another replica)",
                "ADAPTER_SLOTS_BUSY",
                retry_after_s=1.0,
            ) from None

    async def _acquire(self, spec: cluster_pb2.ModelSpec) -> str:
        name = spec.name
        self._claims[name] += 1
        try:
            while True:
                if self.closed:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"adapter {name!r}: this replica of {self.base!r} {self.closed}; retry",
                        "NOT_LOADED",
                        retry_after_s=0.5,
                    )
                if self.holds(spec):
                    self.loaded.move_to_end(name)
                    self.loaded[name] += 1
                    return self.keys[name]
                seen = self._version
                task = self._loading.get(name)
                if task is None:
                    task = self._loading[name] = asyncio.create_task(self._load(spec))
                    task.add_done_callback(self._loaded)
                try:
                    # Shielded: a request that gives up does not cut the load short for the
                    # others (nor leave the engine holding an adapter this set does not know).
                    await asyncio.shield(task)
                except AllBusy:
                    async with self._freed:
                        await self._freed.wait_for(functools.partial(self._moved_since, seen))
        finally:
            self._claims[name] -= 1
            if not self._claims[name]:
                del self._claims[name]
            self._bump()

    def _moved_since(self, seen: int) -> bool:
        return self._version != seen

    def _loaded(self, task: asyncio.Task[None]) -> None:
        done = [n for n, t in self._loading.items() if t is task]
        for n in done:
            del self._loading[n]

    def release(self, name: str) -> None:
        if self.loaded.get(name, 0) > 0:
            self.loaded[name] -= 1
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def _load(self, spec: cluster_pb2.ModelSpec) -> None:
        async with self._lock:
            try:
                await self._load_locked(spec)
            finally:
                self.on_change(self.names())

    async def _load_locked(self, spec: cluster_pb2.ModelSpec) -> None:
        name = spec.name
        if self.closed or self.holds(spec):
            return  # the caller sees which
        if name in self.loaded:  # re-applied with other weights: the old ones go first
            if self.loaded[name]:
                raise AllBusy()  # streams still use the old weights
            await self._evict(name, "replaced")
        while len(self.loaded) >= self.limit:
            victim = next(
                (n for n, streams in self.loaded.items() if not streams and not self._claims[n]),
                None,
            )
            if victim is None:
                raise AllBusy()
            await self._evict(victim, "least recently used")
        key = f"{name}#{next(self._serial)}"  # each load its own: no cache of the old reused
        began = time.monotonic()
        try:
            path = await self.fetch(spec)
            check_adapter(path, name, self.max_rank)
            await self.engine.load_adapter(key, str(path))
        except ServiceError:
            raise
        except Exception as e:  # a registry refusal, unreadable files: a retry won't fix it
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"adapter {name!r} could not be loaded on {self.base!r}: {e}",
                "BAD_ADAPTER",
            ) from e
        self.loaded[name] = 0
        self.keys[name], self.versions[name] = key, version(spec)
        self.revisions[name] = spec.revision
        self.loads += 1
        took = time.monotonic() - began
        metrics.ADAPTER_LOADS.labels(self.base).inc()
        metrics.ADAPTER_LOAD_SECONDS.labels(self.base).observe(took)
        log.info("%s: loaded adapter %s in %.1f ms", self.base, name, took * 1000)

    async def _evict(self, name: str, why: str) -> None:
        del self.loaded[name]
        self.versions.pop(name, None)
        self.revisions.pop(name, None)
        key = self.keys.pop(name)
        await self.engine.unload_adapter(key)
        self.evictions += 1
        metrics.ADAPTER_EVICTIONS.labels(self.base).inc()
        log.info("%s: evicted adapter %s (%s)", self.base, name, why)

    def close(self, why: str) -> None:
        """No more loads (a tier change is coming): requests waiting for one are refused with
        UNAVAILABLE and go elsewhere; streams already running go on until the drain ends."""
        self.closed = why
        self._bump()

    def reopen(self) -> None:
        self.closed = ""

    async def clear(self) -> None:
        """Unloads every adapter (closed, and the replica drained)."""
        async with self._lock:
            for name in list(self.loaded):
                await self._evict(name, self.closed or "cleared")
        self.on_change(self.names())
