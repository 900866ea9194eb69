"""A prefix of etcd mirrored in memory as immutable snapshots (DESIGN §4).

List, then watch from the listed revision + 1; each event publishes a new read-only mapping, so
readers (the router's hot path) never lock or await. After a disconnect (aetcd's watch iterator
raises and does not resume) or a compaction, it lists again and watches from the new revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

import aetcd
from google.protobuf.message import DecodeError, Message

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

Listener = Callable[[Mapping[bytes, M]], None]


class Mirror(Generic[M]):
    """Keeps ``snapshot``: key → value for every key under ``prefix``."""

    def __init__(self, client: aetcd.Client, prefix: bytes, kind: type[M]) -> None:
        self._client = client
        self._prefix = prefix
        self._kind = kind
        self._data: dict[bytes, M] = {}
        self.snapshot: Mapping[bytes, M] = MappingProxyType({})
        self.revision = 0  # store revision the snapshot reflects
        self.synced = asyncio.Event()  # set once the first list arrived
        self.reconnects = 0
        self._listeners: list[Listener[M]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, listener: Listener[M]) -> None:
        """Calls ``listener(snapshot)`` on the event loop after every change (keep it quick)."""
        self._listeners.append(listener)

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _decode(self, value: bytes) -> M | None:
        try:
            return self._kind.FromString(value)
        except DecodeError:
            log.warning("skipping undecodable %s under %r", self._kind.__name__, self._prefix)
            return None

    def _publish(self) -> None:
        self.snapshot = MappingProxyType(dict(self._data))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            try:
                listener(self.snapshot)
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
                self._data = data
                self.revision = got.header.revision
                self._publish()
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
                        self._data[event.kv.key] = value
                    else:
                        self._data.pop(event.kv.key, None)
                    self.revision = max(self.revision, event.kv.mod_revision)
                    self._publish()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.reconnects += 1
                log.info("watch on %r broke (%s); re-listing", self._prefix, type(e).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
