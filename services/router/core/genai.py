"""OpenTelemetry's GenAI semantic conventions on the router's request span.

Always: operation, model, input/output tokens, finish reasons (and TTFT, set by the relay).
Prompts and completions only when an operator opts in with OpenTelemetry's standard switch,
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (read at start-up): then
``gen_ai.input.messages`` and ``gen_ai.output.messages`` carry them as the conventions' JSON.
"""

from __future__ import annotations

import json
import os

from meshserve.v1 import inference_pb2
from opentelemetry import trace

CAPTURE_CONTENT = (
    os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower()
    == "true"
)


def _text(role: str, content: str) -> dict[str, object]:
    return {"role": role, "parts": [{"type": "text", "content": content}]}


def genai_attributes(
    span: trace.Span,
    request: inference_pb2.GenerateRequest,
    usage: tuple[int, int],
    messages: list[bytes],
) -> None:
    """Sets the attributes above on ``span`` once the stream of ``messages`` has ended."""
    if not span.is_recording():
        return
    span.set_attribute("gen_ai.operation.name", "chat" if request.messages else "text_completion")
    span.set_attribute("gen_ai.usage.input_tokens", usage[0])
    span.set_attribute("gen_ai.usage.output_tokens", usage[1])
    reason = ""
    if messages:
        last = inference_pb2.GenerateResponse.FromString(messages[-1])
        if last.finish_reason:
            name = inference_pb2.FinishReason.Name(last.finish_reason)
            reason = name.removeprefix("FINISH_REASON_").lower()
            span.set_attribute("gen_ai.response.finish_reasons", [reason])
    if CAPTURE_CONTENT:
        asked = [_text(m.role, m.content) for m in request.messages]
        span.set_attribute(
            "gen_ai.input.messages", json.dumps(asked or [_text("user", request.prompt)])
        )
        text = "".join(inference_pb2.GenerateResponse.FromString(m).text for m in messages)
        answer = {**_text("assistant", text), "finish_reason": reason}
        span.set_attribute("gen_ai.output.messages", json.dumps([answer]))
