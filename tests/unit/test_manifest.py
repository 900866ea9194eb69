"""Registry manifests (artifacts/manifest.py): the revision names the content exactly, and a
manifest that could write outside its directory or lie about a file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshserve.artifacts.manifest import File, Manifest, build, parse
from meshserve.artifacts.s3 import Location

SHA = "ab" * 32


def doc(*files: dict[str, object]) -> bytes:
    return json.dumps({"format": 1, "files": list(files)}).encode()


def test_registry_revision_is_the_content_whatever_the_order() -> None:
    a, b = File("a.json", 1, SHA), File("w/b.safetensors", 9, "cd" * 32)
    one, two = Manifest((a, b)), Manifest((b, a))
    assert one.revision == two.revision == parse(one.to_bytes()).revision
    assert Manifest((a, File("w/b.safetensors", 9, "ce" * 32))).revision != one.revision
    assert one.weights_bytes() == 9 and one.total_bytes == 10


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "not JSON"),
        (json.dumps({"format": 2, "files": []}).encode(), "format 1"),
        (doc({"path": "../../etc/passwd", "size": 1, "sha256": SHA}), "unsafe"),
        (doc({"path": "/abs", "size": 1, "sha256": SHA}), "unsafe"),
        (doc({"path": "a//b", "size": 1, "sha256": SHA}), "unsafe"),
        (doc({"path": "a", "size": -1, "sha256": SHA}), "bad size"),
        (doc({"path": "a", "size": 1, "sha256": "XYZ"}), "bad size or sha256"),
        (doc({"path": "a", "size": 1}), "bad file entry"),
        (doc(), "no files"),
        (doc(*[{"path": "a", "size": 1, "sha256": SHA}] * 2), "twice"),
    ],
)
def test_registry_manifest_that_lies_or_escapes_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse(data)


def test_registry_build_lists_files_but_not_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(b"12")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    m = build(tmp_path)
    assert sorted(f.path for f in m.files) == ["config.json", "sub/x.bin"]
    assert m.weights_bytes() == 2


@pytest.mark.parametrize(
    ("source", "endpoint", "why"),
    [
        ("/models/a", "", "s3://bucket/prefix URL expected"),
        ("s3:///a", "", "no bucket"),
        ("s3://b/a/../c", "", "bad prefix"),
        ("s3://b/a", "minio:9000", "http"),
    ],
)
def test_registry_locations_are_checked(source: str, endpoint: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Location.parse(source, endpoint)
    assert Location.parse("s3://models/a/b/", "http://m:9000").key("x") == "a/b/x"
