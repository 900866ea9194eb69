"""Circuit breakers per (replica, model) and the retry budget (pure, clock passed in)."""

from __future__ import annotations

import grpc
from meshserve.nodeagent.engines.prompts import out_of_memory
from meshserve.router.core.attempts import Broken, broken
from meshserve.router.core.budget import RetryBudget
from meshserve.router.routing.breakers import CLOSED, HALF_OPEN, OPEN, Breakers
from meshserve.rpc.errors import DETAILS_KEY, ServiceError

A = ("10.0.0.1:5000", "m")
B = ("10.0.0.1:5000", "other")  # same agent, another model: its own breaker


def test_consecutive_failures_open_then_half_open_probe_closes() -> None:
    br = Breakers(consecutive=3, cooldown_s=5.0)
    for t in (0.0, 0.1):
        br.failure(A, t)
        assert br.state(A, t) == CLOSED
    br.failure(A, 0.2)
    assert br.state(A, 0.2) == OPEN and not br.allows(A, 0.2)
    assert br.allows(B, 0.2)  # per (agent, model)
    assert br.state(A, 5.1) == OPEN  # cool-down not over
    assert br.state(A, 5.3) == HALF_OPEN and br.allows(A, 5.3)
    br.sent(A, 5.3)
    assert not br.allows(A, 5.3)  # one probe at a time
    br.success(A, 5.4)
    assert br.state(A, 5.4) == CLOSED and br.allows(A, 5.4)


def test_a_probe_that_said_nothing_lets_the_next_request_probe() -> None:
    """A half-open probe ended by the caller's own error or a cancel reports no outcome: once
    released, the next request probes (it used to stay 'probing' for good)."""
    br = Breakers(consecutive=1, cooldown_s=1.0)
    br.failure(A, 0.0)
    br.sent(A, 1.5)
    assert br.state(A, 1.5) == HALF_OPEN and not br.allows(A, 1.5)
    br.released(A)
    assert br.allows(A, 1.6)
    br.sent(A, 1.6)
    br.success(A, 1.7)
    br.released(A)  # after an outcome, releasing changes nothing
    assert br.state(A, 1.7) == CLOSED and br.allows(A, 1.7)


def test_failed_probe_reopens_with_a_longer_cooldown() -> None:
    br = Breakers(consecutive=1, cooldown_s=2.0, max_cooldown_s=5.0)
    br.failure(A, 0.0)
    assert br.state(A, 1.9) == OPEN and br.state(A, 2.0) == HALF_OPEN
    br.sent(A, 2.0)
    br.failure(A, 2.1)  # the probe failed
    assert br.state(A, 2.1) == OPEN
    assert br.state(A, 5.9) == OPEN and br.state(A, 6.1) == HALF_OPEN  # 4 s now
    br.failure(A, 6.2)
    assert br.state(A, 11.1) == OPEN and br.state(A, 11.3) == HALF_OPEN  # capped at 5 s
    view = next(br.views(11.3))
    assert view.opened == 3


def test_failure_rate_opens_without_a_streak() -> None:
    br = Breakers(consecutive=100, failure_rate=0.5, min_requests=10, window_s=30.0)
    for i in range(10):  # alternating: never 2 failures in a row, 50 % failed
        (br.failure if i % 2 else br.success)(A, float(i))
    assert br.state(A, 10.0) == OPEN
    # Old outcomes leave the window: a fresh breaker on B with failures long ago stays closed.
    for i in range(5):
        br.failure(B, float(i))
        br.success(B, float(i))
    for i in range(6):
        br.success(B, 100.0 + i)
    assert br.state(B, 106.0) == CLOSED


def test_retry_budget_allows_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, reserve=2.0, cap=5.0)
    assert budget.try_retry() and budget.try_retry()
    assert not budget.try_retry()  # reserve spent, no traffic yet
    for _ in range(10):
        budget.request()  # 10 requests earn 2 retries
    assert budget.try_retry() and budget.try_retry() and not budget.try_retry()
    for _ in range(1000):
        budget.request()
    assert budget.tokens == 5.0  # capped: a quiet spell does not bank a storm
    assert budget.denied == 2


def test_breakers_of_departed_replicas_are_pruned_once_quiet() -> None:
    br = Breakers(consecutive=1, cooldown_s=1.0, max_cooldown_s=2.0)
    br.failure(A, 0.0)  # open until 1.0
    br.success(B, 0.0)
    br.prune(alive=set(), now=0.5)
    assert [v.key for v in br.views(0.5)] == [A]  # still open: kept for status
    br.prune(alive=set(), now=3.5)  # cool-down long over, replica gone
    assert list(br.views(3.5)) == []
    br.failure(A, 4.0)
    br.prune(alive={A}, now=100.0)  # in the table: kept whatever its state
    assert [v.key for v in br.views(100.0)] == [A]


def test_a_pruned_breaker_leaves_no_open_gauge_behind() -> None:
    from meshserve.router.core.demand import DemandTracker
    from meshserve.telemetry import metrics

    key = ("10.9.9.9:1", "gone-model")
    br = Breakers(consecutive=1, cooldown_s=1000.0, max_cooldown_s=1000.0)
    tracker = DemandTracker("r", br)
    br.failure(key, 0.0)  # open (the tracker reads the monotonic clock: far past 0)
    tracker.snapshot()
    assert metrics.BREAKER_OPEN.labels(*key)._value.get() == 1
    br.prune(alive=set(), now=1e12)  # its replica left long ago
    tracker.snapshot()
    series = {
        s.labels.get("node"): s.value for m in metrics.BREAKER_OPEN.collect() for s in m.samples
    }
    assert key[0] not in series


def test_only_the_probe_is_the_probe() -> None:
    """`sent` says which request took the half-open probe; another stream on the key that ends
    meanwhile (admission releases only the probe's slot) leaves the probe in place."""
    br = Breakers(consecutive=1, cooldown_s=1.0)
    assert not br.sent(A, 0.0)  # closed: no probe
    br.failure(A, 0.1)
    assert br.sent(A, 1.2) and not br.sent(A, 1.3)  # one probe; a last-resort send is none
    assert not br.allows(A, 1.4)


def _upstream(code: grpc.StatusCode, error: ServiceError | None = None) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata()
    if error is not None:
        trailers = grpc.aio.Metadata((DETAILS_KEY, error.status().SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details="x")


def test_a_full_replica_is_saturation_but_a_device_oom_is_a_failed_attempt() -> None:
    full = broken(_upstream(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert isinstance(full, Broken) and full.saturated and not full.unhealthy
    oom = broken(_upstream(grpc.StatusCode.RESOURCE_EXHAUSTED, out_of_memory("m")))
    assert isinstance(oom, Broken) and not oom.saturated and not oom.unhealthy
    assert not isinstance(broken(_upstream(grpc.StatusCode.INVALID_ARGUMENT)), Broken)
