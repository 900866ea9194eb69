"""A model's files as content (pure but for reading a directory): the manifest that pins them.

``meshserve-manifest.json`` at a registry prefix lists every file of the model — its path under
the prefix, its size and its sha256 — in a canonical JSON form (sorted, no spaces), so the
manifest's own sha256 names the content exactly: that digest is the model's ``revision``. The
files of a revision never change; a changed file is a new revision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST = "meshserve-manifest.json"
FORMAT = 1
CHUNK = 8 << 20  # read this much at a time when hashing


@dataclass(frozen=True)
class File:
    path: str  # relative, "/"-separated, no ".." (checked)
    size: int
    sha256: str  # 64 lowercase hex digits


@dataclass(frozen=True)
class Manifest:
    files: tuple[File, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256}
                for f in sorted(self.files, key=lambda f: f.path)
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def revision(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def weights_bytes(self) -> int:
        """Bytes of the weights (safetensors, else any .bin): the spec's memory estimate."""
        st = [f.size for f in self.files if f.path.endswith(".safetensors")]
        return sum(st) if st else sum(f.size for f in self.files if f.path.endswith(".bin"))


def is_sha256(text: str) -> bool:
    """64 lowercase hex digits: a file's sha256, or a revision."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def check_path(path: str) -> str:
    """A manifest path must stay under its directory: relative, no "..", no empty parts."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"manifest: unsafe file path {path!r}")
    return path


def parse(data: bytes) -> Manifest:
    """Raises ValueError saying what is wrong with the manifest."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"manifest: format {FORMAT} expected")
    files = []
    for f in doc.get("files", []):
        try:
            path, size, digest = str(f["path"]), int(f["size"]), str(f["sha256"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"manifest: bad file entry {f!r}") from None
        if size < 0 or not is_sha256(digest):
            raise ValueError(f"manifest: bad size or sha256 for {path!r}")
        files.append(File(check_path(path), size, digest))
    if not files:
        raise ValueError("manifest: no files")
    if len({f.path for f in files}) != len(files):
        raise ValueError("manifest: a path is listed twice")
    return Manifest(tuple(files))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build(directory: Path) -> Manifest:
    """The manifest of every regular file under ``directory`` (recursively; hidden files and
    an existing manifest left out)."""
    files = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or rel == MANIFEST or any(s.startswith(".") for s in rel.split("/")):
            continue
        files.append(File(rel, p.stat().st_size, sha256_file(p)))
    if not files:
        raise ValueError(f"{directory}: no files to push")
    return Manifest(tuple(files))
