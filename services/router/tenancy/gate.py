"""The router's front gate: the current tenant book (from a watched file or etcd), who a call
comes from, what it may do, its limits, and this router's share of cluster-wide limits.

Book: ``--tenants FILE`` is re-read when it changes (checked every second); with
``--tenants-from-etcd`` the document at ``config/tenants`` is watched instead, so every router
agrees. A document that does not parse is logged and the last good book stays.

Caller: ``authorization: Bearer <key>`` metadata, else (with mTLS) the client certificate's
subject. No book (auth off): every caller is the one implicit tenant, as before tenancy.

Share (cluster-wide limits): every router publishes its per-tenant request rate in its demand
record; this router enforces limit x (own + e) / (sum over routers of (rate + e)), e = 0.1
req/s, from records at most ~1 s old. In steady state the routers' shares add up to 1 (the
cluster admits the limit, not more); while demand shifts, the error is the shift within one
refresh (≤ 1 s + etcd propagation), and each router's bucket holds at least one request, so
the cluster may admit up to (routers - 1) extra requests per refill when a tenant's share is
tiny everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import aetcd
import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.router.tenancy.tenants import (
    ANONYMOUS,
    OPEN_BOOK,
    Tenant,
    TenantBook,
    hash_key,
    parse_book,
)
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2

log = logging.getLogger(__name__)
FILE_CHECK_S = 1.0
SHARE_EPSILON = 0.1  # req/s every router is assumed to see of every tenant
RATE_WINDOW_S = 10.0


class BookSource:
    """Keeps ``book`` current from a file or etcd (or OPEN_BOOK: auth off)."""

    def __init__(
        self,
        path: str = "",
        client: aetcd.Client | None = None,
        keys: Keyspace | None = None,
        from_etcd: bool = False,
    ) -> None:
        self.path = Path(path) if path else None
        self.from_etcd = from_etcd
        self.book: TenantBook = OPEN_BOOK
        self.error = ""  # why the last document was refused ("" when it was taken)
        self._stamp: tuple[float, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._mirror: Mirror[cluster_pb2.TenantsDocument] | None = None
        if from_etcd:
            assert client is not None and keys is not None
            self._key = keys.tenants()
            self._mirror = Mirror(client, self._key, cluster_pb2.TenantsDocument)
            self._mirror.subscribe(self._from_etcd)
        if self.path is not None:
            self._read_file()  # fail at start-up on a bad file (ValueError), not later
            if self.error:
                raise ValueError(f"{self.path}: {self.error}")

    @property
    def auth(self) -> bool:
        return self.path is not None or self.from_etcd

    async def start(self) -> None:
        if self._mirror is not None:
            self._mirror.start()
            await asyncio.wait_for(self._mirror.synced.wait(), 30)
            if not self._mirror.snapshot:  # auth on, nobody configured yet: nobody gets in
                self.book = TenantBook(auth=True)
        if self.path is not None:
            self._task = asyncio.create_task(self._watch_file())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._mirror is not None:
            await self._mirror.stop()

    def _take(self, text: str | bytes, where: str) -> None:
        try:
            self.book = parse_book(text)
            self.error = ""
            log.info("tenants from %s: %s", where, ", ".join(t.name for t in self.book.tenants))
        except ValueError as e:
            self.error = str(e)
            log.error("tenants from %s refused, keeping the last good book: %s", where, e)

    def _read_file(self) -> None:
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self._take(self.path.read_bytes(), str(self.path))
        except OSError as e:
            self.error = f"cannot read it: {e}"
            log.error("tenants file %s: %s; keeping the last good book", self.path, e)

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(FILE_CHECK_S)
            self._read_file()

    def _from_etcd(self, snapshot: Mapping[bytes, cluster_pb2.TenantsDocument]) -> None:
        doc = snapshot.get(self._key)
        if doc is None:
            self.book = TenantBook(auth=True)
            return
        self._take(doc.yaml, "etcd config/tenants")


def unauthenticated(message: str) -> ServiceError:
    metrics.REFUSED.labels("", "UNAUTHENTICATED").inc()
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, "UNAUTHENTICATED")


def caller(book: TenantBook, authorization: str, subjects: Sequence[str] = ()) -> Tenant:
    """The tenant a call comes from, by its ``authorization`` header (``Bearer <API key>``), else
    its client certificate's ``subjects`` (mTLS); raises UNAUTHENTICATED."""
    if not book.auth:
        return ANONYMOUS
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the authorization metadata must read 'Bearer <API key>'")
        tenant = book.by_hash.get(hash_key(token.strip()))
        if tenant is None:
            raise unauthenticated("unknown API key: ask your platform team for a valid one")
        return tenant
    for subject in subjects:
        if subject in book.by_subject:
            return book.by_subject[subject]
    raise unauthenticated(
        "no credentials: send metadata 'authorization: Bearer <API key>' (or, with mTLS, a "
        "client certificate whose subject names a tenant)"
    )


def permission_denied(tenant: Tenant, model: str) -> ServiceError:
    """The same answer whether or not ``model`` exists: a tenant learns nothing of models it
    may not use."""
    metrics.REFUSED.labels(tenant.name, "PERMISSION_DENIED").inc()
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"tenant {tenant.name!r} may not use model {model!r}",
        "MODEL_NOT_ALLOWED",
        metadata=(("tenant", tenant.name), ("model", model)),
    )


class TenantRates:
    """Requests/s per tenant at this router (published with the demand), and this router's share
    of each tenant's cluster-wide limits from every router's published rates."""

    def __init__(self, router_id: str) -> None:
        self.router_id = router_id
        self._arrivals: dict[str, deque[float]] = {}
        self.others: Mapping[bytes, cluster_pb2.RouterDemand] = {}

    def arrived(self, tenant: str) -> None:
        self._arrivals.setdefault(tenant, deque()).append(time.monotonic())

    def rates(self) -> dict[str, float]:
        now = time.monotonic()
        out = {}
        for tenant, times in list(self._arrivals.items()):
            while times and times[0] < now - RATE_WINDOW_S:
                times.popleft()
            if times:
                out[tenant] = len(times) / RATE_WINDOW_S
            else:
                del self._arrivals[tenant]
        return out

    def share(self, tenant: str) -> float:
        peers = [d for d in self.others.values() if d.router_id != self.router_id]
        if not peers:
            return 1.0
        times = self._arrivals.get(tenant)
        own = len(times) / RATE_WINDOW_S if times else 0.0
        total = own + SHARE_EPSILON
        for d in peers:
            total += d.tenant_rates.get(tenant, 0.0) + SHARE_EPSILON
        return (own + SHARE_EPSILON) / total
