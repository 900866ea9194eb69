"""Hostile bytes against live servers: each gets the status its content calls for (bytes that do
not parse: INVALID_ARGUMENT; a request for a model that does not exist: NOT_FOUND or
INVALID_ARGUMENT; otherwise it is served or refused as INVALID_ARGUMENT) — never UNAVAILABLE (a
crash), DEADLINE_EXCEEDED (a hang) or UNKNOWN (an unhandled error) — no per-request traceback is
logged, and every server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from meshserve.localmesh import Mesh
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import demo_mesh

pytestmark = pytest.mark.e2e
GENERATE = "/meshserve.v1.Inference/Generate"
GARBAGE = b"\xff\xff\xff\xff\x0f\x12garbage"


def valid() -> bytes:
    r = inference_pb2.GenerateRequest(model="demo", prompt="Hello there")
    r.sampling.max_tokens = 4
    r.sampling.temperature = 0.0
    return r.SerializeToString()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(valid())
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[i : i + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += data[i : i + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def hostile_fields(draw: st.DrawFn) -> bytes:
    """Well-formed requests with hostile values: odd models, prompts and roles, sampling at and
    past every bound, enum values no client should send, continuations a client must not set
    (with token ids past the vocabulary), huge intervals and ids."""
    text = st.text(max_size=40)
    r = inference_pb2.GenerateRequest(
        model=draw(st.sampled_from(["demo", "demo", "", "x/y", "dem"]))
    )
    if draw(st.booleans()):
        r.prompt = draw(text)
    else:
        for _ in range(draw(st.integers(0, 3))):
            r.messages.add(
                role=draw(st.sampled_from(["user", "system", "tool", ""])), content=draw(text)
            )
    sampling = r.sampling
    for name, values in (
        ("max_tokens", st.integers(-(2**31), 2**31 - 1) | st.integers(1, 8)),
        ("temperature", st.floats(allow_nan=True, width=32) | st.floats(0, 2, width=32)),
        ("top_p", st.floats(allow_nan=True, width=32) | st.floats(0, 1, width=32)),
        ("top_k", st.integers(-(2**31), 2**31 - 1)),
        ("seed", st.integers(0, 2**64 - 1)),
    ):
        if draw(st.booleans()):
            setattr(sampling, name, draw(values))
    sampling.stop.extend(draw(st.lists(st.text(max_size=5), max_size=3)))
    sampling.ignore_eos = draw(st.booleans())
    r.priority = draw(st.integers(-5, 10))  # type: ignore[assignment]
    r.session_key = draw(text)
    if draw(st.integers(0, 4)) == 0:
        r.continuation.token_ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)))
        r.continuation.text = draw(text)
    if draw(st.booleans()):
        r.stream_interval_ms = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        r.stream_interval_tokens = draw(st.integers(0, 2**32 - 1))
    return r.SerializeToString()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    with demo_mesh(tmp_path_factory.mktemp("hostile"), demo_model) as m:
        yield m


def send(address: str, method: str, body: bytes, stream: bool = True) -> grpc.StatusCode:
    """The call's status; a stream that delivers its first message counts as OK (then it is
    cancelled: what a request's bytes can break is decided before its first token, and a
    mutated request may ask for thousands of tokens)."""
    with grpc.insecure_channel(address) as ch:
        try:
            if stream:
                call = ch.unary_stream(method)(body, timeout=10)
                for _ in call:
                    call.cancel()
                    break
            else:
                ch.unary_unary(method)(body, timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:  # ours, after the first message
                return grpc.StatusCode.OK
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def statuses_for(body: bytes) -> set[grpc.StatusCode]:
    """What a correct server answers these bytes with, from their content alone."""
    try:
        request = inference_pb2.GenerateRequest.FromString(body)
    except DecodeError:
        return {grpc.StatusCode.INVALID_ARGUMENT}
    if request.model != "demo":  # the mesh serves only `demo` (no alias)
        return {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}
    return {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def targets(mesh: Mesh) -> dict[str, str]:
    return {"router": mesh.services["router"].address, "agent": mesh.services["agent-0"].address}


def test_undecodable_bytes_are_invalid_argument_everywhere_and_logged_once(mesh: Mesh) -> None:
    scheduler = mesh.services["scheduler-0"].address
    calls = [(address, GENERATE, True) for address in targets(mesh).values()] + [
        (mesh.services["router"].address, "/meshserve.v1.Inference/ListModels", False),
        (mesh.services["agent-0"].address, "/meshserve.v1.NodeAgent/GetNodeStatus", False),
        (scheduler, "/meshserve.v1.Scheduler/EnsureModel", False),
    ]
    for address, method, stream in calls:
        for _ in range(20):  # a burst
            assert send(address, method, GARBAGE, stream) == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("router", "agent-0", "scheduler-0"):
        log = mesh.services[name].log.read_text()
        assert "Traceback" not in log and "Exception deserializing" not in log, name
        assert 1 <= log.count("undecodable request") <= 3, name  # rate-limited, not one per call


def test_oversized_request_names_the_limit(mesh: Mesh) -> None:
    big = inference_pb2.GenerateRequest(model="demo", prompt="x" * (17 * 2**20)).SerializeToString()
    for address in targets(mesh).values():
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as e:
            for _ in ch.unary_stream(GENERATE)(big, timeout=10):
                pass
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (e.value.details() or "")


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.one_of(st.binary(max_size=300), mutated(), hostile_fields()))
# Found by the strategy on CI: a continuation with a token id past the vocabulary (512) made
# the agent's engine fail with UNKNOWN; it is INVALID_ARGUMENT now.
@example(body=b"\n\x04demo\x12\x01\x00\x08\x00B\x04\n\x02\x80\x04")
def test_random_and_mutated_requests_get_documented_statuses(mesh: Mesh, body: bytes) -> None:
    for name, address in targets(mesh).items():
        code = send(address, GENERATE, body)
        assert code in statuses_for(body), f"{name}: {code} for {body!r}"


def test_servers_stay_healthy_after_the_abuse(mesh: Mesh) -> None:
    for address in targets(mesh).values():
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert send(address, GENERATE, valid()) == grpc.StatusCode.OK
