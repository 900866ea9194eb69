"""Tensor models through a real mesh: a locally built image classifier (`task: classify`) served
by the torch engine, requests through the router's Infer RPC, dynamically batched by the agent.

- 32 concurrent single-image requests run in batches of more than one row (read from the agent's
  Prometheus metrics and from the replies) with results equal to each image run alone;
- the batch shows in traces: an ``engine.batch`` span linked to the requests in it;
- bad input gets INVALID_ARGUMENT naming the tensor; the wrong RPC for a model's kind gets
  FAILED_PRECONDITION; the signature reaches clients through ListModels.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import numpy as np
import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import common_pb2, inference_pb2

from tests.e2e.conftest import apply, free_port, model_spec, read_spans, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
CONCURRENT = 32


@pytest.fixture(scope="module")
def tmesh(
    tmp_path_factory: pytest.TempPathFactory, classifier_model: Path, demo_model: Path
) -> Iterator[tuple[Mesh, int, Path]]:
    root = tmp_path_factory.mktemp("tensor")
    traces = root / "traces"
    m = Mesh(root, lease_ttl_s=2, trace_dir=traces)
    metrics_port = free_port()
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0", threads=2, extra=["--metrics-port", str(metrics_port)])
        m.start_router()
        spec = model_spec("cls", classifier_model, min_replicas=1, kv_headroom="1MiB")
        spec.engine_args["task"] = "classify"
        asyncio.run(apply(m, spec))
        asyncio.run(apply(m, model_spec("demo", demo_model, min_replicas=1)))
        router = m.services["router"].address

        async def up() -> bool:
            return (
                await ready_replicas(router, "cls") == 1
                and await ready_replicas(router, "demo") == 1
            )

        asyncio.run(eventually(up, 120, "cls and demo READY"))
        yield m, metrics_port, traces
    finally:
        m.stop()


def images(n: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 1, 3, 32, 32)).astype(np.float32)


def request(x: np.ndarray, model: str = "cls") -> inference_pb2.InferRequest:
    r = inference_pb2.InferRequest(model=model)
    r.inputs.add(name="pixel_values", datatype="FP32", shape=list(x.shape), data=x.tobytes())
    return r


async def infer_all(address: str, requests: list[inference_pb2.InferRequest]) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        return list(await asyncio.gather(*[stub.Infer(r, timeout=60) for r in requests]))


def scrape(port: int, model: str) -> tuple[float, float, float]:
    """(batches, rows, batches of one row) from the agent's meshserve_batch_size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(pattern: str) -> float:
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    label = f'model="{model}"'
    return (
        value(rf"^meshserve_batch_size_count\{{{label}\}} (\S+)"),
        value(rf"^meshserve_batch_size_sum\{{{label}\}} (\S+)"),
        value(rf'^meshserve_batch_size_bucket\{{le="1.0",{label}\}} (\S+)'),
    )


def logits_of(reply: inference_pb2.InferResponse) -> tuple[np.ndarray, int]:
    out = {t.name: t for t in reply.outputs}
    logits = np.frombuffer(out["logits"].data, np.float32).reshape(tuple(out["logits"].shape))
    (cls,) = np.frombuffer(out["class_id"].data, np.int64)
    return logits, int(cls)


def test_concurrent_single_images_are_batched_with_results_equal_to_unbatched(
    tmesh: tuple[Mesh, int, Path],
) -> None:
    mesh, port, traces = tmesh
    router = mesh.services["router"].address
    x = images(CONCURRENT)
    # Alone: one request at a time, each runs in a batch of its own.
    alone = []
    for i in range(CONCURRENT):
        (reply,) = asyncio.run(infer_all(router, [request(x[i])]))
        assert reply.batch_size == 1
        alone.append(logits_of(reply))
    batches0, rows0, singles0 = scrape(port, "cls")
    together = asyncio.run(infer_all(router, [request(x[i]) for i in range(CONCURRENT)]))
    batches1, rows1, singles1 = scrape(port, "cls")
    assert rows1 - rows0 == CONCURRENT  # every image ran once
    assert batches1 - batches0 < CONCURRENT / 2, (batches0, batches1)  # batched: rows per batch > 2
    assert max(r.batch_size for r in together) > 1
    assert singles1 - singles0 < batches1 - batches0 or singles1 == singles0
    for (logits, cls), reply in zip(alone, together, strict=True):
        got, got_cls = logits_of(reply)
        assert got.shape == (1, 10)
        # Float kernels may sum in another order for another batch size: equal within 1e-5.
        np.testing.assert_allclose(got, logits, rtol=0, atol=1e-5)
        assert got_cls == cls
    # The batch is in the traces: one span per batch, linked to the requests it carried.

    def batch_spans() -> list[dict[str, Any]]:
        return [
            s
            for s in read_spans(traces)
            if s["name"] == "engine.batch" and s["attributes"]["meshserve.batch.requests"] > 1
        ]

    spans = asyncio.run(eventually(batch_spans, 30, "an engine.batch span of several requests"))
    span = spans[0]
    assert len(span["links"]) == span["attributes"]["meshserve.batch.requests"]
    assert span["attributes"]["meshserve.batch.window_ms"] == pytest.approx(20.0)


def test_bad_tensors_are_refused_naming_the_tensor(tmesh: tuple[Mesh, int, Path]) -> None:
    mesh, _port, _traces = tmesh
    router = mesh.services["router"].address
    agent = mesh.services["agent-0"].address

    async def code_of(address: str, r: inference_pb2.InferRequest) -> tuple[str, str]:
        try:
            await infer_all(address, [r])
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or ""
        return "OK", ""

    wrong_shape = request(np.zeros((1, 3, 30, 30), np.float32))
    wrong_type = request(np.zeros((1, 3, 32, 32), np.float32))
    wrong_type.inputs[0].datatype = "INT32"
    short = request(np.zeros((1, 3, 32, 32), np.float32))
    short.inputs[0].data = short.inputs[0].data[:100]
    for address in (router, agent):  # the router checks; the agent checks again on its own
        code, details = asyncio.run(code_of(address, wrong_shape))
        assert code == "INVALID_ARGUMENT" and "'pixel_values'" in details
        assert "[-1,3,32,32]" in details and "[1,3,30,30]" in details
        code, details = asyncio.run(code_of(address, wrong_type))
        assert code == "INVALID_ARGUMENT" and "expects FP32" in details
        code, details = asyncio.run(code_of(address, short))
        assert code == "INVALID_ARGUMENT" and "100 bytes" in details
    nine = request(np.zeros((9, 3, 32, 32), np.float32))
    code, details = asyncio.run(code_of(router, nine))
    assert code == "INVALID_ARGUMENT" and "max_batch_size 8" in details
    code, details = asyncio.run(code_of(router, request(np.zeros((1, 3, 32, 32)), "demo")))
    assert code == "FAILED_PRECONDITION" and "not a tensor model" in details
    code, _ = asyncio.run(code_of(router, request(np.zeros((1, 3, 32, 32)), "nope")))
    assert code == "NOT_FOUND"

    async def generate_on_classifier() -> str:
        async with grpc.aio.insecure_channel(router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            try:
                async for _ in stub.Generate(
                    inference_pb2.GenerateRequest(model="cls", prompt="hi"), timeout=30
                ):
                    pass
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"
        return "OK"

    said = asyncio.run(generate_on_classifier())
    assert said.startswith("FAILED_PRECONDITION") and "call Infer" in said
    # The agent is unharmed: a good request after all of that.
    (ok,) = asyncio.run(infer_all(router, [request(images(1)[0])]))
    assert len(ok.outputs) == 2


def test_list_models_shows_the_signature(tmesh: tuple[Mesh, int, Path]) -> None:
    mesh, _port, _traces = tmesh

    async def listed() -> inference_pb2.ListModelsResponse:
        async with grpc.aio.insecure_channel(mesh.services["router"].address) as ch:
            reply: inference_pb2.ListModelsResponse = await inference_pb2_grpc.InferenceStub(
                ch
            ).ListModels(inference_pb2.ListModelsRequest(), timeout=10)
            return reply

    models = {m.name: m for m in asyncio.run(listed()).models}
    sig: common_pb2.TensorSignature = models["cls"].signature
    assert [(t.name, t.datatype, list(t.shape)) for t in sig.inputs] == [
        ("pixel_values", "FP32", [-1, 3, 32, 32])
    ]
    assert [t.name for t in sig.outputs] == ["logits", "class_id"] and sig.max_batch_size == 8
    assert not models["demo"].signature.inputs
