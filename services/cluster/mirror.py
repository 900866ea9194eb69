"""A prefix of etcd mirrored in memory (DESIGN §4).

List, then watch from the listed revision + 1. After a disconnect (aetcd's watch iterator raises
and does not resume) or a compaction, it lists again and watches from the new revision; the
difference from what it held goes out as changes, as if watched.

Costs stay per event, not per key held (fleets of thousands of replicas each writing once a
second): the events of one burst are published together, once the loop turns (coalesced);
event listeners (`subscribe_changes`) get just the keys that changed; `snapshot` is an immutable
copy made on first read after a change, so a mirror nobody copies costs O(1) per event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

import aetcd
from google.protobuf.message import DecodeError, Message

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

Listener = Callable[[Mapping[bytes, M]], None]
# (key, the value before, the value now); None: absent
Change = tuple[bytes, M | None, M | None]
ChangeListener = Callable[[list[Change[M]]], None]


class Mirror(Generic[M]):
    """Keeps ``snapshot``: key → value for every key under ``prefix``."""

    def __init__(self, client: aetcd.Client, prefix: bytes, kind: type[M]) -> None:
        self._client = client
        self._prefix = prefix
        self._kind = kind
        self._data: dict[bytes, M] = {}
        self.view: Mapping[bytes, M] = MappingProxyType(self._data)  # live, read-only
        self._snapshot: Mapping[bytes, M] | None = MappingProxyType({})
        self.revision = 0  # store revision the snapshot reflects
        self.synced = asyncio.Event()  # set once the first list arrived
        self.reconnects = 0
        self._listeners: list[Listener[M]] = []
        self._change_listeners: list[ChangeListener[M]] = []
        self._pending: dict[bytes, M | None] = {}  # key → its value before this burst
        self._flush_handle: asyncio.Handle | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def snapshot(self) -> Mapping[bytes, M]:
        """An immutable copy of what is held now (made once per change, when first read)."""
        if self._snapshot is None:
            self._snapshot = MappingProxyType(dict(self._data))
        return self._snapshot

    def subscribe(self, listener: Listener[M]) -> None:
        """Calls ``listener(view)`` on the event loop after every burst of changes (keep it
        quick). ``view`` is live: read it now, or keep `snapshot` for a copy that stays."""
        self._listeners.append(listener)

    def subscribe_changes(self, listener: ChangeListener[M]) -> None:
        """Calls ``listener(changes)`` after every burst: each changed key once, with its value
        before the burst and now (None: absent), in the order the keys first changed."""
        self._change_listeners.append(listener)

    async def wait_changed(self, timeout: float | None = None) -> bool:
        """Waits for the next change; False on timeout."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mirror {self._prefix!r}")

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        if task is not None:
            # A cancel that lands while aetcd sets a watch up can be lost inside it (seen: a
            # `top --once` that never exited): cancel again until the task is done.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _decode(self, value: bytes) -> M | None:
        try:
            return self._kind.FromString(value)
        except DecodeError:
            log.warning("skipping undecodable %s under %r", self._kind.__name__, self._prefix)
            return None

    def _set(self, key: bytes, value: M | None) -> None:
        """One change, published with the rest of its burst."""
        if key not in self._pending:
            self._pending[key] = self._data.get(key)
        if value is None:
            self._data.pop(key, None)
        else:
            self._data[key] = value
        self._snapshot = None
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        changes = [(k, old, self._data.get(k)) for k, old in pending.items()]
        changes = [c for c in changes if c[1] is not c[2]]
        if not changes and self.synced.is_set():
            return
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for change_listener in self._change_listeners:
            try:
                change_listener(changes)
            except Exception:
                log.exception("mirror change listener failed")
        for listener in self._listeners:
            try:
                listener(self.view)
            except Exception:
                log.exception("mirror listener failed")

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                got = await self._client.get_prefix(self._prefix)
                data = {}
                for kv in got.kvs:
                    value = self._decode(kv.value)
                    if value is not None:
                        data[kv.key] = value
                for key in [k for k in self._data if k not in data]:
                    self._set(key, None)  # gone while we were not watching
                for key, value in data.items():
                    if self._data.get(key) != value:
                        self._set(key, value)
                self.revision = got.header.revision
                if self._flush_handle is not None:  # the listed state goes out before synced
                    self._flush_handle.cancel()
                self._flush()
                self.synced.set()
                watch = await self._client.watch_prefix(
                    self._prefix, start_revision=self.revision + 1
                )
                backoff = 0.1
                async for event in watch:
                    if event.kind == "PUT":
                        value = self._decode(event.kv.value)
                        if value is None:
                            continue
                        self._set(event.kv.key, value)
                    else:
                        self._set(event.kv.key, None)
                    self.revision = max(self.revision, event.kv.mod_revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopping:
                    return
                self.reconnects += 1
                log.info("watch on %r broke (%s); re-listing", self._prefix, type(e).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
