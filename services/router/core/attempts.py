"""The attempt policy every relayed call shares (Generate's relay.py, unary calls' unary.py):
which upstream failures another attempt may cure, which count against a replica's breaker,
which mean the replica is gone, and the backoff between attempts."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core.admission import Slot
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.call import Call
from meshserve.router.core.table import EndpointTable
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.exclusions import Exclusions, Identity
from meshserve.rpc.errors import ServiceError, decode_details, error_reason
from meshserve.telemetry import metrics

# Codes on which another attempt may succeed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.NOT_FOUND,  # the replica unloaded between the table and the call
        grpc.StatusCode.CANCELLED,  # the agent shut down mid-call
    }
)
# Reasons an agent gives when the replica itself is gone (engines/prompts.py), or when it may
# be (cut off from etcd, cluster/fence.py): the request leaves that replica at once.
GONE_REASONS = frozenset({"ENGINE_DIED", "MODEL_UNLOADED", "AGENT_FENCED"})
NO_CONNECTION = "failed to connect"  # gRPC's UNAVAILABLE when no connection can be made
OUT_OF_MEMORY = "DEVICE_OUT_OF_MEMORY"  # engines/prompts.py: a device OOM during a request
# Failures that say something about the replica's health (breakers).
UNHEALTHY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0


class Broken(Exception):
    """An attempt ended without finishing the stream; another may go on."""

    def __init__(
        self,
        what: str,
        unhealthy: bool = True,
        saturated: bool = False,
        gone: bool = False,
        unreachable: bool = False,
    ) -> None:
        super().__init__(what)
        self.what = what
        self.unhealthy = unhealthy  # counts against the replica's breaker
        self.saturated = saturated  # the replica was full: back to the queue
        self.gone = gone  # the replica said it is gone for good (its engine died, unloaded)
        self.unreachable = unreachable  # no connection: its agent died (or is cut off)


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Full jitter (AWS): uniform in [0, min(cap, base x 2^attempt)]."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def broken(e: grpc.aio.AioRpcError, departed: bool = False) -> Exception:
    """An upstream status as `Broken` (another replica may go on) or as itself (it may not)."""
    code = e.code()
    what = f"{code.name}: {e.details()}"
    if departed:  # the replica left the table while the call ran
        return Broken(f"replica left the table ({what})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not limit_of_ours(e):
        if error_reason(decode_details(e.trailing_metadata())) == OUT_OF_MEMORY:
            # The replica ran out of device memory for this request: another may not, and
            # waiting for this one would repeat it — a failed attempt (not its health).
            return Broken(what, unhealthy=False)
        return Broken(what, unhealthy=False, saturated=True)  # full: back to the queue
    if code in RETRYABLE:
        reason = error_reason(decode_details(e.trailing_metadata()))
        unreachable = code == grpc.StatusCode.UNAVAILABLE and NO_CONNECTION in (e.details() or "")
        return Broken(
            what, unhealthy=code in UNHEALTHY, gone=reason in GONE_REASONS, unreachable=unreachable
        )
    passed: Exception = e  # the caller's own error (INVALID_ARGUMENT, DEADLINE_EXCEEDED …)
    return passed


def limit_of_ours(e: grpc.aio.AioRpcError) -> bool:
    """RESOURCE_EXHAUSTED for a message over gRPC's size limit is the request's fault."""
    return "larger than max" in (e.details() or "")


@dataclass
class Tries:
    """One request's attempts so far."""

    model: str
    failed: Exclusions = field(default_factory=Exclusions)  # replicas it gave up on, a while
    strikes: dict[Identity, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)  # "node: what went wrong", one per attempt
    retries: int = 0  # failed attempts before any answer
    saturated: int = 0  # attempts a full replica sent back
    full_since: float = 0.0
    orphaned_since: float = 0.0  # its only replica became unreachable (waiting for the table)


class AttemptPolicy:
    """Retries before the first answer, the same for streaming and unary calls: a full replica
    (RESOURCE_EXHAUSTED from an agent) sends the request back to the queue with backoff, for up
    to ``queue_timeout_s``; a failure counts against the replica's breaker, leaves the replica
    for this request (`give_up_on`) and is retried after a jittered backoff within
    ``max_attempts`` and the router's retry budget."""

    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        breakers: Breakers,
        budget: RetryBudget,
    ) -> None:
        self.config = config
        self.table = table
        self.breakers = breakers
        self.budget = budget
        self.rng = random.Random()

    def full(self, tries: Tries, now: float) -> float:
        """The replica was full: the backoff before queueing again; raises RESOURCE_EXHAUSTED
        once replicas stayed full for ``queue_timeout_s``."""
        tries.saturated += 1
        tries.full_since = tries.full_since or now
        if now - tries.full_since > self.config.queue_timeout_s:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {tries.model!r}: replicas stayed full (other routers' streams) "
                f"for {now - tries.full_since:.0f} s: " + "; ".join(tries.log[-3:]),
                "REPLICAS_FULL",
                retry_after_s=1.0,
            )
        return backoff_s(min(tries.saturated, 5), self.rng)

    def retry(self, tries: Tries, slot: Slot, b: Broken, now: float) -> float:
        """An attempt failed before any answer: the backoff before the next; raises UNAVAILABLE
        when attempts or the retry budget are spent. The model's only replica unreachable (its
        agent died; its lease has yet to end): the request waits for the table — the replica
        leaves, another is placed — within ``queue_timeout_s`` (and its deadline) instead of
        spending its attempts on it (the exclusions space the tries out)."""
        if b.unreachable and not self.others(slot, slot.endpoint.identity):
            tries.orphaned_since = tries.orphaned_since or now
            if now - tries.orphaned_since <= self.config.queue_timeout_s:
                return backoff_s(5, self.rng)
        tries.retries += 1
        if tries.retries >= self.config.max_attempts:
            raise self.exhausted(tries.model, tries.log, "attempts")
        if not self.budget.try_retry():
            metrics.RETRIES_DENIED.inc()
            raise self.exhausted(tries.model, tries.log, "budget")
        metrics.RETRIES.labels(tries.model).inc()
        return backoff_s(tries.retries, self.rng)

    def give_up_on(
        self,
        slot: Slot,
        b: Broken,
        tries: Tries,
        now: float,
    ) -> None:
        """Counts the failure against the replica's breaker, and leaves the replica for this
        request when it has others to go to, at its second failure (a transient failure of the
        only replica is not a verdict), or at once when it said it is gone for good (its engine
        died, it was unloaded: a reload is another replica, which the request may take)."""
        if b.unhealthy:
            self.breakers.failure((slot.endpoint.address, slot.model), now)
        identity = slot.endpoint.identity
        strikes = tries.strikes
        strikes[identity] = strikes.get(identity, 0) + 1
        if b.gone or strikes[identity] >= 2 or self.others(slot, identity):
            tries.failed.add(identity)
            strikes[identity] = 0  # a retry after the exclusion gets its two chances again

    def others(self, slot: Slot, identity: Identity) -> bool:
        """Whether the model has another READY replica to go to."""
        route = self.table.current.resolve(slot.model)
        return route is not None and any(e.identity != identity for e in route.ready)

    async def pause(self, seconds: float, call: Call) -> None:
        left = call.remaining_s()
        if left is not None:
            seconds = min(seconds, max(0.0, left - 0.2))
        await asyncio.sleep(seconds)

    def exhausted(self, model: str, attempts: list[str], why: str) -> ServiceError:
        what = {
            "attempts": f"every attempt failed before an answer ({len(attempts)})",
            "budget": "an attempt failed and the router's retry budget is spent (retry storm "
            "protection)",
            "failovers": f"the stream broke {len(attempts)} times (max_failovers "
            f"{self.config.max_failovers})",
        }[why]
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"model {model!r}: {what}: " + "; ".join(attempts),
            "ALL_REPLICAS_FAILED" if why != "failovers" else "FAILOVERS_EXHAUSTED",
            retry_after_s=1.0,
        )
