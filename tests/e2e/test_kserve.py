"""KServe v2 / Open Inference Protocol on the router, checked with Triton's own Python client
(`tritonclient[grpc]`, in its own environment: it needs protobuf < 7) against a real mesh:
liveness, repository index, load (= replicas placed), metadata and config, ModelInfer on the LLM,
decoupled ModelStreamInfer (one response per delta, errors in-stream), a missing input refused,
statistics, and unload (= scale to zero: the replica goes); ModelInfer on a tensor model (an image
classifier: metadata, config with its batch size and window, results equal to the native API's,
a wrong shape refused naming the tensor)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import numpy as np
import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import common_pb2, inference_pb2

from tests.e2e.conftest import apply, demo_mesh, generate, model_spec, read_spans, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """.venv-triton, built on first use (pip reaches an index wherever the suite installs)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "triton-env.sh")], check=True, timeout=600)
    return ROOT / ".venv-triton" / "bin" / "python"


@pytest.fixture(scope="module")
def kmesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("kserve")
    flags = ("--http-listen", "127.0.0.1:0")  # KServe v2 REST beside the OpenAI front
    with demo_mesh(root, demo_model, trace_dir=root / "traces", router_flags=flags) as m:
        yield m


async def test_model_infer_answers_with_its_trace_id(kmesh: Mesh) -> None:
    from meshserve.kserve import grpc_service_pb2 as K
    from meshserve.kserve import grpc_service_pb2_grpc as KG

    r = K.ModelInferRequest(model_name="demo", id="traced")
    for name, value in (("text_input", b"Hello"), ("sampling_parameters", b'{"max_tokens": 4}')):
        tensor = r.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(value)
    async with grpc.aio.insecure_channel(kmesh.services["router"].address) as ch:
        call = KG.GRPCInferenceServiceStub(ch).ModelInfer(r, timeout=60)
        reply = await call
        headers = dict(await call.initial_metadata() or ())
    assert reply.outputs[0].name == "text_output"
    _version, trace_id, span_id, _flags = str(headers["traceresponse"]).split("-")
    assert kmesh.trace_dir is not None
    trace_dir = kmesh.trace_dir

    def server_span() -> list[dict[str, Any]]:
        ids = {"trace_id": "0x" + trace_id, "span_id": "0x" + span_id}
        return [s for s in read_spans(trace_dir) if ids.items() <= s["context"].items()]

    [span] = await eventually(server_span, 10, "the ModelInfer span the header names")
    assert span["name"].endswith("GRPCInferenceService/ModelInfer")
    assert span["status"]["status_code"] == "OK"


def test_tritonclient_speaks_to_the_whole_mesh(
    kmesh: Mesh, demo_model: Path, classifier_model: Path, triton_python: Path
) -> None:
    # A second model with no replicas yet: the client's load_model places it.
    asyncio.run(apply(kmesh, model_spec("story", demo_model, min_replicas=0)))
    cls = model_spec("cls", classifier_model, min_replicas=1, kv_headroom="1MiB")
    cls.engine_args.update(task="classify", batch_window_ms="5")
    asyncio.run(apply(kmesh, cls))
    router = kmesh.services["router"].address
    asyncio.run(eventually(lambda: ready_replicas(router, "cls"), 60, "cls READY"))
    script = str(ROOT / "tests" / "e2e" / "triton_client.py")
    run = subprocess.run(
        [str(triton_python), script, router, "story", "cls"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["server"] == "meshserve"
    assert seen["model_ready"] and ["story", "READY"] in seen["index"]
    assert ["demo", "READY"] in seen["index"]
    assert seen["inputs"] == [["text_input", "BYTES"], ["sampling_parameters", "BYTES"]]
    assert seen["outputs"] == [["text_output", "BYTES"]] and seen["config_name"] == "story"
    assert seen["infer_text"] == seen["stream_text"]  # greedy: whole text == streamed deltas
    assert seen["stream_deltas"] >= 2
    assert "NOT_FOUND" in seen["stream_error"] and "no-such-model" in seen["stream_error"]
    assert seen["missing_input"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "text_input" in seen["missing_input"]
    assert seen["stats_success"] >= 2 and seen["stats_fail"] >= 1
    check_tensor_model(router, seen)

    async def zero() -> bool:  # unload = scale to zero: no replica serves (offloaded or gone)
        return await ready_replicas(router, "story") == 0

    # No request may reach "story" before this: one arriving after the unload wants it back.
    asyncio.run(eventually(zero, 30, "story scaled to zero after unload"))
    assert asyncio.run(ready_replicas(router, "demo")) == 1  # the other model is untouched
    # The next request brings it back (the router's cold start), as after an idle scale-down,
    # and the native API's greedy text equals what the KServe client got.
    native = asyncio.run(generate(router, greedy_story(), timeout=90))
    assert native.text == seen["infer_text"]


def greedy_story() -> inference_pb2.GenerateRequest:
    return greedy("story")


def greedy(model: str) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt="Once upon a time")
    r.sampling.max_tokens, r.sampling.temperature = 12, 0.0
    return r


def check_tensor_model(router: str, seen: dict[str, Any]) -> None:
    assert seen["t_inputs"] == [["pixel_values", "FP32", [-1, 3, 32, 32]]]
    assert seen["t_outputs"] == [["logits", "FP32", [-1, 10]], ["class_id", "INT64", [-1]]]
    assert seen["t_max_batch"] == 8 and seen["t_dims"] == [3, 32, 32]
    assert seen["t_window_us"] == 5000
    assert seen["t_bad_shape"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "unexpected shape for input 'pixel_values'" in seen["t_bad_shape"]
    # The same images through the native Infer RPC give the same logits and classes.
    out = native_infer(router, np.asarray(seen["t_image"], np.float32))
    logits = np.frombuffer(out["logits"].data, np.float32).reshape(2, 10)
    np.testing.assert_allclose(np.asarray(seen["t_logits"]), logits, rtol=0, atol=1e-5)
    assert seen["t_class_id"] == np.frombuffer(out["class_id"].data, np.int64).tolist()


def native_infer(router: str, x: np.ndarray) -> dict[str, common_pb2.Tensor]:
    native = inference_pb2.InferRequest(model="cls")
    native.inputs.add(name="pixel_values", datatype="FP32", shape=list(x.shape), data=x.tobytes())

    async def call() -> inference_pb2.InferResponse:
        async with grpc.aio.insecure_channel(router) as ch:
            reply: inference_pb2.InferResponse = await inference_pb2_grpc.InferenceStub(ch).Infer(
                native, timeout=30
            )
            return reply

    return {t.name: t for t in asyncio.run(call()).outputs}


def test_tritonclient_http_speaks_to_the_rest_front(
    kmesh: Mesh, classifier_model: Path, triton_python: Path
) -> None:
    """KServe v2 over REST on the router's HTTP port, through `tritonclient.http` unchanged:
    health, metadata, config, readiness (a missing model is not ready), ModelInfer on the demo
    LLM (binary and JSON output: the same greedy text as the native API) and on the classifier
    (binary and JSON input: the native Infer's logits and classes), errors with their status."""
    cls = model_spec("cls", classifier_model, min_replicas=1, kv_headroom="1MiB")
    cls.engine_args.update(task="classify", batch_window_ms="5")
    asyncio.run(apply(kmesh, cls))
    router = kmesh.services["router"].address
    asyncio.run(eventually(lambda: ready_replicas(router, "cls"), 60, "cls READY"))
    script = str(ROOT / "tests" / "e2e" / "triton_http_client.py")
    run = subprocess.run(
        [str(triton_python), script, kmesh.services["router"].info["http"], "demo", "cls"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["server"] == "meshserve"
    assert seen["model_ready"] and not seen["missing_ready"]
    assert seen["inputs"] == [["text_input", "BYTES"], ["sampling_parameters", "BYTES"]]
    assert seen["config_name"] == "demo"
    native = asyncio.run(generate(router, greedy("demo"), timeout=60))
    assert seen["llm_text"] == seen["llm_text_json"] == native.text
    assert seen["missing_model"].startswith("404") and "no-such-model" in seen["missing_model"]
    assert seen["t_inputs"] == [["pixel_values", "FP32", [-1, 3, 32, 32]]]
    x = np.asarray(seen["t_image"], np.float32)
    out = native_infer(router, x)
    logits = np.frombuffer(out["logits"].data, np.float32).reshape(2, 10)
    classes = np.frombuffer(out["class_id"].data, np.int64).tolist()
    for binary in (True, False):
        got = np.asarray(seen[f"t_logits_{binary}"])
        np.testing.assert_allclose(got, logits, rtol=0, atol=1e-5)
        assert seen[f"t_class_id_{binary}"] == classes
    assert seen["t_bad_shape"].startswith("400") and "pixel_values" in seen["t_bad_shape"]
    assert seen["t_stats_success"] >= 2
