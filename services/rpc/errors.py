"""Errors that reach clients as a gRPC status with ``google.rpc`` details (DESIGN §3).

Handlers raise `ServiceError`; the servicer turns it into ``context.abort`` with a
``google.rpc.Status`` carrying ErrorInfo (stable ``reason``), BadRequest field violations and
RetryInfo, so a client in any language can act on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from meshserve.telemetry.server_interceptor import traceresponse

DOMAIN = "meshserve.dev"
DETAILS_KEY = "grpc-status-details-bin"


@dataclass(eq=False)  # not frozen: raising sets __traceback__ and friends on the instance
class ServiceError(Exception):
    code: grpc.StatusCode
    message: str
    reason: str  # stable, UPPER_SNAKE: what a client switches on
    violations: Sequence[tuple[str, str]] = field(default=())  # (field path, what is wrong)
    retry_after_s: float | None = None
    metadata: Sequence[tuple[str, str]] = field(default=())  # extra ErrorInfo metadata

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def status(self) -> status_pb2.Status:
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        info.metadata.update(dict(self.metadata))
        details.append(info)
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for d in details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=packed
        )

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:  # type: ignore[type-arg]
        await context.abort(
            self.code,
            self.message,
            trailing_metadata=((DETAILS_KEY, self.status().SerializeToString()), *trace_trailer()),
        )
        raise AssertionError("unreachable: abort raises")


def trace_trailer() -> tuple[tuple[str, str], ...]:
    """A failed call's trace id for its trailers (W3C ``traceresponse``: a call that fails
    before its first message has sent no headers), so the caller can look the failure up."""
    tr = traceresponse()
    return (tr,) if tr is not None else ()


def invalid_argument(violations: Sequence[tuple[str, str]]) -> ServiceError:
    message = "; ".join(f"{f}: {d}" for f, d in violations)
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_REQUEST", violations=violations
    )


def not_found_model(model: str, known: Sequence[str]) -> ServiceError:
    hint = (
        f"; known models: {', '.join(sorted(known)[:20])}"
        if known
        else "; no models are registered"
    )
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"model {model!r} is not registered{hint}",
        "MODEL_NOT_FOUND",
        metadata=(("model", model),),
    )


def decode_details(
    trailing_metadata: Sequence[tuple[str, str | bytes]] | None,
) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carried, if any."""
    for key, value in trailing_metadata or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def error_reason(status: status_pb2.Status | None) -> str | None:
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return None


def retry_delay_s(status: status_pb2.Status | None) -> float | None:
    """The RetryInfo delay a failed call carried, in seconds, if any."""
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None
