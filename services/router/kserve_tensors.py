"""KServe v2 tensors for meshserve's models (pure): BYTES elements in the protocol's raw form,
the text input of an LLM and its sampling options, the text output of a delta."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from meshserve.kserve import grpc_service_pb2 as K
from meshserve.router.table import Route
from meshserve.rpc.errors import invalid_argument
from meshserve.v1 import inference_pb2


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
