"""A retry budget (Envoy's and Finagle's): retries may add at most ``ratio`` of the requests,
so a failing backend meets at most (1 + ratio) x its normal load instead of a retry storm.

A token bucket: each request deposits ``ratio`` of a token, each retry takes one; it starts with
``reserve`` tokens (retries allowed while traffic is low) and holds at most ``cap``.
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float = 0.2, reserve: float = 10.0, cap: float = 100.0) -> None:
        if not 0 <= ratio <= 1 or reserve < 0 or cap < reserve:
            raise ValueError("retry budget needs 0 <= ratio <= 1 and 0 <= reserve <= cap")
        self.ratio = ratio
        self.cap = cap
        self.tokens = reserve
        self.denied = 0  # retries refused since start (a metric)

    def request(self) -> None:
        """A new request arrived."""
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_retry(self) -> bool:
        """Takes a token for one retry; False when the budget is spent (fail instead)."""
        if self.tokens >= 1.0 - 1e-9:  # ratio x requests in floating point
            self.tokens -= 1.0
            return True
        self.denied += 1
        return False
