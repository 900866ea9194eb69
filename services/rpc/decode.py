"""Hostile bytes: a request that does not parse is the caller's error, not ours.

gRPC's own handling of a request deserializer that raises is a traceback at ERROR per request and
an UNKNOWN status: a cheap way to flood a server's log. `DecodeGuard` (on every server) turns it
into INVALID_ARGUMENT "request could not be parsed", counts it, and logs such events at most once
per ``LOG_EVERY_S`` with how many there were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.telemetry.server_interceptor import as_writer

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Undecodable:
    """What the guarded deserializer returns for bytes that do not parse."""

    size: int  # bytes received
    error: str


class RateLimitedLog:
    """At most one line per ``every_s``, saying how many events it stands for."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.last = -float("inf")
        self.suppressed = 0

    def event(self, message: str, now: float | None = None) -> bool:
        """Logs ``message`` unless a line went out less than ``every_s`` ago; True if it did."""
        now = time.monotonic() if now is None else now
        if now - self.last < self.every_s:
            self.suppressed += 1
            return False
        more = (
            f" (and {self.suppressed} more in the last {now - self.last:.0f} s)"
            if self.suppressed and self.last > -float("inf")
            else ""
        )
        log.warning("%s%s", message, more)
        self.last, self.suppressed = now, 0
        return True


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.log = RateLimitedLog()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = details.method
        parse = handler.request_deserializer

        def guarded(data: bytes) -> Any:
            try:
                return parse(data)
            except (DecodeError, ValueError, TypeError) as e:
                return Undecodable(len(data), f"{type(e).__name__}: {e}"[:200])

        async def refuse(request: Undecodable, context: Any) -> None:
            metrics.BAD_REQUESTS.labels(method).inc()
            self.log.event(
                f"undecodable request to {method}: {request.size} bytes, {request.error}"
            )
            await ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request could not be parsed as {method.rsplit('/', 1)[-1]}'s request message "
                f"({request.size} bytes): send a serialized meshserve.v1 message",
                "UNPARSEABLE_REQUEST",
            ).abort(context)

        if handler.unary_stream is not None:
            writer = as_writer(handler.unary_stream)

            async def unary_stream(request: Any, context: Any) -> None:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                    return
                await writer(request, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=guarded,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=guarded,
                response_serializer=handler.response_serializer,
            )
        return handler
