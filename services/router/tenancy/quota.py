"""Per-tenant and per-tenant x model limits: requests/s and tokens/min token buckets, and
concurrent streams (pure; the clock is passed in).

A request takes one request token and must find the tokens/min bucket above zero; when it ends
its input + output tokens are charged to that bucket, which may go into debt (a request's size is
known only afterwards, as LiteLLM and the SGLang gateway also do): the next requests wait until
it refills. A refused request gets RESOURCE_EXHAUSTED with RetryInfo (the time until the limit
frees a token; 1 s for a concurrency limit, which frees when some stream ends) and ErrorInfo
(reason REQUESTS_PER_S_LIMIT, TOKENS_PER_MIN_LIMIT or CONCURRENT_STREAMS_LIMIT; metadata:
tenant, limit, scope "tenant" or the model).

Several routers: each enforces ``share`` x the limit, where ``share(tenant)`` is this router's
part of the tenant's cluster-wide demand (share.py). Bucket sizes: one second of the shared rate,
at least one request, so a router with a tiny share can still pass a request now and then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from meshserve.router.tenancy.tenants import Limits, Tenant
from meshserve.rpc.errors import ServiceError

CONCURRENCY_RETRY_S = 1.0


@dataclass
class Bucket:
    level: float
    stamp: float

    def refill(self, rate: float, capacity: float, now: float) -> None:
        self.level = min(capacity, self.level + max(0.0, now - self.stamp) * rate)
        self.stamp = now


@dataclass(frozen=True)
class Ticket:
    """What a request holds while it runs: the model whose limits it took from."""

    model: str


class Quotas:
    def __init__(self, share: Callable[[str], float] | None = None) -> None:
        self.share = share or (lambda _tenant: 1.0)
        self._requests: dict[tuple[str, str], Bucket] = {}  # (tenant, scope) → bucket
        self._tokens: dict[tuple[str, str], Bucket] = {}
        self._streams: dict[tuple[str, str], int] = {}

    def admit(self, tenant: Tenant, model: str, now: float) -> Ticket:
        """Takes a request token and a stream from every limit that applies, or raises
        ServiceError(RESOURCE_EXHAUSTED) naming the one that refused (nothing taken then)."""
        scopes = _scopes(tenant, model)
        share = self._share(tenant)
        for scope, limits in scopes:
            self._check(tenant.name, scope, limits, share, now)
        for scope, limits in scopes:
            key = (tenant.name, scope)
            if limits.requests_per_s:
                self._requests[key].level -= 1.0
            if limits.concurrent:
                self._streams[key] = self._streams.get(key, 0) + 1
        return Ticket(model)

    def _share(self, tenant: Tenant) -> float:
        return min(1.0, max(0.0, self.share(tenant.name)))

    def _token_bucket(
        self, key: tuple[str, str], limits: Limits, share: float, now: float
    ) -> tuple[Bucket, float]:
        """The tokens/min bucket of ``key``, refilled to ``now``, and its rate (tokens/s)."""
        rate = limits.tokens_per_min * share / 60.0
        capacity = max(1.0, rate * 60.0)
        b = self._tokens.setdefault(key, Bucket(capacity, now))
        b.refill(rate, capacity, now)
        return b, rate

    def _check(self, tenant: str, scope: str, limits: Limits, share: float, now: float) -> None:
        key = (tenant, scope)
        if limits.requests_per_s:
            rate = limits.requests_per_s * share
            capacity = max(1.0, rate)
            b = self._requests.setdefault(key, Bucket(capacity, now))
            b.refill(rate, capacity, now)
            if b.level < 1.0:
                wait = (1.0 - b.level) / rate if rate > 0 else 1.0
                raise refused(tenant, scope, "REQUESTS_PER_S", limits.requests_per_s, wait)
        if limits.tokens_per_min:
            b, rate = self._token_bucket(key, limits, share, now)
            if b.level <= 0.0:
                wait = (1.0 - b.level) / rate if rate > 0 else 1.0
                raise refused(tenant, scope, "TOKENS_PER_MIN", limits.tokens_per_min, wait)
        if limits.concurrent and self._streams.get(key, 0) >= limits.concurrent:
            raise refused(
                tenant, scope, "CONCURRENT_STREAMS", limits.concurrent, CONCURRENCY_RETRY_S
            )

    def finish(self, tenant: Tenant, ticket: Ticket, tokens: int, now: float) -> None:
        """The request ended having used ``tokens`` (input + output): its streams are given back
        and the tokens charged (into debt if need be)."""
        share = self._share(tenant)
        for scope, limits in _scopes(tenant, ticket.model):
            key = (tenant.name, scope)
            if limits.concurrent and key in self._streams:
                self._streams[key] = max(0, self._streams[key] - 1)
            if limits.tokens_per_min and tokens:
                self._token_bucket(key, limits, share, now)[0].level -= tokens


def _scopes(tenant: Tenant, model: str) -> list[tuple[str, Limits]]:
    """The limits a request of ``tenant`` for ``model`` takes from: the tenant's, and the
    tenant x model ones where set."""
    scopes = [("tenant", tenant.limits)]
    if model in tenant.model_limits:
        scopes.append((model, tenant.model_limits[model]))
    return scopes


def refused(tenant: str, scope: str, limit: str, value: float, wait_s: float) -> ServiceError:
    where = "" if scope == "tenant" else f" for model {scope!r}"
    shown = f"{value:g}"
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} is over its {limit.lower().replace('_', ' ')} limit ({shown}){where}: "
        f"retry in {wait_s:.2f} s",
        f"{limit}_LIMIT",
        retry_after_s=max(0.001, math.ceil(wait_s * 1000) / 1000),
        metadata=(("tenant", tenant), ("limit", shown), ("scope", scope)),
    )
