"""Tracing set-up: the only module that configures OpenTelemetry.

Exporters come from the standard ``OTEL_*`` variables (``OTEL_TRACES_EXPORTER=otlp`` with
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER`` …). ``MESHSERVE_TRACE_DIR`` adds a JSONL
file per process (``<service>-<pid>.jsonl``, one span per line) so `meshserve up`, the tests and a
person can read a whole trace without a collector. Spans are exported in batches off the hot path.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_DIR_ENV = "MESHSERVE_TRACE_DIR"
_W3C = TraceContextTextMapPropagator()


def _jsonl(span: ReadableSpan) -> str:
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


def setup_tracing(service: str) -> None:
    """Installs the global tracer provider for this process. Call once, in the entry point.

    With no exporter configured (or ``OTEL_SDK_DISABLED=true``) none is installed: spans are
    OpenTelemetry's no-op ones, which still carry an incoming trace context on to upstream calls
    but cost nothing to record (bench/router.py measures the difference)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    exporters = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    otlp = "otlp" in exporters or bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    trace_dir = os.environ.get(TRACE_DIR_ENV)
    if not (otlp or trace_dir):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"meshserve-{service}"}))
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        out = open(Path(trace_dir) / f"{service}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
        provider.add_span_processor(
            BatchSpanProcessor(
                ConsoleSpanExporter(out=out, formatter=_jsonl), schedule_delay_millis=500
            )
        )
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)


def shutdown_tracing() -> None:
    """Flushes pending spans (call before exit)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(5_000)


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent of ``span`` ("" when it is not a real, sampled-or-not span): how a
    span is named in records that outlive it (placements, replica statuses, responses)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def exemplar() -> dict[str, str] | None:
    """The current span as an OpenMetrics exemplar for a histogram observation (``trace_id``,
    ``span_id``, lower-case hex as trace UIs take them), or None when this process records no
    span (tracing off or not sampled: an exemplar must lead to a trace that was exported)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    return hex_ids(span.get_span_context())


def hex_ids(ctx: trace.SpanContext) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of ``ctx`` in lower-case hex, as W3C and trace UIs write
    them."""
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def links_to(*parents: str) -> list[trace.Link]:
    """Span links to the spans these W3C traceparents name (malformed or empty ones skipped)."""
    links = []
    for parent in parents:
        if not parent:
            continue
        ctx = trace.get_current_span(_W3C.extract({"traceparent": parent})).get_span_context()
        if ctx.is_valid:
            links.append(trace.Link(ctx))
    return links


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Injects W3C trace context into outgoing metadata and records a client span per RPC."""
    return list(aio_client_interceptors())


def record_outcome(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
    """A server span's end state from its gRPC code: OK (served: trace UIs filter on OK vs
    ERROR), or ERROR with ``CODE: details``; ``rpc.grpc.status_code`` either way."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code == grpc.StatusCode.OK:
        span.set_status(trace.StatusCode.OK)
    else:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {details}"))


def record_cancelled(span: trace.Span, what: str = "cancelled by the client") -> None:
    """The stock interceptor does not mark a client's cancel as an error (DESIGN §7); we do."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED if "deadline" in what else grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(trace.Status(trace.StatusCode.ERROR, what))
