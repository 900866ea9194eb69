"""One replica's KV-cache blocks as its engine reports them, for the routers that watch them
(NodeAgent.WatchKvBlocks; DESIGN §9: engine events → agent → router, never through etcd).

The engine calls `KvBlocks.publish` with batches of `kvblocks` events (the sim engine's own;
vLLM's ZMQ events translated by `vllm_kv`). The tracker keeps the current state (hash → medium,
oldest first) so a new watcher starts from a snapshot, and gives each watcher every batch after
it in order. A watcher that falls ``MAX_BACKLOG`` batches behind (a slow or stuck router) is not
allowed to grow the agent's memory: its backlog is dropped and it gets a fresh snapshot instead.
When the replica goes (unload, failure, reload) the tracker is closed and every watch ends.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from meshserve.kvblocks import Cleared, Event, Removed, Stored

MAX_BACKLOG = 512  # batches a watcher may lag before it is resynced with a snapshot
MAX_BLOCKS = 1_000_000  # blocks tracked per replica (an engine's pool is far smaller)


@dataclass(eq=False)
class _Watcher:
    backlog: deque[list[Event]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = True  # its next batch is a snapshot (a start, or it fell behind)


class KvBlocks:
    def __init__(self, generation: int = 0) -> None:
        self.generation = generation
        self.blocks: OrderedDict[int, int] = OrderedDict()  # hash → medium, oldest first
        self.batches = 0  # published since the load
        self.resyncs = 0  # snapshots sent to watchers that fell behind
        self._watchers: set[_Watcher] = set()
        self.closed = False

    def publish(self, events: Sequence[Event]) -> None:
        """A batch from the engine (on the event loop's thread)."""
        if self.closed or not events:
            return
        for ev in events:
            if isinstance(ev, Stored):
                for h in ev.hashes:
                    self.blocks[h] = ev.medium
                    self.blocks.move_to_end(h)
            elif isinstance(ev, Removed):
                for h in ev.hashes:
                    if self.blocks.get(h) == ev.medium:
                        del self.blocks[h]
            else:
                self.blocks.clear()
        while len(self.blocks) > MAX_BLOCKS:
            self.blocks.popitem(last=False)
        self.batches += 1
        batch = list(events)
        for w in self._watchers:
            if w.resync:
                pass  # its snapshot, taken when it runs, will include this batch
            elif len(w.backlog) >= MAX_BACKLOG:
                w.backlog.clear()
                w.resync = True
                self.resyncs += 1
            else:
                w.backlog.append(batch)
            w.wake.set()

    def close(self) -> None:
        """The replica is gone: every watch ends."""
        self.closed = True
        for w in self._watchers:
            w.wake.set()

    def snapshot(self) -> list[Event]:
        """The whole state as STORED events, oldest first (one per run of one medium)."""
        out: list[Event] = []
        run: list[int] = []
        medium = 0
        for h, m in self.blocks.items():
            if m != medium and run:
                out.append(Stored(tuple(run), medium))
                run = []
            medium = m
            run.append(h)
        if run:
            out.append(Stored(tuple(run), medium))
        return out

    async def watch(self) -> AsyncIterator[tuple[bool, list[Event]]]:
        """(snapshot?, events) in order until the replica goes; a snapshot replaces all."""
        w = _Watcher()
        self._watchers.add(w)
        try:
            while not self.closed:
                if w.resync:
                    w.resync = False
                    w.backlog.clear()
                    yield True, self.snapshot()
                    continue
                if w.backlog:
                    yield False, w.backlog.popleft()
                    continue
                w.wake.clear()
                await w.wake.wait()
        finally:
            self._watchers.discard(w)

    @property
    def watchers(self) -> int:
        return len(self._watchers)


__all__ = ["Cleared", "KvBlocks", "Removed", "Stored"]
