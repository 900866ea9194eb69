"""Per-request accounting, in one place for every front and call kind: demand (arrivals and
streams in flight, for the scheduler), the in-flight gauge and request counter, the tenant's
limits (a ticket taken at admission, given back at the end) and usage (what a served request
used, for chargeback), and per-model statistics (KServe's ModelStatistics reads them)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from meshserve.router.core.demand import DemandTracker
from meshserve.router.tenancy.gate import BookSource, TenantRates
from meshserve.router.tenancy.quota import Quotas, Ticket
from meshserve.router.tenancy.tenants import Tenant
from meshserve.router.tenancy.usage import UsageLedger
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.v1 import inference_pb2


@dataclass
class Tenancy:
    """The gate's parts: the tenant book, this router's per-tenant rates (its share of
    cluster-wide limits), the limits, and the usage ledger."""

    source: BookSource
    rates: TenantRates
    quotas: Quotas
    ledger: UsageLedger

    def admit(self, tenant: Tenant, model: str) -> Ticket | None:
        self.rates.arrived(tenant.name)
        if not (tenant.limits.any or tenant.model_limits):
            return None
        try:
            return self.quotas.admit(tenant, model, time.monotonic())
        except ServiceError as e:
            metrics.REFUSED.labels(tenant.name, e.reason).inc()
            raise

    def done(
        self,
        tenant: Tenant,
        ticket: Ticket | None,
        model: str,
        cold: bool,
        usage: tuple[int, int],
        gpu_seconds: float,
        served: bool = True,
        fallback: bool = False,
    ) -> None:
        """The request ended: its limits get their stream back and its tokens; a request that
        was served (its stream began) is counted for its tenant."""
        if ticket is not None:
            self.quotas.finish(tenant, ticket, sum(usage), time.monotonic())
        if not served:
            return
        price = self.source.book.prices.get(model)
        self.ledger.record(
            tenant.name, model, cold, usage[0], usage[1], gpu_seconds, price, fallback=fallback
        )


@dataclass
class Used:
    """What one request used, filled in by the call as it goes, counted once when it ends."""

    usage: tuple[int, int] = (0, 0)  # (input, output) tokens
    gpu_seconds: float = 0.0
    served: bool = False  # an answer (or a stream's first message) reached the caller
    fallback: bool = False  # served by a route's fallback


@dataclass
class ModelStats:
    """Requests a model served through this router, and their time (KServe's statistics)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_ms: int = 0  # when the last one ended (unix ms)

    def add(self, ok: bool, ns: int) -> None:
        if ok:
            self.success, self.success_ns = self.success + 1, self.success_ns + ns
        else:
            self.fail, self.fail_ns = self.fail + 1, self.fail_ns + ns
        self.last_ms = int(time.time() * 1000)


class Accountant:
    def __init__(self, tenancy: Tenancy, demand: DemandTracker) -> None:
        self.tenancy = tenancy
        self.demand = demand
        self.stats: dict[str, ModelStats] = {}

    def refused(self, model: str, started: float) -> None:
        """A front refused a request to ``model`` before it reached the core (it could not
        translate it): a failed inference in the model's statistics."""
        ns = int((time.perf_counter() - started) * 1e9)
        self.stats.setdefault(model, ModelStats()).add(False, ns)

    @contextlib.contextmanager
    def request(self, tenant: Tenant, model: str, cold: bool) -> Iterator[Used]:
        """One request of ``tenant`` to ``model`` (``cold``: no replica was READY as it came):
        the tenant's limits admit it (or raise), and everything is counted when it ends."""
        ticket = self.tenancy.admit(tenant, model)
        used = Used()
        code = "OK"
        started = time.perf_counter()
        self.demand.arrived(model)
        self.demand.in_flight(model, +1)
        metrics.IN_FLIGHT.labels("router", model).inc()
        try:
            yield used
        except BaseException as e:
            code = handlers.code_of(e)
            raise
        finally:
            self.demand.in_flight(model, -1)
            metrics.IN_FLIGHT.labels("router", model).dec()
            metrics.REQUESTS.labels("router", model, code).inc()
            ns = int((time.perf_counter() - started) * 1e9)
            self.stats.setdefault(model, ModelStats()).add(code == "OK", ns)
            self.tenancy.done(
                tenant, ticket, model, cold, used.usage, used.gpu_seconds, used.served,
                used.fallback,
            )  # fmt: skip


def usage_of(messages: list[bytes]) -> tuple[int, int]:
    """(input, output) tokens of a relayed stream: the final message's usage, or (a stream that
    ended early) the tokens delivered, input unknown."""
    if not messages:
        return 0, 0
    last = inference_pb2.GenerateResponse.FromString(messages[-1])
    if last.finish_reason and (last.usage.input_tokens or last.usage.output_tokens):
        return int(last.usage.input_tokens), int(last.usage.output_tokens)
    return 0, sum(len(inference_pb2.GenerateResponse.FromString(m).token_ids) for m in messages)


def gpu_seconds_of(messages: list[bytes]) -> float:
    """The device time a relayed stream is billed: what the agent that finished it reports on
    its final message (its fair share of the replica: `Usage.gpu_seconds`). A stream that failed
    over is billed for the part its last replica served (an agent that died cannot report), and
    one that ended without a final message for nothing."""
    if not messages:
        return 0.0
    last = inference_pb2.GenerateResponse.FromString(messages[-1])
    return float(last.usage.gpu_seconds) if last.finish_reason else 0.0
