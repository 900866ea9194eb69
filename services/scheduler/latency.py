"""Time to first token on a device at utilization u, one law for the simulator's judgement and the
autoscaler's prediction (pure).

Continuous batching makes a device an M/M/c queue: c = ``slots`` sequences decode together and a
request's service starts with a prefill of ``base_ttft_s`` at no load. A request waits at all
with probability u^sqrt(2(c+1)) (Sakasegawa's approximation), and waits are exponential with rate
c(1 - u)/base_ttft_s. At u >= 1 the queue grows without bound. The defaults are the simulator's
engine (prefill and scheduling 0.15 s, 16 sequences a batch); a live deployment sets them from
its engines' batch size and a TTFT scale fitted so that the law's p99 matches measured ones
(Profile.latency). A limit to know: the wait rate takes ``base_ttft_s`` as the time a batch
slot is held, which fits the simulator's engine; a live engine holds a slot for the whole
generation, so fit the scale, do not read it off the prefill time."""

from __future__ import annotations

import math
from dataclasses import dataclass

BATCH_SLOTS = 16  # sequences a device decodes together
BASE_TTFT_S = 0.15  # prefill + scheduling at no load
SATURATED = 0.999  # utilization treated as a queue that never drains


@dataclass(frozen=True)
class QueueLaw:
    slots: int = BATCH_SLOTS
    base_ttft_s: float = BASE_TTFT_S

    def waits(self, u: float) -> float:
        """The share of requests that wait for a batch slot at all."""
        return float(max(0.0, u) ** math.sqrt(2 * (self.slots + 1)))

    def wait_rate(self, u: float) -> float:
        """The rate (1/s) of the exponential wait of those that do."""
        return self.slots * (1 - u) / self.base_ttft_s

    def late(self, u: float, limit_s: float) -> float:
        """The share of requests whose TTFT exceeds ``limit_s``; 1 when saturated."""
        if u >= SATURATED:
            return 1.0
        slack = max(0.0, limit_s - self.base_ttft_s)
        return self.waits(u) * math.exp(-self.wait_rate(u) * slack)

    def quantile(self, u: float, q: float) -> float:
        """The TTFT that a share ``q`` of requests stays within; inf when saturated."""
        if u >= SATURATED or q >= 1:
            return math.inf
        tail = (1 - q) / self.waits(u) if self.waits(u) > 0 else math.inf
        return self.base_ttft_s + (math.log(1 / tail) / self.wait_rate(u) if tail < 1 else 0.0)
