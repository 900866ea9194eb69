"""Hostile bytes against live servers: only documented statuses come back, no per-request
traceback is logged, and every server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshserve.local import Mesh
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import demo_mesh

pytestmark = pytest.mark.e2e
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
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


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    with demo_mesh(tmp_path_factory.mktemp("hostile"), demo_model) as m:
        yield m


def send(address: str, method: str, body: bytes, stream: bool = True) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            if stream:
                for _ in ch.unary_stream(method)(body, timeout=5):
                    pass
            else:
                ch.unary_unary(method)(body, timeout=5)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


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
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.one_of(st.binary(max_size=300), mutated()))
def test_random_and_mutated_requests_get_documented_statuses(mesh: Mesh, body: bytes) -> None:
    for name, address in targets(mesh).items():
        code = send(address, GENERATE, body)
        assert code in DOCUMENTED, f"{name}: {code} for {body!r}"


def test_servers_stay_healthy_after_the_abuse(mesh: Mesh) -> None:
    for address in targets(mesh).values():
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert send(address, GENERATE, valid()) == grpc.StatusCode.OK
