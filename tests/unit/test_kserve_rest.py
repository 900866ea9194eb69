"""The KServe v2 REST front's translation (pure): JSON and binary tensor data to the gRPC
form's message and back, and the refusals a client can act on."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import grpc
import pytest
from meshserve.kserve import grpc_service_pb2 as K
from meshserve.router.fronts.kserve_rest import (
    HEADER_LENGTH,
    as_json,
    infer_request,
    infer_response,
)
from meshserve.router.fronts.kserve_tensors import pack_bytes
from meshserve.rpc.errors import ServiceError


def _binary(doc: Mapping[str, object], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}


def test_json_and_binary_inputs_become_raw_contents_in_order() -> None:
    floats = struct.pack("<2f", 1.5, -2.0)
    doc = {
        "id": "r1",
        "parameters": {"max_tokens": 4, "temperature": 0.5, "binary_data_output": True},
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
            {"name": "b", "datatype": "INT64", "shape": [1, 2], "data": [[3, 4]]},
            {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
        ],
        "outputs": [{"name": "x", "parameters": {"binary_data": False}}, {"name": "y"}],
    }
    body, headers = _binary(doc, floats)
    r, wanted = infer_request("m", body, headers)
    assert r.model_name == "m" and r.id == "r1" and [t.name for t in r.inputs] == ["a", "b", "t"]
    assert list(r.inputs[1].shape) == [1, 2]
    assert r.raw_input_contents[0] == floats
    assert r.raw_input_contents[1] == struct.pack("<2q", 3, 4)
    assert r.raw_input_contents[2] == pack_bytes(["héllo".encode()])
    assert r.parameters["max_tokens"].int64_param == 4
    assert r.parameters["temperature"].double_param == 0.5
    assert wanted == {"x": False, "y": True, "": True}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{", {}, "not JSON"),
        (b"[1]", {}, "list 'inputs'"),
        (b'{"inputs": [{"name": "a"}]}', {}, "needs name, datatype and shape"),
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": ["x"]}]}', {}, "integers"),
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}', {}, "neither data"),
        (b'{"inputs": [{"name": "a", "datatype": "BF16", "shape": [1], "data": [1]}]}', {},
         "binary data only"),
        (b'{"inputs": [{"name": "a", "datatype": "INT8", "shape": [1], "data": [300]}]}', {},
         "inputs.a.data"),
        (b'{"inputs": []}', {HEADER_LENGTH: "999"}, "not a length within the body"),
        (b'{"inputs": []}xyz', {HEADER_LENGTH: "14"}, "3 bytes of binary data belong to no input"),
        (b'{"inputs": [], "parameters": {"p": [1]}}', {}, "parameters.p"),
        (b'{"inputs": []}', {HEADER_LENGTH: "\u00b2"}, "not a length"),
        (b'{"inputs": [], "parameters": 5}', {}, "parameters: a JSON object"),
        (b'{"inputs": [], "parameters": {"p": 99999999999999999999}}', {}, "outside int64"),
        (b'{"inputs": [], "outputs": 5}', {}, "outputs: a list"),
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1e999], "data": [1]}]}', {},
         "malformed"),
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1e39]}]}', {},
         "malformed"),
        (b'{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
         {}, "malformed"),
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, "not JSON"),
    ],
)  # fmt: skip
def test_bad_requests_are_invalid_argument_naming_the_fault(
    body: bytes, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(ServiceError) as e:
        infer_request("m", body, headers)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.message


def test_strings_stay_strings_and_64_bit_fields_become_numbers() -> None:
    meta = K.ModelMetadataResponse(name="123", versions=["1"], platform="p")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, 3])
    doc = as_json(meta)
    assert (
        doc["name"] == "123" and doc["versions"] == ["1"] and doc["inputs"][0]["shape"] == [-1, 3]
    )


def test_outputs_go_back_as_json_data_or_binary_data_as_asked() -> None:
    got = K.ModelInferResponse(model_name="m", model_version="1", id="r1")
    got.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    got.raw_output_contents.append(struct.pack("<2f", 0.25, 4.0))
    got.outputs.add(name="text", datatype="BYTES", shape=[1])
    got.raw_output_contents.append(pack_bytes([b"hi"]))
    as_json = infer_response(got, {"": False}, {})
    doc = json.loads(bytes(as_json.body))
    assert doc["outputs"][0]["data"] == [0.25, 4.0] and doc["outputs"][1]["data"] == ["hi"]
    mixed = infer_response(got, {"logits": True, "": False}, {})
    length = int(mixed.headers[HEADER_LENGTH])
    head = json.loads(bytes(mixed.body[:length]))
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert mixed.body[length:] == struct.pack("<2f", 0.25, 4.0)
