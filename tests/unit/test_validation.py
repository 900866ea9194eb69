"""Request validation: each bad field is named in an INVALID_ARGUMENT with BadRequest details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from meshserve.nodeagent.engines.params import resolve_params
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import inference_pb2
from meshserve.validation import MAX_PROMPT_CHARS, check_generate

from tests.factories import spec

DEMO = spec("demo", max_model_len=2048, default_max_tokens=32)


def req(**kw: object) -> inference_pb2.GenerateRequest:
    sampling = kw.pop("sampling", {})
    fields: dict[str, object] = {"model": "demo", "prompt": "hi", **kw}
    r = inference_pb2.GenerateRequest(**fields)  # type: ignore[arg-type]
    for k, v in sampling.items():  # type: ignore[attr-defined]
        if k == "stop":
            r.sampling.stop.extend(v)
        else:
            setattr(r.sampling, k, v)
    return r


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (req(prompt=""), "prompt"),  # empty prompt
        (req(model=""), "model"),
        (req(sampling={"max_tokens": 0}), "sampling.max_tokens"),
        (req(sampling={"max_tokens": -5}), "sampling.max_tokens"),
        (req(sampling={"max_tokens": 4096}), "sampling.max_tokens"),  # over the model's context
        (req(sampling={"temperature": 2.5}), "sampling.temperature"),
        (req(sampling={"top_p": 0.0}), "sampling.top_p"),
        (req(sampling={"top_k": -1}), "sampling.top_k"),
        (req(sampling={"stop": [""]}), "sampling.stop"),
        (req(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),  # oversized
        (req(cache_salt="s" * 257), "cache_salt"),  # a salt is a label
        (req(messages=[inference_pb2.ChatMessage(role="user", content="hi")]), "prompt"),  # both
        (
            req(prompt="", messages=[inference_pb2.ChatMessage(role="robot", content="x")]),
            "messages[0].role",
        ),
    ],
)
def test_bad_field_is_named(request_: inference_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(ServiceError) as info:
        check_generate(request_, DEMO)
    e = info.value
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in e.violations]
    # The status carries BadRequest details a client in any language can read.
    details = e.status().details
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in details)
    assert field in [v.field for v in bad.field_violations]


def test_good_request_passes_and_defaults_resolve() -> None:
    r = req(sampling={"temperature": 0.0, "seed": 7})
    check_generate(r, DEMO)
    p = resolve_params(r.sampling, DEMO)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (32, 0.0, 1.0, 7)


def test_retry_info_on_unavailable() -> None:
    e = ServiceError(grpc.StatusCode.UNAVAILABLE, "later", "X", retry_after_s=1.5)
    info = error_details_pb2.RetryInfo()
    assert any(d.Unpack(info) for d in e.status().details)
    assert info.retry_delay.ToNanoseconds() == 1_500_000_000


def test_tiny_temperatures_are_greedy() -> None:
    """A denormal temperature would overflow logits / temperature into NaN probabilities."""
    tiny = inference_pb2.SamplingParams(temperature=2.3e-38)
    assert resolve_params(tiny, spec("m")).temperature == 0.0
    low = inference_pb2.SamplingParams(temperature=0.01)
    assert resolve_params(low, spec("m")).temperature == pytest.approx(0.01)
