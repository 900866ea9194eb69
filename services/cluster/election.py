"""Leader election, after etcd's ``clientv3/concurrency.Election``.

Each candidate writes ``<prefix><lease hex>`` under its session's lease; the key with the lowest
create revision leads. That create revision is the fencing token: the leader writes placements only
in a transaction that checks its key still has it (`Store.txn_if_created_at`), so a deposed
leader's write fails even if it still believes it leads (a lease is not a mutex; DESIGN §4).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aetcd
from meshserve.cluster.session import Session


@dataclass(frozen=True)
class Leadership:
    """What `Election.campaign` returns once this candidate leads."""

    key: bytes
    token: int  # create revision of ``key``; written into every placement as its epoch


@dataclass(frozen=True)
class Leader:
    key: bytes
    value: bytes
    create_revision: int


class Election:
    def __init__(self, client: aetcd.Client, session: Session, prefix: bytes) -> None:
        self._client = client
        self._session = session
        self._prefix = prefix
        self._key: bytes | None = None

    async def campaign(self, value: bytes) -> Leadership:
        """Blocks until this candidate leads; returns its key and fencing token."""
        key = self._prefix + f"{self._session.lease_id:x}".encode()
        tx = self._client.transactions
        await self._client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, value, lease=self._session.lease_id)],
            failure=[],
        )
        got = await self._client.get(key)
        if got is None:  # our lease expired between the two calls
            raise ConnectionError("election key vanished right after it was written")
        self._key = key
        token = int(got.create_revision)
        while True:
            ahead = [kv for kv in await self._candidates() if kv.create_revision < token]
            if not ahead:
                return Leadership(key, token)
            # Wait for the candidate just ahead to go (not the leader: no thundering herd).
            await self._wait_deleted(ahead[-1].key, ahead[-1].mod_revision)

    async def _candidates(self) -> list[aetcd.rtypes.KeyValue]:
        got = await self._client.get_prefix(self._prefix, sort_order="ascend", sort_target="create")
        return list(got)

    async def _wait_deleted(self, key: bytes, revision: int) -> None:
        watch = await self._client.watch(key, start_revision=revision + 1)
        try:
            if await self._client.get(key) is None:
                return
            async for event in watch:
                if event.kind == "DELETE":
                    return
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def leader(self) -> Leader | None:
        """The current leader's key and value, or None when nobody campaigns."""
        candidates = await self._candidates()
        if not candidates:
            return None
        kv = candidates[0]
        return Leader(kv.key, kv.value, kv.create_revision)

    async def resign(self) -> None:
        """Gives up leadership (or candidacy) by deleting this candidate's key."""
        if self._key is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.delete(self._key), 2.0)
            self._key = None
