"""What each tenant used through this router, per model: requests, cold starts, tokens,
GPU-seconds and cost (chargeback). Counted once per request when its stream ends; kept as totals
since start and per minute for the last 24 h (``--since``); exported to Prometheus; read by the
Usage RPC, which `meshserve usage` sums over every router."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.router.tenancy.tenants import Price
from meshserve.telemetry import metrics
from meshserve.v1 import router_pb2

KEEP_MINUTES = 24 * 60


@dataclass
class Counts:
    requests: int = 0
    cold_starts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    gpu_seconds: float = 0.0
    cost: float = 0.0
    fallbacks: int = 0  # of the requests, served as a route's fallback

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.cold_starts += other.cold_starts
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.gpu_seconds += other.gpu_seconds
        self.cost += other.cost
        self.fallbacks += other.fallbacks


class UsageLedger:
    def __init__(self) -> None:
        self.started_ms = int(time.time() * 1000)
        self.totals: dict[tuple[str, str], Counts] = {}
        self.minutes: dict[int, dict[tuple[str, str], Counts]] = {}  # minute since epoch → …

    def record(
        self,
        tenant: str,
        model: str,
        cold: bool,
        input_tokens: int,
        output_tokens: int,
        gpu_seconds: float,
        price: Price | None,
        now: float | None = None,
        fallback: bool = False,
    ) -> Counts:
        """One request that was served (its stream began); returns what it counted."""
        cost = price.cost(input_tokens, output_tokens, gpu_seconds) if price else 0.0
        c = Counts(1, int(cold), input_tokens, output_tokens, gpu_seconds, cost, int(fallback))
        key = (tenant, model)
        self.totals.setdefault(key, Counts()).add(c)
        minute = int((now if now is not None else time.time()) // 60)
        if minute not in self.minutes:  # a new minute: the ones past the 24 h go (once a minute)
            for old in [m for m in self.minutes if m <= minute - KEEP_MINUTES]:
                del self.minutes[old]
            self.minutes[minute] = {}
        self.minutes[minute].setdefault(key, Counts()).add(c)
        metrics.TENANT_REQUESTS.labels(tenant, model, "cold" if cold else "warm").inc()
        metrics.TENANT_TOKENS.labels(tenant, model, "input").inc(input_tokens)
        metrics.TENANT_TOKENS.labels(tenant, model, "output").inc(output_tokens)
        if cost:
            metrics.TENANT_COST.labels(tenant, model).inc(cost)
        return c

    def report(self, tenants: Iterable[str] | None, since_ms: int) -> tuple[list[Row], int]:
        """Rows (tenant, model, counts) for ``tenants`` (None: all) since ``since_ms`` (0: since
        start), and the time they cover from."""
        allowed = None if tenants is None else set(tenants)
        if since_ms <= self.started_ms:
            source: Iterable[tuple[tuple[str, str], Counts]] = self.totals.items()
            covered = self.started_ms
        else:
            first = since_ms // 60_000
            oldest = min(self.minutes, default=first)
            covered = max(since_ms, oldest * 60_000)
            merged: dict[tuple[str, str], Counts] = {}
            for minute, rows in self.minutes.items():
                if minute >= first:
                    for key, c in rows.items():
                        merged.setdefault(key, Counts()).add(c)
            source = merged.items()
        out: list[Row] = [(t, m, c) for (t, m), c in sorted(source, key=lambda kv: kv[0])]
        return [r for r in out if allowed is None or r[0] in allowed], covered


Row = tuple[str, str, Counts]  # tenant, model, counts


def to_proto(router_id: str, rows: list[Row], covered_ms: int) -> router_pb2.UsageResponse:
    out = router_pb2.UsageResponse(router_id=router_id, since_unix_ms=covered_ms)
    for tenant, model, r in rows:
        out.rows.add(
            tenant=tenant,
            model=model,
            requests=r.requests,
            cold_starts=r.cold_starts,
            input_tokens=r.input_tokens,
            output_tokens=r.output_tokens,
            gpu_seconds=r.gpu_seconds,
            cost=r.cost,
            fallbacks=r.fallbacks,
        )
    return out
