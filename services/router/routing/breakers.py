"""Circuit breakers per (replica address, model), in the manner of Envoy's outlier detection
(pure: the caller passes the clock).

- CLOSED: requests flow. Opens after ``consecutive`` failures in a row, or when at least
  ``min_requests`` outcomes in the last ``window_s`` failed at ``failure_rate`` or more.
- OPEN: the replica is left out of picking (unless nothing else is left) for a cool-down that
  doubles each time it re-opens, up to ``max_cooldown_s``.
- HALF_OPEN: after the cool-down one request probes it; success closes the breaker (cool-down
  reset), failure opens it again.

Failures are what says something about the replica's health (UNAVAILABLE, INTERNAL, a stall, a
broken stream); saturation (RESOURCE_EXHAUSTED) and the caller's own errors never count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
Key = tuple[str, str]  # (replica address, model)


@dataclass
class _Breaker:
    state: str = CLOSED
    consecutive: int = 0
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed)
    open_until: float = 0.0
    cooldown_s: float = 0.0
    probing: bool = False  # a half-open probe is in flight
    opened: int = 0  # times it opened (for metrics and status)


@dataclass(frozen=True)
class BreakerView:
    key: Key
    state: str
    consecutive_failures: int
    opened: int  # times opened since the router started
    retry_in_s: float  # open: seconds until a probe may go


class Breakers:
    def __init__(
        self,
        consecutive: int = 3,
        failure_rate: float = 0.5,
        min_requests: int = 10,
        window_s: float = 30.0,
        cooldown_s: float = 5.0,
        max_cooldown_s: float = 60.0,
    ) -> None:
        self.consecutive = consecutive
        self.failure_rate = failure_rate
        self.min_requests = min_requests
        self.window_s = window_s
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._b: dict[Key, _Breaker] = {}

    def state(self, key: Key, now: float) -> str:
        b = self._b.get(key)
        if b is None:
            return CLOSED
        if b.state == OPEN and now >= b.open_until:
            b.state, b.probing = HALF_OPEN, False
        return b.state

    def all_closed(self) -> bool:
        """No breaker is open or half-open (the routing filter may skip asking per replica)."""
        return all(b.state == CLOSED for b in self._b.values())

    def allows(self, key: Key, now: float) -> bool:
        """Whether a new request may go to ``key`` now (a half-open breaker takes one probe)."""
        state = self.state(key, now)
        return state == CLOSED or (state == HALF_OPEN and not self._b[key].probing)

    def sent(self, key: Key, now: float) -> bool:
        """A request went to ``key``: if half-open, it is the probe (True)."""
        if self.state(key, now) == HALF_OPEN and not self._b[key].probing:
            self._b[key].probing = True
            return True
        return False

    def released(self, key: Key) -> None:
        """The probe on ``key`` (the request `sent` said was one) ended. One that reported
        nothing (the caller's own error, a cancel, a full replica: nothing about the replica's
        health) lets the next request probe instead, or the breaker would wait for an outcome
        that never comes."""
        b = self._b.get(key)
        if b is not None and b.state == HALF_OPEN and b.probing:
            b.probing = False

    def success(self, key: Key, now: float) -> None:
        b = self._b.setdefault(key, _Breaker())
        b.consecutive = 0
        self._record(b, now, failed=False)
        if b.state != CLOSED:
            b.state, b.probing, b.cooldown_s = CLOSED, False, 0.0
            b.outcomes.clear()

    def failure(self, key: Key, now: float) -> None:
        b = self._b.setdefault(key, _Breaker())
        b.consecutive += 1
        self._record(b, now, failed=True)
        state = self.state(key, now)
        if state == HALF_OPEN or (state == CLOSED and self._tripped(b)):
            self._open(b, now)

    def _record(self, b: _Breaker, now: float, failed: bool) -> None:
        b.outcomes.append((now, failed))
        while b.outcomes and b.outcomes[0][0] < now - self.window_s:
            b.outcomes.popleft()

    def _tripped(self, b: _Breaker) -> bool:
        if b.consecutive >= self.consecutive:
            return True
        n = len(b.outcomes)
        failed = sum(1 for _t, f in b.outcomes if f)
        return n >= self.min_requests and failed / n >= self.failure_rate

    def _open(self, b: _Breaker, now: float) -> None:
        b.cooldown_s = min(self.max_cooldown_s, b.cooldown_s * 2 or self.base_cooldown_s)
        b.state, b.open_until, b.probing = OPEN, now + b.cooldown_s, False
        b.opened += 1

    def views(self, now: float) -> Iterator[BreakerView]:
        """Every breaker that opened or is failing now, for metrics and `meshserve status`."""
        for key, b in sorted(self._b.items()):
            if not b.opened and not b.consecutive:
                continue
            state = self.state(key, now)
            yield BreakerView(
                key, state, b.consecutive, b.opened, max(0.0, b.open_until - now) * (state == OPEN)
            )

    def prune(self, alive: set[Key], now: float, models: set[str] | None = None) -> None:
        """Drops breakers of replicas no longer in the table once they have nothing left to say
        (closed, or open long past their cool-down): agents come and go, breakers must not pile
        up. ``models``: only breakers of these (``alive`` lists their replicas); None: all."""
        for key, b in list(self._b.items()):
            if key in alive or (models is not None and key[1] not in models):
                continue
            if b.state == CLOSED or now > b.open_until + self.max_cooldown_s:
                del self._b[key]
