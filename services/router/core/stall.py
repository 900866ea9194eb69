"""The stall watch of one upstream stream: one timer per stream instead of one per message.

`Stall` cancels the upstream call when a read has waited longer than its limit (the first token's,
then the inter-token one, which `pace` tightens once the stream has shown its pace: a silence of
``factor`` times its longest gap so far, at least ``floor_s``). The hot path only stamps when
each read begins (``reading()``) and that none is pending (``delivered()``); the timer re-arms
itself from that stamp when it fires early. Time the relay spends handing a message to a slow
client is not the replica's silence.
(The first version rescheduled an ``asyncio.timeout`` after every message: a timer handle
cancelled and created per token, ~5 % of the router's CPU at saturation — bench/router.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

PACED_AFTER = 8  # messages before a stream's pace is trusted


class Stall:
    __slots__ = (
        "_call", "_count", "_factor", "_floor_s", "_handle", "_longest", "_loop", "_since",
        "fired", "limit_s",
    )  # fmt: skip
    # limit_s: read it freely; change it with `relimit` (it re-arms the timer)

    def __init__(self, call: Any, limit_s: float) -> None:
        self._call = call
        self._loop = asyncio.get_running_loop()
        self.limit_s = limit_s
        self.fired = False
        self._since: float | None = self._loop.time()
        self._handle = self._loop.call_at(self._since + limit_s, self._check)
        self._factor = 0.0  # 0: no pace-based limit
        self._floor_s = 0.0
        self._longest = 0.0  # the longest read so far (s)
        self._count = 0  # reads done

    def reading(self) -> None:
        """A read of the upstream begins now."""
        self._since = self._loop.time()

    def delivered(self) -> None:
        """No read is pending (the message goes to our client)."""
        if self._factor and self._since is not None:
            now = self._loop.time()
            self._longest = max(self._longest, now - self._since)
            self._count += 1
            if self._count == PACED_AFTER:  # the pace now binds: check by it (once; the limit
                self._handle.cancel()  # only grows after, and _check re-arms from it)
                self._handle = self._loop.call_at(now + self._limit(), self._check)
        self._since = None

    def pace(self, factor: float, floor_s: float) -> None:
        """From now on, once PACED_AFTER reads are done, a read may wait only ``factor`` times
        the longest one so far (at least ``floor_s``, at most the limit)."""
        self._factor, self._floor_s = factor, floor_s

    def _limit(self) -> float:
        if not self._factor or self._count < PACED_AFTER:
            return self.limit_s
        return min(self.limit_s, max(self._floor_s, self._factor * self._longest))

    def relimit(self, limit_s: float) -> None:
        """From now on a read may wait ``limit_s`` (the inter-token limit after the first's)."""
        self.limit_s = limit_s
        self._handle.cancel()
        self._handle = self._loop.call_at(self._loop.time() + limit_s, self._check)

    def stop(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self._since
        limit = self._limit()
        if since is None:  # between reads: look again a whole limit from now
            self._handle = self._loop.call_at(now + limit, self._check)
        elif now - since >= limit * 0.999:  # loop clocks round; not a real early fire
            self.fired = True
            self._call.cancel()
        else:
            self._handle = self._loop.call_at(since + limit, self._check)

    @property
    def current_s(self) -> float:
        """The limit a read has now (for the message saying why it fired)."""
        return self._limit()
