"""Routes in the router (DESIGN §9): the `routes/` documents mirrored from etcd into policies
(routing/routes.py decides), and what each route's targets did here (`meshserve route status`:
the canary analysis view). A route document takes effect on every router as its watch delivers
it (well under a second); a deleted one leaves its name unknown again."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import aetcd
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Change, Mirror
from meshserve.router.routing.routes import Policy
from meshserve.v1 import cluster_pb2, router_pb2

log = logging.getLogger(__name__)
KEPT = 1024  # requests kept per target for the quantiles


@dataclass
class TargetStats:
    requests: int = 0
    errors: int = 0
    fell_back: int = 0
    skipped: int = 0  # shadows not sent (cap, external) or shed for real traffic: no verdict
    # (ttft s or None, e2e s, output tokens) of the last KEPT requests that ended
    samples: deque[tuple[float | None, float, int]] = field(
        default_factory=lambda: deque(maxlen=KEPT)
    )

    def ended(self, ok: bool, ttft_s: float | None, e2e_s: float, tokens: int) -> None:
        self.requests += 1
        self.errors += not ok
        if ok:
            self.samples.append((ttft_s, e2e_s, tokens))


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


class Routes:
    """Policies by route name, kept from etcd, and the statistics of their targets."""

    def __init__(self, client: aetcd.Client | None = None, keys: Keyspace | None = None) -> None:
        self.policies: dict[str, Policy] = {}
        self.stats: dict[tuple[str, str, str], TargetStats] = {}  # (route, model, role)
        self._mirror: Mirror[cluster_pb2.RouteSpec] | None = None
        if client is not None and keys is not None:
            self._mirror = Mirror(client, keys.routes(), cluster_pb2.RouteSpec)
            self._mirror.subscribe_changes(self._changed)

    def start(self) -> None:
        if self._mirror is not None:
            self._mirror.start()

    async def synced(self) -> None:
        if self._mirror is not None:
            await self._mirror.synced.wait()

    async def stop(self) -> None:
        if self._mirror is not None:
            await self._mirror.stop()

    def put(self, spec: cluster_pb2.RouteSpec | None, name: str = "") -> None:
        """A route document put (or deleted: None)."""
        if spec is None:
            self.policies.pop(name, None)
            for key in [k for k in self.stats if k[0] == name]:
                del self.stats[key]
            return
        self.policies[spec.name] = Policy(spec)

    def _changed(self, changes: list[Change[cluster_pb2.RouteSpec]]) -> None:
        for _key, old, new in changes:
            if new is not None:
                self.put(new)
                log.info("route %s: %d target(s), %d rule(s), %d fallback(s)", new.name,
                         len(new.targets), len(new.rules), len(new.fallbacks))  # fmt: skip
            elif old is not None:
                self.put(None, old.name)
                log.info("route %s deleted", old.name)

    def get(self, name: str) -> Policy | None:
        return self.policies.get(name) if self.policies else None

    def target(self, route: str, model: str, role: str) -> TargetStats:
        key = (route, model, role)
        got = self.stats.get(key)
        if got is None:
            got = self.stats[key] = TargetStats()
        return got

    def status(self, route: str, router_id: str) -> router_pb2.RouteStatusResponse:
        out = router_pb2.RouteStatusResponse(router_id=router_id, route=route)
        rows: Mapping[tuple[str, str, str], TargetStats] = self.stats
        for (name, model, role), s in sorted(rows.items()):
            if name != route:
                continue
            ttfts = sorted(t for t, _, _ in s.samples if t is not None)
            e2es = sorted(e for _, e, _ in s.samples)
            secs = sum(e2es)
            out.targets.add(
                model=model, role=role, requests=s.requests, errors=s.errors,
                fell_back=s.fell_back, ttft_p50_s=_q(ttfts, 0.5), ttft_p99_s=_q(ttfts, 0.99),
                e2e_p50_s=_q(e2es, 0.5), e2e_p99_s=_q(e2es, 0.99),
                tokens_per_s=sum(n for _, _, n in s.samples) / secs if secs else 0.0,
            )  # fmt: skip
        return out
