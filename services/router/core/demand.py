"""What this router sees of demand, published to ``demand/<router>`` about every second so the
scheduler can place, keep and scale models (DESIGN §4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.router.routing.breakers import CLOSED, Breakers
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2

log = logging.getLogger(__name__)
WINDOW_S = 10.0


@dataclass
class _Model:
    in_flight: int = 0
    queued: int = 0
    last_request: float = 0.0  # s since the epoch
    arrivals: deque[float] = field(default_factory=deque)  # monotonic times in the window
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class DemandTracker:
    def __init__(
        self,
        router_id: str,
        breakers: Breakers | None = None,
        tenant_rates: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.router_id = router_id
        self.address = ""  # where this router listens; set once bound
        self.tenant_rates = tenant_rates  # requests/s per tenant (gate.TenantRates.rates)
        self.models: dict[str, _Model] = {}
        self.breakers = breakers  # published with the demand, for `meshserve status`
        self._exported: set[tuple[str, str]] = set()  # breakers with a gauge series

    def _m(self, model: str) -> _Model:
        return self.models.setdefault(model, _Model())

    def arrived(self, model: str) -> None:
        m = self._m(model)
        m.last_request = time.time()
        m.arrivals.append(time.monotonic())

    def queued(self, model: str, delta: int) -> None:
        self._m(model).queued += delta

    def in_flight(self, model: str, delta: int) -> None:
        self._m(model).in_flight += delta

    def first_token(self, model: str, seconds: float) -> None:
        self._m(model).ttfts.append(seconds)

    def snapshot(self) -> cluster_pb2.RouterDemand:
        now = time.monotonic()
        out = cluster_pb2.RouterDemand(router_id=self.router_id, address=self.address)
        if self.tenant_rates is not None:
            out.tenant_rates.update(self.tenant_rates())
        for name, m in sorted(self.models.items()):
            while m.arrivals and m.arrivals[0] < now - WINDOW_S:
                m.arrivals.popleft()
            ttfts = sorted(m.ttfts)
            out.models.add(
                model=name,
                request_rate=len(m.arrivals) / WINDOW_S,
                in_flight=m.in_flight,
                queued=m.queued,
                last_request_unix_ms=int(m.last_request * 1000),
                ttft_p50_s=ttfts[len(ttfts) // 2] if ttfts else 0.0,
                ttft_p99_s=ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else 0.0,
            )
        if self.breakers is not None:
            views = list(self.breakers.views(now))
            # A pruned breaker (its replica gone) must not leave its last value behind: an
            # open one would keep MeshserveBreakerOpen firing for a replica that no longer exists.
            for key in self._exported - {v.key for v in views}:
                metrics.BREAKER_OPEN.remove(*key)
            self._exported = {v.key for v in views}
            for v in views:
                address, model = v.key
                out.breakers.add(
                    address=address,
                    model=model,
                    state=v.state,
                    consecutive_failures=v.consecutive_failures,
                    opened=v.opened,
                    retry_in_s=round(v.retry_in_s, 1),
                )
                metrics.BREAKER_OPEN.labels(address, model).set(1 if v.state != CLOSED else 0)
        return out


async def publish_demand(
    tracker: DemandTracker, store: Store, session: Session, interval_s: float
) -> None:
    """Writes the tracker's snapshot when it changed (and every 10 intervals regardless)."""
    last = b""
    ticks = 0
    while True:
        await asyncio.sleep(interval_s)
        ticks += 1
        snap = tracker.snapshot()
        body = snap.SerializeToString()
        if body == last and ticks % 10:
            continue
        snap.updated_unix_ms = int(time.time() * 1000)
        with contextlib.suppress(Exception):
            await store.put(store.keys.demand(tracker.router_id), snap, lease=session.lease_id)
            last = body
