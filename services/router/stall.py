"""The stall watch of one upstream stream: one timer per stream instead of one per message.

`Stall` cancels the upstream call when a read has waited longer than its limit (the first token's,
then the inter-token one). The hot path only stamps when each read begins (``reading()``) and
that none is pending (``delivered()``); the timer re-arms itself from that stamp when it fires
early. Time the relay spends handing a message to a slow client is not the replica's silence.
(The first version rescheduled an ``asyncio.timeout`` after every message: a timer handle
cancelled and created per token, ~5 % of the router's CPU at saturation — bench/router.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any


class Stall:
    __slots__ = ("_call", "_handle", "_loop", "_since", "fired", "limit_s")
    # limit_s: read it freely; change it with `relimit` (it re-arms the timer)

    def __init__(self, call: Any, limit_s: float) -> None:
        self._call = call
        self._loop = asyncio.get_running_loop()
        self.limit_s = limit_s
        self.fired = False
        self._since: float | None = self._loop.time()
        self._handle = self._loop.call_at(self._since + limit_s, self._check)

    def reading(self) -> None:
        """A read of the upstream begins now."""
        self._since = self._loop.time()

    def delivered(self) -> None:
        """No read is pending (the message goes to our client)."""
        self._since = None

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
        if since is None:  # between reads: look again a whole limit from now
            self._handle = self._loop.call_at(now + self.limit_s, self._check)
        elif now - since >= self.limit_s * 0.999:  # loop clocks round; not a real early fire
            self.fired = True
            self._call.cancel()
        else:
            self._handle = self._loop.call_at(since + self.limit_s, self._check)
