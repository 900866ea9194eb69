"""OpenAI-shaped errors for the HTTP front: gRPC status → HTTP status and OpenAI's error JSON
(with Retry-After from RetryInfo), and a request body size limit."""

from __future__ import annotations

import json
from typing import Any

import grpc
from meshserve.rpc.errors import ServiceError, decode_details, error_reason, retry_delay_s

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
ERROR_TYPE = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}
MAX_BODY_BYTES = 16 << 20  # as the gRPC servers' message limit


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY_BYTES gets 413 before it is all read (by
    its Content-Length, or counted as it arrives when chunked)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    @staticmethod
    async def _refuse(send: Any) -> None:
        body = json.dumps(
            error_body(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "BODY_TOO_LARGE")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPE.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }


def from_exception(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) for what the router core raised."""
    retry: float | None = None
    reason: str | None
    if isinstance(e, ServiceError):
        code, message, reason, retry = e.code, e.message, e.reason, e.retry_after_s
    elif isinstance(e, grpc.aio.AioRpcError):
        code, message = e.code(), e.details() or e.code().name
        status = decode_details(e.trailing_metadata())
        reason, retry = error_reason(status), retry_delay_s(status)
    else:
        return 500, error_body(500, f"internal error: {type(e).__name__}"), {}
    http = HTTP_STATUS.get(code, 500)
    headers = {"retry-after": str(max(1, round(retry)))} if retry is not None else {}
    return http, error_body(http, message, reason), headers
