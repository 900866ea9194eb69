"""The disruption budget of background re-pack (Profile.repack_*): what the leader, and the
simulator in its place, remember between rounds — the replicas a re-pack is moving off (until
their placement is gone: the new replica became READY and the old was let go) and when each move
began (at most ``per_minute`` in any 60 s). Pure: the caller passes the time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW_S = 60.0


class Repacks:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.moving: set[tuple[str, str]] = set()  # (model, old node)
        self.started: deque[float] = deque()

    def budget(self, now: float) -> int:
        """Moves a round may start now; 0 when re-pack is off."""
        while self.started and self.started[0] <= now - WINDOW_S:
            self.started.popleft()
        return max(0, self.per_minute - len(self.started))

    def in_flight(self, placed: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        """The moves not finished: the old replica is still placed."""
        self.moving &= set(placed)
        return frozenset(self.moving)

    def begun(self, moves: Iterable[tuple[str, str]], now: float) -> None:
        for move in moves:
            self.moving.add(move)
            self.started.append(now)
