"""KServe v2 tensors for meshserve's models (pure): BYTES elements in the protocol's raw form,
the text input of an LLM and its sampling options, the text output of a delta; a tensor model's
inputs (raw or typed contents) and outputs; each kind of model's metadata and config."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import grpc
from meshserve.kserve import grpc_service_pb2 as K
from meshserve.router.routing.endpoints import Route
from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.tensors import SIZES
from meshserve.v1 import cluster_pb2, common_pb2, inference_pb2


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES tensor elements in the protocol's raw form: each a 4-byte little-endian length and
    its bytes."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise invalid_argument([(f"inputs.{name}", "truncated BYTES element length")])
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise invalid_argument([(f"inputs.{name}", "BYTES element longer than its data")])
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def input_strings(request: K.ModelInferRequest, name: str, required: bool) -> list[str]:
    """The BYTES input ``name`` as strings (contents or raw_input_contents)."""
    for i, t in enumerate(request.inputs):
        if t.name != name:
            continue
        if t.datatype != "BYTES":
            raise invalid_argument(
                [(f"inputs.{name}", f"datatype must be BYTES, got {t.datatype}")]
            )
        if request.raw_input_contents:
            if i >= len(request.raw_input_contents):
                raise invalid_argument([(f"inputs.{name}", "no raw_input_contents for it")])
            items = unpack_bytes(request.raw_input_contents[i], name)
        else:
            items = list(t.contents.bytes_contents)
        try:
            return [x.decode() for x in items]
        except UnicodeDecodeError:
            raise invalid_argument([(f"inputs.{name}", "not UTF-8 text")]) from None
    if required:
        raise invalid_argument([(f"inputs.{name}", "required (BYTES, the prompt)")])
    return []


def param(p: K.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def generate_request(route: Route, request: K.ModelInferRequest) -> inference_pb2.GenerateRequest:
    prompts = input_strings(request, "text_input", True)
    if len(prompts) != 1:
        raise invalid_argument([("inputs.text_input", f"one prompt, got {len(prompts)}")])
    options: dict[str, Any] = {k: param(v) for k, v in request.parameters.items()}
    for text in input_strings(request, "sampling_parameters", False):
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as e:
            raise invalid_argument([("inputs.sampling_parameters", f"not JSON: {e}")]) from None
        if not isinstance(extra, dict):
            raise invalid_argument([("inputs.sampling_parameters", "a JSON object")])
        options.update(extra)
    g = inference_pb2.GenerateRequest(model=route.spec.name, prompt=prompts[0])
    g.request_id = request.id
    s = g.sampling
    try:
        if options.get("max_tokens") is not None:
            s.max_tokens = int(options["max_tokens"])
        if options.get("temperature") is not None:
            s.temperature = float(options["temperature"])
        if options.get("top_p") is not None:
            s.top_p = float(options["top_p"])
        if options.get("seed") is not None:
            s.seed = int(options["seed"])
        if options.get("ignore_eos") is not None:
            s.ignore_eos = bool(options["ignore_eos"])
        stop = options.get("stop")
        if stop:
            s.stop.extend([stop] if isinstance(stop, str) else [str(x) for x in stop])
    except (TypeError, ValueError) as e:
        raise invalid_argument([("parameters", f"bad sampling value: {e}")]) from None
    return g


def text_response(model: str, rid: str, text: str, final: bool) -> K.ModelInferResponse:
    out = K.ModelInferResponse(model_name=model, model_version="1", id=rid)
    out.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    out.raw_output_contents.append(pack_bytes([text.encode()]))
    out.parameters["triton_final_response"].bool_param = final
    return out


# --- tensor models ---------------------------------------------------------------------------

# Typed contents (InferTensorContents) of each datatype: (field, struct format of one element)
TYPED = {
    "BOOL": ("bool_contents", "?"),
    "UINT8": ("uint_contents", "B"),
    "UINT16": ("uint_contents", "H"),
    "UINT32": ("uint_contents", "I"),
    "UINT64": ("uint64_contents", "Q"),
    "INT8": ("int_contents", "b"),
    "INT16": ("int_contents", "h"),
    "INT32": ("int_contents", "i"),
    "INT64": ("int64_contents", "q"),
    "FP32": ("fp32_contents", "f"),
    "FP64": ("fp64_contents", "d"),
}


def tensors_in(request: K.ModelInferRequest) -> list[common_pb2.Tensor]:
    """The request's inputs as meshserve tensors: raw_input_contents (as tritonclient sends
    them) or typed contents, packed little-endian. Their shapes and sizes are checked later
    against the model (tensors.check_inputs)."""
    out = []
    for i, t in enumerate(request.inputs):
        if request.raw_input_contents:
            if i >= len(request.raw_input_contents):
                raise invalid_argument([(f"inputs.{t.name}", "no raw_input_contents for it")])
            data = request.raw_input_contents[i]
        elif t.datatype in TYPED:
            name, fmt = TYPED[t.datatype]
            values = list(getattr(t.contents, name))
            try:
                data = struct.pack(f"<{len(values)}{fmt}", *values)
            except struct.error as e:
                raise invalid_argument([(f"inputs.{t.name}", f"contents: {e}")]) from None
        elif t.datatype in SIZES:
            raise invalid_argument(
                [(f"inputs.{t.name}", f"{t.datatype} travels in raw_input_contents only")]
            )
        else:
            raise invalid_argument([(f"inputs.{t.name}", f"unknown datatype {t.datatype!r}")])
        out.append(common_pb2.Tensor(name=t.name, datatype=t.datatype, shape=t.shape, data=data))
    return out


def infer_response(
    model: str, rid: str, reply: inference_pb2.InferResponse
) -> K.ModelInferResponse:
    """Outputs in raw_output_contents, one per output in order (what tritonclient reads)."""
    out = K.ModelInferResponse(model_name=model, model_version="1", id=rid)
    for t in reply.outputs:
        out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        out.raw_output_contents.append(t.data)
    out.parameters["meshserve_batch_size"].int64_param = reply.batch_size
    return out


# --- metadata and config -----------------------------------------------------------------------


def kind(route: Route) -> str:
    """ "llm", "embed" or "tensor" (engine_args.task)."""
    task = route.spec.engine_args.get("task", "generate")
    return {"embed": "embed", "classify": "tensor"}.get(task, "llm")


def platform(route: Route) -> str:
    return {"llm": "meshserve_llm", "embed": "meshserve_embedding"}.get(
        kind(route), "meshserve_tensor"
    )


def signature(route: Route) -> common_pb2.TensorSignature:
    """A tensor model's signature, as its replicas published it; UNAVAILABLE before any did."""
    if route.signature is None:
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"model {route.spec.name!r} has not been loaded yet: its tensor metadata comes "
            "from a loaded replica (RepositoryModelLoad loads it)",
            "NO_SIGNATURE_YET",
            retry_after_s=5.0,
        )
    return route.signature


def metadata(route: Route) -> K.ModelMetadataResponse:
    out = K.ModelMetadataResponse(name=route.spec.name, versions=["1"], platform=platform(route))
    if kind(route) == "tensor":
        sig = signature(route)
        for spec in sig.inputs:
            out.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in sig.outputs:
            out.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    elif kind(route) == "embed":
        out.inputs.add(name="text_input", datatype="BYTES", shape=[-1])
        out.outputs.add(name="embedding", datatype="FP32", shape=[-1, -1])
    else:
        out.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        out.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        out.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    return out


def config(route: Route) -> K.ModelConfig:
    """Triton's model config: for a tensor model, dims without the batch dimension,
    max_batch_size and the dynamic batcher's window; an LLM is decoupled (ModelStreamInfer)."""
    engine = cluster_pb2.EngineKind.Name(route.spec.engine)  # type: ignore[arg-type]
    c = K.ModelConfig(
        name=route.spec.name,
        platform=platform(route),
        backend=engine.removeprefix("ENGINE_KIND_").lower(),
    )
    if kind(route) == "tensor":
        sig = signature(route)
        c.max_batch_size = sig.max_batch_size
        for spec in sig.inputs:
            c.input.add(name=spec.name, data_type=data_type(spec.datatype), dims=spec.shape[1:])
        for spec in sig.outputs:
            c.output.add(name=spec.name, data_type=data_type(spec.datatype), dims=spec.shape[1:])
        args = route.spec.engine_args
        if args.get("batching", "fixed") != "off":
            window_us = int(float(args.get("batch_window_ms", 20)) * 1000)
            c.dynamic_batching.max_queue_delay_microseconds = window_us
            c.dynamic_batching.preferred_batch_size.append(sig.max_batch_size)
    elif kind(route) == "embed":
        c.input.add(name="text_input", data_type=K.TYPE_STRING, dims=[-1])
        c.output.add(name="embedding", data_type=K.TYPE_FP32, dims=[-1, -1])
    else:
        c.input.add(name="text_input", data_type=K.TYPE_STRING, dims=[1])
        c.input.add(name="sampling_parameters", data_type=K.TYPE_STRING, dims=[1])
        c.output.add(name="text_output", data_type=K.TYPE_STRING, dims=[1])
        c.model_transaction_policy.decoupled = True
    return c


def data_type(datatype: str) -> K.DataType.ValueType:
    return K.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")
