"""The replicas one request gave up on, each for a while rather than for good.

A request leaves a replica that failed it (relay.py: at once when it has others or the replica
said it is gone, else at its second failure). For good would be wrong: a partition heals, a
replica comes back from a network blip, and a request whose only replica it was would wait out
its deadline beside a replica that serves again. So each exclusion lasts 2 s, doubling with each
failure on the same replica, at most 30 s; the admission queue looks again every half second.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Identity = tuple[str, int, int]  # Endpoint.identity: address, agent incarnation, load generation
FIRST_S = 2.0
LONGEST_S = 30.0


class Exclusions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[Identity, float] = {}
        self._times: dict[Identity, int] = {}

    def add(self, identity: Identity) -> None:
        times = self._times[identity] = self._times.get(identity, 0) + 1
        self._until[identity] = self._clock() + min(LONGEST_S, FIRST_S * 2 ** (times - 1))

    def __contains__(self, identity: object) -> bool:
        until = self._until.get(identity)  # type: ignore[call-overload]
        return until is not None and until > self._clock()

    def __len__(self) -> int:
        """Replicas excluded now."""
        now = self._clock()
        return sum(1 for until in self._until.values() if until > now)
