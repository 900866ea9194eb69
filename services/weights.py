"""Predicts a model's weight memory before loading it, from the safetensors headers alone (no
torch, no weights read): parameter count x the dtype the engine will load them in."""

from __future__ import annotations

import json
import struct
from pathlib import Path

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
OVERHEAD_FRACTION = 0.15  # seed: runtime overhead on top of weights + KV headroom
# Restore bandwidth to the device by where weights wait, until one is measured (seed figures:
# CPU RAM → GPU 14 GB in 0.44 s at PCIe speed; NVMe ≈ 2 s for the same).
HOST_BYTES_PER_S = 32e9
DISK_BYTES_PER_S = 7e9


def grant_bytes(memory: int, kv_headroom: int) -> int:
    """Memory a placement grants one replica on the device: weights (+ runtime) and KV headroom.
    The engine sizes itself by it (vLLM: its gpu_memory_utilization share)."""
    return memory + kv_headroom


def need_bytes(memory: int, kv_headroom: int, overhead: float = OVERHEAD_FRACTION) -> int:
    """Memory one replica takes in all: its grant plus overhead. The scheduler places by it; an
    engine sizes itself by it when no placement granted bytes."""
    return round(grant_bytes(memory, kv_headroom) * (1.0 + overhead))


def read_header(path: Path) -> dict[str, dict[str, object]]:
    """The JSON header of one safetensors file (tensor name → dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, dict[str, object]] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def parameter_counts(source: Path) -> dict[str, int]:
    """Elements per stored dtype over every ``*.safetensors`` file under ``source``."""
    counts: dict[str, int] = {}
    for file in sorted(source.glob("*.safetensors")):
        for info in read_header(file).values():
            numel = 1
            for dim in info["shape"]:  # type: ignore[attr-defined]
                numel *= int(dim)
            dtype = str(info["dtype"])
            counts[dtype] = counts.get(dtype, 0) + numel
    return counts


def predict_weight_bytes(source: Path, dtype: str | None = None) -> int:
    """Bytes the weights take once loaded: as stored, or converted to ``dtype`` (torch name)."""
    counts = parameter_counts(source)
    if dtype in TORCH_DTYPE_BYTES:
        floats = sum(n for d, n in counts.items() if d.startswith(("F", "BF")))
        others = sum(n * DTYPE_BYTES[d] for d, n in counts.items() if not d.startswith(("F", "BF")))
        return floats * TORCH_DTYPE_BYTES[dtype] + others
    return sum(n * DTYPE_BYTES.get(d, 4) for d, n in counts.items())
