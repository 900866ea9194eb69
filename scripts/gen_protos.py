"""Regenerate services/v1 (package meshserve.v1) from protos/meshserve/v1, and services/kserve
(meshserve.kserve: the KServe v2 protocol, proto package `inference`) from protos/meshserve/kserve.

Usage: python scripts/gen_protos.py [--out DIR]   (DIR defaults to services/v1; kserve beside it)
tests/unit/test_codegen.py runs this into a temporary folder and fails when the committed stubs
differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path, package: str = "v1") -> None:
    sources = sorted(
        str(p.relative_to(PROTOS)) for p in (PROTOS / "meshserve" / package).glob("*.proto")
    )
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    grpc_plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*_pb2*"):
            old.unlink()
        for f in sorted((Path(tmp) / "meshserve" / package).iterdir()):
            shutil.copy(f, out / f.name)
    (out / "__init__.py").write_text(
        f'"""Generated from protos/meshserve/{package} by scripts/gen_protos.py."""\n'
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "services" / "v1")
    out = parser.parse_args().out
    generate(out)
    generate(out.parent / "kserve", "kserve")
