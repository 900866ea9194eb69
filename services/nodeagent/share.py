"""Device time shared fairly among a replica's streams, for usage billing (GPU-seconds).

A replica's engine runs its streams together, so a stream's wall time is not its cost: 32
streams on one GPU for one second used one GPU-second, not 32. Each replica keeps a
processor-sharing clock: while n streams run, it advances gpus / n per second, and a stream's
GPU-seconds are how far it advanced between the stream's start and its end. Summed over the
replica's streams that is exactly the time the replica was busy x its GPUs. O(1) per event, no
per-token work.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DeviceShare:
    """One replica's processor-sharing clock (seconds of its ``gpus`` GPUs)."""

    def __init__(self, gpus: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.gpus = max(1, gpus)
        self._clock = clock
        self._running = 0  # streams now
        self._value = 0.0  # GPU-seconds one stream would have accrued since the start
        self._at = clock()

    def _advance(self) -> float:
        now = self._clock()
        if self._running:
            self._value += (now - self._at) * self.gpus / self._running
        self._at = now
        return self._value

    def join(self) -> float:
        """A stream starts; returns its mark (pass it to `since` and `leave`)."""
        mark = self._advance()
        self._running += 1
        return mark

    def since(self, mark: float) -> float:
        """GPU-seconds the stream that joined at ``mark`` has accrued so far."""
        return self._advance() - mark

    def leave(self, mark: float) -> float:
        """The stream ends; returns its GPU-seconds."""
        used = self._advance() - mark
        self._running -= 1
        return used
