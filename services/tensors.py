"""Tensors of tensor models (pure, no numpy): KServe v2 datatypes, and the check of a request's
inputs against the model's signature, with errors that name the tensor (as Triton's do: "unexpected
shape for input 'x' for model 'm'"), so a client knows what to fix. The agent checks every
request; the router's fronts use the same functions for what they convert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc
from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import common_pb2

# Bytes per element of each KServe v2 datatype meshserve's tensor models take or give.
SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "INT32": 4,
    "UINT32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
}


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def fits(shape: Sequence[int], spec: Sequence[int]) -> bool:
    """Whether ``shape`` matches ``spec``, where -1 in ``spec`` is any size."""
    return len(shape) == len(spec) and all(
        s == d or s == -1 for d, s in zip(shape, spec, strict=True)
    )


def check_inputs(
    model: str,
    inputs: Sequence[common_pb2.Tensor],
    outputs: Sequence[str],
    signature: common_pb2.TensorSignature,
) -> int:
    """The request's batch size (rows), or INVALID_ARGUMENT naming what is wrong: a missing,
    unknown or repeated input, a datatype or shape the model does not take, data of the wrong
    size, inputs of different batch sizes, a batch over the model's max, an unknown output."""
    specs = {s.name: s for s in signature.inputs}
    seen: set[str] = set()
    rows: int | None = None
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        spec = specs.get(t.name)
        if spec is None:
            expected = ", ".join(repr(n) for n in specs)
            raise invalid_argument(
                [(where, f"unexpected input {t.name!r} for model {model!r} (it takes {expected})")]
            )
        if t.name in seen:
            raise invalid_argument([(where, f"input {t.name!r} given twice")])
        seen.add(t.name)
        if t.datatype != spec.datatype:
            raise invalid_argument(
                [
                    (
                        where,
                        f"input {t.name!r} has datatype {t.datatype or '(none)'}, but model "
                        f"{model!r} expects {spec.datatype}",
                    )
                ]
            )
        if not fits(t.shape, spec.shape) or any(d < 0 for d in t.shape):
            raise invalid_argument(
                [
                    (
                        where,
                        f"unexpected shape for input {t.name!r} for model {model!r}: expected "
                        f"{shape_text(spec.shape)}, got {shape_text(t.shape)}",
                    )
                ]
            )
        want = math.prod(t.shape) * SIZES[t.datatype]
        if len(t.data) != want:
            raise invalid_argument(
                [
                    (
                        where,
                        f"input {t.name!r} has {len(t.data)} bytes of data; shape "
                        f"{shape_text(t.shape)} of {t.datatype} needs {want}",
                    )
                ]
            )
        if rows is not None and t.shape[0] != rows:
            raise invalid_argument(
                [(where, f"input {t.name!r} has batch size {t.shape[0]}, others {rows}")]
            )
        rows = t.shape[0]
    missing = [n for n in specs if n not in seen]
    if missing:
        raise invalid_argument(
            [
                (
                    "inputs",
                    f"model {model!r} needs input {missing[0]!r}: {_describe(specs[missing[0]])}",
                )
            ]
        )
    names = {s.name for s in signature.outputs}
    for name in outputs:
        if name not in names:
            known = ", ".join(repr(n) for n in names)
            raise invalid_argument(
                [("outputs", f"unexpected output {name!r} for model {model!r} (it gives {known})")]
            )
    assert rows is not None  # a signature has inputs
    if rows < 1:
        raise invalid_argument([("inputs", "batch size 0: send at least one row")])
    if signature.max_batch_size and rows > signature.max_batch_size:
        raise invalid_argument(
            [
                (
                    "inputs",
                    f"batch size {rows} exceeds model {model!r}'s max_batch_size "
                    f"{signature.max_batch_size}: split the request",
                )
            ]
        )
    return rows


def _describe(spec: common_pb2.TensorSpec) -> str:
    return f"{spec.datatype} {shape_text(spec.shape)}"


def not_a_tensor_model(model: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"model {model!r} is not a tensor model (engine_args.task: classify): call Generate or "
        "Embed",
        "WRONG_TASK",
    )
