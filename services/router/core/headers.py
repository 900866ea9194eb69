"""The response headers of a relayed stream (relay.py): set once on the `Call`, for the first
message of the first attempt that has one (the front sends them) — the serving node and model,
the attempt that answered, the time queued, and a W3C traceresponse."""

from __future__ import annotations

import time
from typing import Any

from meshserve.router.core.admission import Slot
from meshserve.router.core.call import Call
from meshserve.router.core.demand import DemandTracker
from meshserve.telemetry import metrics
from meshserve.telemetry.server_interceptor import traceresponse
from meshserve.telemetry.tracing import exemplar
from opentelemetry import trace

FORWARDED_HEADERS = frozenset({"meshserve-node", "meshserve-model"})


class Headers:
    """Response headers go once, with the first message of the first attempt that has one."""

    def __init__(self) -> None:
        self.sent = False
        self.first_token_s = 0.0  # the first answering attempt's wait for its first message

    async def send(
        self,
        call: Call,
        upstream: Any,
        slot: Slot,
        attempt: int,
        start: float,
        demand: DemandTracker,
    ) -> None:
        self.sent = True
        ttft = time.perf_counter() - start
        metrics.TTFT.labels("router", slot.model).observe(ttft, exemplar())
        demand.first_token(slot.model, ttft)
        span = trace.get_current_span()
        span.set_attribute("meshserve.ttft_s", ttft)
        forwarded = await upstream.initial_metadata() or ()
        headers = [(k, v) for k, v in forwarded if k in FORWARDED_HEADERS]
        headers.append(("meshserve-attempts", str(attempt)))
        if (tr := traceresponse()) is not None:
            headers.append(tr)
        if slot.waited_s > 0.001:
            headers.append(("meshserve-queued-ms", str(round(slot.waited_s * 1000))))
            span.set_attribute("meshserve.queued_s", slot.waited_s)
        call.headers.extend(headers)
