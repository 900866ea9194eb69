"""Memory prediction from safetensors headers, before any weights are read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from meshserve.weights import parameter_counts, predict_weight_bytes

SIZES = {"F32": 4, "BF16": 2, "I8": 1}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid file whose data are zeros: the header is what the predictor reads."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_counts_and_bytes_across_shards_and_dtypes(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F32", [10, 20])})
    write_safetensors(
        tmp_path / "model-00002-of-00002.safetensors",
        {"b": ("BF16", [100]), "q": ("I8", [64, 2])},
    )
    (tmp_path / "notes.txt").write_text("not a shard")
    assert parameter_counts(tmp_path) == {"F32": 200, "BF16": 100, "I8": 128}
    assert predict_weight_bytes(tmp_path) == 200 * 4 + 100 * 2 + 128
    # Loading in another dtype converts floating tensors only; quantized ints keep their size.
    assert predict_weight_bytes(tmp_path, "bfloat16") == 300 * 2 + 128
    assert predict_weight_bytes(tmp_path, "float32") == 300 * 4 + 128


def test_an_empty_directory_predicts_zero(tmp_path: Path) -> None:
    assert predict_weight_bytes(tmp_path) == 0
