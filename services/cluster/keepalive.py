"""A few LeaseKeepAlive streams per etcd client, shared by every lease the process keeps alive.

etcd's Go client (clientv3's lessor) sends the keepalives of all its leases over a single
bidirectional stream. aetcd's ``refresh_lease`` opens a new stream per refresh and leaves it to
the garbage collector; with a process holding many leases (``meshserve agent --simulate 1000``)
that is a thousand streams a second. `LeaseKeeper` writes each refresh onto one of a few
long-lived streams and matches replies to waiters by lease id; a broken stream fails its waiters
(their session retries) and the next refresh opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

import aetcd
from aetcd import rpc

log = logging.getLogger(__name__)
_keepers: weakref.WeakKeyDictionary[aetcd.Client, LeaseKeeper] = weakref.WeakKeyDictionary()


def keeper_for(client: aetcd.Client) -> LeaseKeeper:
    """The process's keeper for ``client`` (one per client, created on first use)."""
    keeper = _keepers.get(client)
    if keeper is None:
        keeper = _keepers[client] = LeaseKeeper(client)
    return keeper


def stream_of(lease_id: int, streams: int) -> int:
    """The stream a lease keeps to: Fibonacci hashing of its id. etcd's lease ids come from a
    counter it shares with writes, so ``id % streams`` can leave streams unused (it did);
    multiplying by 2^64/φ spreads consecutive and strided ids alike."""
    return ((lease_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) * streams >> 64


class _Stream:
    """One LeaseKeepAlive call and the refreshes waiting for their reply on it."""

    def __init__(self, call: Any, slot: int) -> None:
        self.call = call
        self.slot = slot
        self.waiting: dict[int, list[asyncio.Future[int]]] = {}
        self.reader: asyncio.Task[None] | None = None


class LeaseKeeper:
    """``STREAMS`` keepalive streams, each lease always on the same one: etcd renews a
    stream's leases one after another, each after waiting for its apply loop to catch up, so a
    single stream behind a burst of writes answers too late for a thousand short leases."""

    STREAMS = 8

    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self._streams: list[_Stream | None] = [None] * self.STREAMS
        self._locks = [asyncio.Lock() for _ in range(self.STREAMS)]

    async def refresh(self, lease_id: int, timeout_s: float) -> int:
        """Keeps ``lease_id`` alive once: its remaining TTL in seconds, 0 when it has expired.
        Raises what broke the stream, or TimeoutError."""
        slot = stream_of(lease_id, self.STREAMS)
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout_s):
            async with self._locks[slot]:  # one write at a time on a gRPC stream
                stream = await self._open(slot)
                stream.waiting.setdefault(lease_id, []).append(waiter)
                try:
                    await stream.call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                except BaseException:
                    waiter.cancel()
                    raise
            try:
                return await waiter
            finally:
                waiters = stream.waiting.get(lease_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)

    async def _open(self, slot: int) -> _Stream:
        stream = self._streams[slot]
        if stream is None or stream.call.done():
            await self._client.connect()
            call = self._client.leasestub.LeaseKeepAlive(metadata=self._client.metadata)
            stream = self._streams[slot] = _Stream(call, slot)
            stream.reader = asyncio.create_task(self._read(stream), name="lease-keepalive")
        return stream

    async def _read(self, stream: _Stream) -> None:
        error: BaseException = ConnectionError("the lease keepalive stream ended")
        try:
            async for reply in stream.call:
                for waiter in stream.waiting.pop(int(reply.ID), ()):
                    if not waiter.done():
                        waiter.set_result(int(reply.TTL))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        finally:
            if self._streams[stream.slot] is stream:
                self._streams[stream.slot] = None
            # This stream's waiters cannot get their reply now: their sessions retry.
            for waiters in stream.waiting.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)
            stream.waiting.clear()

    async def close(self) -> None:
        streams, self._streams = self._streams, [None] * self.STREAMS
        for stream in streams:
            if stream is None:
                continue
            stream.call.cancel()
            if stream.reader is not None:
                stream.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stream.reader
