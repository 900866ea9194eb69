"""`meshserve model apply` YAML → ModelSpec, with errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshserve.modelspec import spec_from_dict
from meshserve.sizes import parse_bytes
from meshserve.v1 import cluster_pb2, common_pb2


def test_full_spec(tmp_path: Path) -> None:
    s = spec_from_dict(
        {
            "name": "m",
            "source": "weights",
            "memory": "2GiB",
            "kv_headroom": "512MiB",
            "priority": "high",
            "aliases": ["mm"],
            "min_replicas": 1,
            "max_replicas": 3,
        },
        base=tmp_path,
    )
    assert s.source == str(tmp_path / "weights")
    assert (s.memory_bytes, s.kv_headroom_bytes) == (2 * 2**30, 512 * 2**20)
    assert s.priority == common_pb2.PRIORITY_HIGH
    assert s.engine == cluster_pb2.ENGINE_KIND_TORCH


def test_memory_estimated_from_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert spec_from_dict({"name": "m", "source": str(tmp_path)}).memory_bytes == 1000


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"source": "/x", "memory": "1GB"}, "required"),
        ({"name": "a/b", "source": "/x", "memory": "1GB"}, "invalid model name"),
        ({"name": "m", "source": "/x", "memory": "1GB", "engine": "onnx"}, "engine"),
        ({"name": "m", "source": "/x", "memory": "1GB", "priority": "urgent"}, "priority"),
        ({"name": "m", "source": "/x", "memory": "lots"}, "not a size"),
        ({"name": "m", "source": "/nonexistent"}, "memory"),
        ({"name": "m", "source": "/x", "memory": "1GB", "colour": "red"}, "unknown field"),
        (
            {"name": "m", "source": "/x", "memory": "1GB", "min_replicas": 3, "max_replicas": 1},
            "max_replicas",
        ),
        ({"name": "m", "source": "/x", "memory": "1GB", "routing": {"cache": 1}}, "scorer 'cache'"),
        ({"name": "m", "source": "/x", "memory": "1GB", "routing": {"load": -1}}, "routing.load"),
        ({"name": "m", "source": "/x", "memory": "1GB", "routing": {"kv": "x"}}, "routing.kv"),
        ({"name": "m", "source": "/x", "memory": "1GB", "routing": [1]}, "routing: a mapping"),
    ],
)
def test_errors_name_the_field(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_dict(doc)


def test_routing_weights_reach_the_spec() -> None:
    doc = {"name": "m", "source": "/x", "memory": "1GB", "routing": {"load": 1, "affinity": 0}}
    assert dict(spec_from_dict(doc).routing_weights) == {"load": 1.0, "affinity": 0.0}


@pytest.mark.parametrize(
    ("text", "value"),
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("100", 100)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_registry_sources_keep_their_url_and_need_memory_and_a_well_formed_revision() -> None:
    base = {"name": "r", "source": "s3://models/r", "endpoint": "http://minio:9000"}
    spec = spec_from_dict({**base, "memory": "1GiB", "revision": "ab" * 32, "region": "eu-1"})
    assert (spec.source, spec.source_endpoint, spec.source_region) == (
        "s3://models/r", "http://minio:9000", "eu-1",
    )  # fmt: skip
    assert spec.revision == "ab" * 32
    with pytest.raises(ValueError, match="memory"):
        spec_from_dict(base)  # `model apply` fills it in from the manifest
    with pytest.raises(ValueError, match="64 hex"):
        spec_from_dict({**base, "memory": "1GiB", "revision": "latest"})
    with pytest.raises(ValueError, match="registry"):
        spec_from_dict({"name": "l", "source": "/models/l", "memory": "1GiB", "revision": "x"})
