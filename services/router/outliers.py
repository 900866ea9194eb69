"""Outlier detection: eject a replica after consecutive failures, without waiting for etcd.

After an etcd restart every lease gets a fresh TTL, so a dead agent can look alive one TTL longer
(DESIGN §4); the router stops sending to it after ``threshold`` failures in a row.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet


class Outliers:
    def __init__(self, threshold: int, eject_for_s: float) -> None:
        self.threshold = threshold
        self.eject_for_s = eject_for_s
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def failure(self, address: str, now: float) -> None:
        count = self._failures.get(address, 0) + 1
        self._failures[address] = count
        if count >= self.threshold:
            self._until[address] = now + self.eject_for_s

    def success(self, address: str) -> None:
        self._failures.pop(address, None)
        self._until.pop(address, None)

    def ejected(self, now: float) -> AbstractSet[str]:
        expired = [a for a, t in self._until.items() if t <= now]
        for a in expired:
            del self._until[a]
            self._failures[a] = self.threshold - 1  # one more failure ejects it again
        return frozenset(self._until)
