"""The precise feed of the prefix index: one `WatchKvBlocks` stream per READY replica whose
agent reports its blocks (ReplicaStatus.kv_events), kept while the replica is in the table.

A watch starts with a snapshot (the index replaces what it knew of the replica), then applies
each batch in order. A gap in the sequence, a broken stream or a replica that restarted (another
identity) drops the replica's blocks from the index and watches again from a fresh snapshot
(after a short backoff while the agent is unreachable); between the two, the router's own sends
(pending blocks) still steer repeats of a prefix. A replica that leaves the table loses its
blocks at once. Nothing here passes through etcd (DESIGN §9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from meshserve.kvblocks import Cleared, Event, Removed, Stored
from meshserve.router.core.prefixes import Prefixes
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.upstreams import Upstreams
from meshserve.router.routing.endpoints import Endpoint, RouteTable
from meshserve.telemetry import metrics
from meshserve.v1 import nodeagent_pb2, nodeagent_pb2_grpc

log = logging.getLogger(__name__)
E = nodeagent_pb2.KvBlockEvent
BACKOFF_S = (0.2, 5.0)

Key = tuple[str, str, tuple[str, int, int]]  # model, address, replica identity


def events_of(batch: nodeagent_pb2.WatchKvBlocksResponse) -> list[Event]:
    out: list[Event] = []
    for ev in batch.events:
        if ev.kind == E.KIND_STORED:
            out.append(Stored(tuple(ev.hashes), int(ev.medium)))
        elif ev.kind == E.KIND_REMOVED:
            out.append(Removed(tuple(ev.hashes), int(ev.medium)))
        elif ev.kind == E.KIND_CLEARED:
            out.append(Cleared())
    return out


class KvFeeds:
    def __init__(self, table: EndpointTable, upstreams: Upstreams, prefixes: Prefixes) -> None:
        self.table = table
        self.upstreams = upstreams
        self.prefixes = prefixes
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self.batches = 0  # applied, all feeds (tests and status read it)
        self._stopping = False
        table.subscribe(self._on_table)

    def _on_table(self, table: RouteTable, models: set[str]) -> None:
        if self._stopping:
            return
        wanted: dict[Key, Endpoint] = {}
        for model in models:
            route = table.routes.get(model)
            if route is not None and route.spec.base:  # an adapter: its base's replicas' feed
                continue
            for e in route.ready if route else ():
                if e.kv_events:
                    wanted[(model, e.address, e.identity)] = e
        for key, task in list(self._tasks.items()):
            if key[0] in models and key not in wanted:
                task.cancel()
                del self._tasks[key]
                self.prefixes.forget(key[0], key[1])
        for key, e in wanted.items():
            running = self._tasks.get(key)
            if running is None or running.done():  # new, or a feed that ended for good: (re)start
                self.prefixes.forget(key[0], key[1])  # a restarted replica's old blocks
                self._tasks[key] = asyncio.get_running_loop().create_task(
                    self._follow(key[0], e), name=f"kv feed {key[0]}@{key[1]}"
                )

    async def _follow(self, model: str, e: Endpoint) -> None:
        """Watches until cancelled (the replica left the table, or the router stops); whatever
        else ends a watch — a gap, the agent gone, the channel reset under it (a certificate
        rotation cancels its calls) — drops the replica's blocks and watches again."""
        index = self.prefixes.index(model)
        delay = BACKOFF_S[0]
        me = asyncio.current_task()
        while True:
            try:
                stub = nodeagent_pb2_grpc.NodeAgentStub(self.upstreams.channel(e.address))
                async for batch in stub.WatchKvBlocks(
                    nodeagent_pb2.WatchKvBlocksRequest(model=model)
                ):
                    if batch.generation != e.generation:
                        break  # another load of the model there: the table will say so
                    events = events_of(batch)
                    if batch.snapshot:
                        index.resync(e.address, batch.seq, _pairs(events))
                    elif not index.apply(e.address, batch.seq, events):
                        break  # a gap: watch again from a snapshot
                    self.batches += 1
                    metrics.PREFIX_INDEX_BLOCKS.labels(model).set(index.entries())
                    delay = BACKOFF_S[0]
            except asyncio.CancelledError:
                if me is not None and me.cancelling():
                    # ours: the replica left (the table forgot its blocks already: forgetting
                    # here, later, could wipe a new feed's) or the router stops
                    raise
                log.debug("kv feed %s@%s: its call was cancelled (channel reset)", model, e.address)
            except Exception as err:  # the agent gone, a closed channel, a bad batch
                log.debug("kv feed %s@%s: %s", model, e.address, err)
            metrics.PREFIX_FEED_RESYNCS.labels(model).inc()
            index.forget(e.address)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(BACKOFF_S[1], delay * 2)

    async def stop(self) -> None:
        # No feed starts once stopping (a table change while we wait would add one: CI once
        # saw the dict change size under the loop below).
        self._stopping = True
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def _pairs(events: list[Event]) -> list[tuple[int, int]]:
    return [(h, ev.medium) for ev in events if isinstance(ev, Stored) for h in ev.hashes]
