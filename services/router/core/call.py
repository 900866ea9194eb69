"""One request as the router core sees it, whichever front it came through (gRPC, OpenAI HTTP,
KServe): who calls, until when, and what goes back beside the messages — response headers (set
before the first message) and trailers (set when it ends) — as data that each front writes in
its own protocol. Cancellation is the asyncio task's: a front whose client goes away cancels
the core's coroutine or closes its stream, and the core cancels the upstream call."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Call:
    authorization: str = ""  # the caller's `authorization` header or metadata, as sent
    subjects: Sequence[str] = ()  # its client certificate's subject and CN=… (mTLS), if any
    deadline: float | None = None  # time.monotonic() at which the caller gives up; None: never
    headers: list[tuple[str, str]] = field(default_factory=list)  # before the first message
    trailers: list[tuple[str, str]] = field(default_factory=list)  # when the call ends
    # Its metadata / HTTP headers (lower-case names): what a route's rules may match on
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def within(
        cls, timeout_s: float | None, authorization: str = "", metadata: Mapping[str, str] = {}
    ) -> Call:
        """A call whose caller gives up ``timeout_s`` from now (None or 0: never)."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return cls(authorization=authorization, deadline=deadline, metadata=metadata)

    def remaining_s(self) -> float | None:
        """Seconds until the caller's deadline (never below 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
