"""Tensor requests checked against a model's signature (tensors.check_inputs: every error names
the tensor), KServe v2 inputs converted (raw and typed contents), tensor models' metadata and
config, and the spec checks of `model apply` for tensor models."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import pytest
from meshserve.kserve import grpc_service_pb2 as K
from meshserve.modelspec import spec_from_dict
from meshserve.router.fronts.kserve_tensors import config, infer_response, metadata, tensors_in
from meshserve.router.routing.endpoints import Route
from meshserve.rpc.errors import ServiceError
from meshserve.tensors import check_inputs
from meshserve.v1 import cluster_pb2, common_pb2, inference_pb2


def signature() -> common_pb2.TensorSignature:
    s = common_pb2.TensorSignature(max_batch_size=8)
    s.inputs.add(name="pixel_values", datatype="FP32", shape=[-1, 3, 4, 4])
    s.outputs.add(name="logits", datatype="FP32", shape=[-1, 10])
    s.outputs.add(name="class_id", datatype="INT64", shape=[-1])
    return s


def image(
    rows: int = 1, shape: list[int] | None = None, datatype: str = "FP32"
) -> common_pb2.Tensor:
    shape = shape or [rows, 3, 4, 4]
    n = 1
    for d in shape:
        n *= d
    return common_pb2.Tensor(name="pixel_values", datatype=datatype, shape=shape, data=bytes(4 * n))


def refused(inputs: list[common_pb2.Tensor], outputs: tuple[str, ...] = ()) -> str:
    with pytest.raises(ServiceError) as e:
        check_inputs("cls", inputs, outputs, signature())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.violations  # google.rpc.BadRequest details
    return e.value.message


def test_a_good_request_gives_its_batch_size() -> None:
    assert check_inputs("cls", [image(1)], (), signature()) == 1
    assert check_inputs("cls", [image(8)], ("class_id",), signature()) == 8


def test_errors_name_the_tensor_and_what_was_expected() -> None:
    m = refused([image(shape=[1, 3, 5, 4])])
    assert "unexpected shape for input 'pixel_values' for model 'cls'" in m
    assert "[-1,3,4,4]" in m and "[1,3,5,4]" in m
    assert "'pixel_values' has datatype INT32" in refused([image(1, datatype="INT32")])
    assert "expects FP32" in refused([image(1, datatype="INT32")])
    assert "unexpected input 'image'" in refused(
        [common_pb2.Tensor(name="image", datatype="FP32", shape=[1], data=bytes(4))]
    )
    assert "needs input 'pixel_values'" in refused([])
    assert "given twice" in refused([image(1), image(1)])
    short = image(1)
    short.data = short.data[:-4]
    assert "needs 192" in refused([short]) and "has 188 bytes" in refused([short])
    assert "max_batch_size 8" in refused([image(9)])
    assert "batch size 0" in refused([image(shape=[0, 3, 4, 4])])
    assert "unexpected output 'probs'" in refused([image(1)], ("probs",))
    assert "unexpected shape" in refused([image(shape=[3, 4, 4])])  # no batch dimension


def test_kserve_raw_and_typed_inputs_become_the_same_tensor() -> None:
    values = [float(i) for i in range(48)]
    raw = K.ModelInferRequest(model_name="cls")
    raw.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 4, 4])
    raw.raw_input_contents.append(struct.pack("<48f", *values))
    typed = K.ModelInferRequest(model_name="cls")
    t = typed.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 4, 4])
    t.contents.fp32_contents.extend(values)
    assert tensors_in(raw) == tensors_in(typed)
    assert check_inputs("cls", tensors_in(typed), (), signature()) == 1
    half = K.ModelInferRequest()
    half.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(ServiceError, match="raw_input_contents only"):
        tensors_in(half)
    missing = K.ModelInferRequest()
    missing.inputs.add(name="a", datatype="FP32", shape=[1])
    missing.inputs.add(name="b", datatype="FP32", shape=[1])
    missing.raw_input_contents.append(bytes(4))
    with pytest.raises(ServiceError, match=r"inputs\.b: no raw_input_contents"):
        tensors_in(missing)


def route(task: str, sig: common_pb2.TensorSignature | None, **args: str) -> Route:
    spec = cluster_pb2.ModelSpec(name="cls", engine_args={"task": task, **args})
    return Route(spec, (), signature=sig)


def test_tensor_metadata_and_config_follow_the_signature() -> None:
    meta = metadata(route("classify", signature()))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("pixel_values", "FP32", [-1, 3, 4, 4])
    ]
    assert [t.name for t in meta.outputs] == ["logits", "class_id"]
    c = config(route("classify", signature(), batch_window_ms="5"))
    assert c.max_batch_size == 8 and list(c.input[0].dims) == [3, 4, 4]
    assert c.input[0].data_type == K.TYPE_FP32 and c.output[1].data_type == K.TYPE_INT64
    assert c.dynamic_batching.max_queue_delay_microseconds == 5000
    assert not config(route("classify", signature(), batching="off")).HasField("dynamic_batching")
    assert config(route("generate", None)).model_transaction_policy.decoupled
    with pytest.raises(ServiceError) as e:  # not loaded yet: no signature to show
        metadata(route("classify", None))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_infer_response_puts_outputs_in_raw_contents() -> None:
    reply = inference_pb2.InferResponse(batch_size=4)
    reply.outputs.add(name="class_id", datatype="INT64", shape=[1], data=struct.pack("<q", 7))
    out = infer_response("cls", "r1", reply)
    assert out.id == "r1" and out.outputs[0].name == "class_id"
    assert out.raw_output_contents == [struct.pack("<q", 7)]
    assert out.parameters["meshserve_batch_size"].int64_param == 4


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"engine_args": {"task": "segment"}}, "generate, embed or classify"),
        ({"engine_args": {"task": "classify", "batching": "maybe"}}, "batching"),
        ({"engine_args": {"task": "classify", "batching": "adaptive"}}, "latency_slo_ms"),
        ({"engine": "vllm", "engine_args": {"task": "classify"}}, "engine torch"),
    ],
)
def test_model_apply_refuses_bad_tensor_specs(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_dict({"name": "cls", "source": str(Path("/x")), "memory": "1MiB", **doc})
