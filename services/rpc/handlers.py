"""Wrappers every servicer method uses: a `ServiceError` becomes a rich gRPC status, a client's
cancel is recorded on the server span, and each outcome is counted."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from meshserve.rpc.errors import DETAILS_KEY, ServiceError
from meshserve.telemetry.tracing import record_cancelled
from opentelemetry import trace

F = TypeVar("F", bound=Callable[..., Any])

Ctx = grpc.aio.ServicerContext  # type: ignore[type-arg]


def unary(fn: F) -> F:
    """For ``async def m(self, request, context)`` or ``async def f(request, context)``."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> Any:
        context = args[-1]
        try:
            return await fn(*args)
        except ServiceError as e:
            await e.abort(context)
        except grpc.aio.AioRpcError as e:  # an upstream's status, passed through unchanged
            await _abort_like(context, e)
        except asyncio.CancelledError:
            record_cancelled(trace.get_current_span())
            raise

    return handler  # type: ignore[return-value]


def stream(fn: F) -> F:
    """For async generators of the same shapes as `unary`."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> AsyncIterator[Any]:
        context = args[-1]
        try:
            async for item in fn(*args):
                yield item
        except ServiceError as e:
            await e.abort(context)
        except grpc.aio.AioRpcError as e:
            await _abort_like(context, e)
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio closes a streaming handler's generator when the caller cancels or its
            # deadline passes: GeneratorExit, not CancelledError, arrives at the yield.
            record_cancelled(trace.get_current_span(), _why_closed(context))
            raise

    return handler  # type: ignore[return-value]


def _why_closed(context: Ctx) -> str:
    left = context.time_remaining()
    if left is not None and left <= 0:
        return "deadline exceeded"
    return "cancelled by the client"


async def _abort_like(context: Ctx, error: grpc.aio.AioRpcError) -> None:
    details = [(k, v) for k, v in (error.trailing_metadata() or ()) if k == DETAILS_KEY]
    await context.abort(error.code(), error.details() or "", trailing_metadata=tuple(details))


def code_of(error: BaseException) -> str:
    """The status code name a handler's exception ends the call with (for metrics)."""
    if isinstance(error, ServiceError):
        return error.code.name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return "UNKNOWN"


def remaining_s(context: Ctx) -> float | None:
    """Seconds until the caller's deadline, or None without one."""
    left: Any = context.time_remaining()
    return None if left is None else float(left)
