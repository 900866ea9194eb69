"""A lease kept alive in the background, after etcd's ``clientv3/concurrency.Session``.

aetcd has no background keepalive, so this owns it. Keys written with ``session.lease_id`` vanish
when the process dies (the lease expires after ``ttl_s``). If the lease is lost while the process
lives (etcd restored from a backup, a long partition), the session grants a new one and calls every
``on_new_lease`` callback so the owner can write its keys again: liveness is the lease (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import aetcd
from meshserve.cluster.keepalive import keeper_for

log = logging.getLogger(__name__)

NewLeaseCallback = Callable[[int], Awaitable[None]]


class Session:
    """Grant, keep alive, re-grant, revoke. ``lost`` is set each time a lease is found expired."""

    def __init__(self, client: aetcd.Client, ttl_s: int = 5) -> None:
        if ttl_s < 2:
            raise ValueError(f"ttl_s must be >= 2 (etcd's minimum lease TTL), got {ttl_s}")
        self._client = client
        self.ttl_s = ttl_s
        self._lease_id = 0
        self._callbacks: list[NewLeaseCallback] = []
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        self._renewed = 0.0  # loop time at which the last grant or refresh that worked was sent

    @property
    def lease_id(self) -> int:
        if not self._lease_id:
            raise RuntimeError("session not started")
        return self._lease_id

    def on_new_lease(self, callback: NewLeaseCallback) -> None:
        """Runs ``callback(lease_id)`` after a lost lease was replaced by a new one."""
        self._callbacks.append(callback)

    def unrenewed_s(self) -> float:
        """Seconds since the last grant or refresh that worked was sent: past ``ttl_s``, etcd
        may have let the lease expire (cluster/fence.py)."""
        return asyncio.get_running_loop().time() - self._renewed

    async def start(self) -> None:
        sent = asyncio.get_running_loop().time()
        lease = await self._client.lease(self.ttl_s)
        self._lease_id, self._renewed = lease.id, sent
        self._task = asyncio.create_task(self._keepalive(), name="session-keepalive")

    async def _keepalive(self) -> None:
        """A refresh every third of the TTL, on a schedule (not a pause after each reply, which
        a slow reply would stretch), started at a random phase so that a process holding many
        leases does not refresh them all in one burst; over the few keepalive streams its etcd
        client shares (keepalive.py)."""
        interval = self.ttl_s / 3
        loop = asyncio.get_running_loop()
        due = loop.time() + random.uniform(0.25, 1.0) * interval
        keeper = keeper_for(self._client)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due + interval, loop.time() + interval / 4)
            try:
                sent = loop.time()
                if await keeper.refresh(self._lease_id, interval) > 0:
                    self._renewed = sent
                    continue
                log.warning("lease %x expired; granting a new one", self._lease_id)
                self.lost.set()
                # Leases lost together (etcd overloaded or restored) come back spread out, not
                # as one burst of grants and re-registrations that overloads it again.
                await asyncio.sleep(random.uniform(0, interval))
                sent = loop.time()
                lease = await self._client.lease(self.ttl_s)
                self._lease_id, self._renewed = lease.id, sent
                self.lost.clear()
                for callback in self._callbacks:
                    await callback(self._lease_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd down: the next refresh opens a new stream
                log.info("lease keepalive failed (%s); retrying", type(e).__name__)

    async def abandon(self) -> None:
        """Stops the keepalive and leaves the lease to expire at its TTL (a simulated crash)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        """Stops the keepalive and revokes the lease, so this process's keys vanish at once."""
        await self.abandon()
        if self._lease_id:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.revoke_lease(self._lease_id), 2.0)
