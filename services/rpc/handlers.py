"""Wrappers every servicer method uses: a `ServiceError` becomes a rich gRPC status and an
upstream's status passes through unchanged. (Cancels and deadlines are recorded on the server span
by telemetry/server_interceptor.py, which sees them first.)"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from meshserve.rpc.errors import DETAILS_KEY, ServiceError, trace_trailer

F = TypeVar("F", bound=Callable[..., Any])

Ctx: TypeAlias = grpc.aio.ServicerContext  # grpc ships no types: this is Any to mypy


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
            await abort_like(context, e)

    return handler  # type: ignore[return-value]


def stream(fn: F) -> F:
    """For async generators of the same shapes as `unary`. The handler is a coroutine that writes
    each item with ``context.write`` (gRPC's reader/writer form), not an async generator: the
    server interceptors around it (tracing, decode guard) then await it once instead of adding a
    generator hop per streamed message."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> None:
        context = args[-1]
        write = context.write
        items = fn(*args)
        try:
            async for item in items:
                await write(item)
        except ServiceError as e:
            await e.abort(context)
        except grpc.aio.AioRpcError as e:
            await abort_like(context, e)
        finally:
            # Closed here, in this task: a call cancelled while writing must not leave the
            # generator to the loop's finalizer, which would close it later in another context
            # (its spans then fail to detach) and let its engine stream run on meanwhile.
            await items.aclose()

    return handler  # type: ignore[return-value]


async def abort_like(context: Ctx, error: grpc.aio.AioRpcError) -> None:
    details = [(k, v) for k, v in (error.trailing_metadata() or ()) if k == DETAILS_KEY]
    await context.abort(
        error.code(), error.details() or "", trailing_metadata=(*details, *trace_trailer())
    )


def code_of(error: BaseException) -> str:
    """The status code name a handler's exception ends the call with (for metrics)."""
    if isinstance(error, ServiceError):
        return str(error.code.name)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return "UNKNOWN"


def remaining_s(context: Ctx) -> float | None:
    """Seconds until the caller's deadline, or None without one."""
    left: Any = context.time_remaining()
    return None if left is None else float(left)
