"""KServe v2 / Open Inference Protocol over REST, on the router's HTTP port beside the OpenAI
front: the gRPC form's KServe logic (kserve.py) with its messages translated from and to JSON,
including Triton's binary tensor data extension (a JSON header of ``Inference-Header-Content-
Length`` bytes, then each binary tensor in order), so ``tritonclient.http`` and KServe's REST
clients work unchanged.

``GET /v2``, ``/v2/health/live|ready``, ``/v2/models/{m}[/versions/{v}]`` (metadata),
``…/ready`` (200 ready, 400 not), ``…/config``, ``…/stats`` and ``/v2/models/stats``;
``POST …/infer``; ``POST /v2/repository/index``, ``/v2/repository/models/{m}/load|unload``.
Errors: the protocol's ``{"error": message}`` with the HTTP status of the gRPC code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from meshserve.kserve import grpc_service_pb2 as K
from meshserve.router.core.call import Call
from meshserve.router.fronts.http_errors import from_exception
from meshserve.router.fronts.http_tracing import finish, server_span, trace_headers
from meshserve.router.fronts.kserve import KServe
from meshserve.router.fronts.kserve_tensors import TYPED, pack_bytes, param, unpack_bytes
from meshserve.router.fronts.openai_http import call_of
from meshserve.rpc.errors import ServiceError, invalid_argument
from opentelemetry import trace

HEADER_LENGTH = "inference-header-content-length"
FORMATS = {**{k: fmt for k, (_field, fmt) in TYPED.items()}, "FP16": "e"}


def add_kserve_rest(app: FastAPI, kserve: KServe) -> None:
    async def answer(request: Request, fn: Callable[[Call], Awaitable[Any]]) -> Response:
        """``fn``'s proto reply as JSON, or the error in the protocol's shape."""
        try:
            reply = await fn(call_of(request, None))
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e)
        if isinstance(reply, Response):
            return reply
        return JSONResponse(as_json(reply))

    @app.get("/v2")
    async def server_metadata(request: Request) -> Response:
        return await answer(request, lambda c: kserve.server_metadata(K.ServerMetadataRequest(), c))

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": True})

    @app.get("/v2/models/stats")
    async def all_stats(request: Request) -> Response:
        return await answer(
            request, lambda c: kserve.model_statistics(K.ModelStatisticsRequest(), c)
        )

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):

        @app.get(prefix)
        async def model_metadata(name: str, request: Request) -> Response:
            return await answer(
                request, lambda c: kserve.model_metadata(K.ModelMetadataRequest(name=name), c)
            )

        @app.get(prefix + "/ready")
        async def model_ready(name: str, request: Request) -> Response:
            async def ready(c: Call) -> Response:
                got = await kserve.model_ready(K.ModelReadyRequest(name=name), c)
                return JSONResponse({"ready": got.ready}, status_code=200 if got.ready else 400)

            return await answer(request, ready)

        @app.get(prefix + "/config")
        async def model_config(name: str, request: Request) -> Response:
            async def config(c: Call) -> Any:
                return (await kserve.model_config(K.ModelConfigRequest(name=name), c)).config

            return await answer(request, config)

        @app.get(prefix + "/stats")
        async def model_stats(name: str, request: Request) -> Response:
            ask = K.ModelStatisticsRequest(name=name)
            return await answer(request, lambda c: kserve.model_statistics(ask, c))

        @app.post(prefix + "/infer")
        async def infer(name: str, request: Request) -> Response:
            span = server_span(request)
            try:
                with trace.use_span(span, end_on_exit=False, set_status_on_exception=False):
                    r, binary = infer_request(name, await request.body(), request.headers)
                    got = await kserve.model_infer(r, call_of(request, None))
            except Exception as e:  # a status of the core's, or a bug: 500, span ended either way
                finish(span, e)
                return failure(e, trace_headers(span))
            finish(span)
            return infer_response(got, binary, trace_headers(span))

    @app.post("/v2/repository/index")
    async def index(request: Request) -> Response:
        async def models(c: Call) -> Response:
            body = await json_body(request)
            ask = K.RepositoryIndexRequest(ready=bool(body.get("ready", False)))
            got = await kserve.repository_index(ask, c)
            return JSONResponse([as_json(m) for m in got.models])

        return await answer(request, models)

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        ask = K.RepositoryModelLoadRequest(model_name=name)
        return await answer(request, lambda c: kserve.repository_model_load(ask, c))

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        ask = K.RepositoryModelUnloadRequest(model_name=name)
        return await answer(request, lambda c: kserve.repository_model_unload(ask, c))


def failure(e: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body, extra = from_exception(e)
    return JSONResponse(
        {"error": body["error"]["message"]},
        status_code=status,
        headers={**extra, **(headers or {})},
    )


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise_bad(f"the body is not JSON: {e}")
    if not isinstance(doc, dict):
        raise_bad("the body must be a JSON object")
    out: dict[str, Any] = doc
    return out


def raise_bad(message: str) -> Any:
    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_REQUEST")


# The protocol's 64-bit integer fields, which proto3's JSON writes as strings.
INT64_FIELDS = frozenset(
    {"shape", "dims", "count", "ns", "last_inference", "inference_count", "execution_count",
     "max_queue_delay_microseconds", "preferred_batch_size"}
)  # fmt: skip


def as_json(message: Any) -> Any:
    """A proto message in the protocol's JSON: field names as in the .proto, 64-bit integer
    fields as numbers (strings stay strings: a version "1", a model named "123")."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _numbers(doc, False)


def _numbers(x: Any, int64: bool) -> Any:
    if isinstance(x, dict):
        return {k: _numbers(v, k in INT64_FIELDS) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers(v, int64) for v in x]
    if int64 and isinstance(x, str) and x.lstrip("-").isdigit():
        return int(x)
    return x


MALFORMED = (ValueError, TypeError, AttributeError, KeyError, OverflowError, RecursionError)


def infer_request(
    name: str, body: bytes, headers: Any
) -> tuple[K.ModelInferRequest, dict[str, bool]]:
    """The request as the gRPC form's message (every input in raw_input_contents), and which
    outputs the client wants as binary data. Whatever does not fit the protocol's shapes is
    INVALID_ARGUMENT, never a server error."""
    try:
        return _infer_request(name, body, headers)
    except MALFORMED as e:  # UnicodeError is a ValueError
        raise_bad(f"a malformed inference request: {type(e).__name__}: {str(e)[:200]}")
        raise  # unreachable: raise_bad raises


def _infer_request(
    name: str, body: bytes, headers: Any
) -> tuple[K.ModelInferRequest, dict[str, bool]]:
    length = headers.get(HEADER_LENGTH)
    if length is not None:
        if not (length.isascii() and length.isdigit()) or int(length) > len(body):
            raise_bad(f"{HEADER_LENGTH} {length!r}: not a length within the body")
        head, binary = body[: int(length)], body[int(length) :]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise_bad(f"the inference header is not JSON: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise_bad("the inference header must be a JSON object with a list 'inputs'")
    r = K.ModelInferRequest(model_name=name, id=str(doc.get("id", "")))
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise_bad("parameters: a JSON object")
    for key, value in params.items():
        set_param(r.parameters[key], key, value)
    offset = 0
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict) or not {"name", "datatype", "shape"} <= set(t):
            raise_bad(f"inputs[{i}]: needs name, datatype and shape")
        tensor = r.inputs.add(name=str(t["name"]), datatype=str(t["datatype"]))
        try:
            tensor.shape.extend(int(d) for d in t["shape"])
        except (TypeError, ValueError):
            raise_bad(f"inputs.{tensor.name}.shape: a list of integers")
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise_bad(f"inputs.{tensor.name}: binary_data_size {size!r} past the body")
            r.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        else:
            r.raw_input_contents.append(packed(tensor.name, tensor.datatype, t.get("data")))
    if offset != len(binary):
        raise_bad(f"{len(binary) - offset} bytes of binary data belong to no input")
    default = bool(params.get("binary_data_output", False))
    wanted: dict[str, bool] = {}
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise_bad("outputs: a list")
    for o in outputs:
        if not isinstance(o, dict) or "name" not in o:
            raise_bad("outputs: objects with a name")
        r.outputs.add(name=str(o["name"]))
        wanted[str(o["name"])] = bool((o.get("parameters") or {}).get("binary_data", default))
    wanted.setdefault("", default)  # outputs not asked for by name
    return r, wanted


def set_param(p: K.InferParameter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise_bad(f"parameters.{key}: outside int64")
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise_bad(f"parameters.{key}: a bool, number or string")


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for d in data for x in _flat(d)]
    return [data]


def packed(name: str, datatype: str, data: Any) -> bytes:
    """JSON tensor data as the raw little-endian bytes the gRPC form carries."""
    if data is None:
        raise_bad(f"inputs.{name}: neither data nor binary_data_size")
    values = _flat(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise_bad(f"inputs.{name}: BYTES data as JSON strings")
        return pack_bytes([v.encode() for v in values])
    fmt = FORMATS.get(datatype)
    if fmt is None:
        raise_bad(f"inputs.{name}: {datatype} data travels as binary data only")
    try:
        return struct.pack(f"<{len(values)}{fmt}", *values)
    except struct.error as e:
        raise invalid_argument([(f"inputs.{name}.data", str(e))]) from None


def unpacked(name: str, datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        items = unpack_bytes(raw, name)
        try:
            return [x.decode() for x in items]
        except UnicodeDecodeError:
            return [x.decode("latin-1") for x in items]
    fmt = FORMATS[datatype]
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw))


def infer_response(
    got: K.ModelInferResponse, binary: dict[str, bool], headers: dict[str, str]
) -> Response:
    doc: dict[str, Any] = {
        "model_name": got.model_name,
        "model_version": got.model_version,
        "id": got.id,
        "parameters": {k: param(v) for k, v in got.parameters.items()},
        "outputs": [],
    }
    blobs: list[bytes] = []
    for i, t in enumerate(got.outputs):
        raw = got.raw_output_contents[i] if i < len(got.raw_output_contents) else b""
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary.get(t.name, binary[""]) or t.datatype not in (*FORMATS, "BYTES"):
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = unpacked(t.name, t.datatype, raw)
        doc["outputs"].append(out)
    head = json.dumps(doc).encode()
    if not blobs:
        return Response(head, media_type="application/json", headers=headers)
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={**headers, HEADER_LENGTH: str(len(head))},
    )
