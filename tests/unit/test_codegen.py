"""Generated stubs are not stale, and the protos lint clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", ["v1", "kserve"])
def test_stubs_match_protos(tmp_path: Path, package: str) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path / "v1")],
        check=True,
    )
    fresh, committed = tmp_path / package, ROOT / "services" / package
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file())
    stale = [n for n in names if (fresh / n).read_bytes() != (committed / n).read_bytes()]
    assert not stale, f"stale generated files {stale}: run python scripts/gen_protos.py"


def test_buf_lint() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf-bin not installed (pip install -e '.[dev]')")
    result = subprocess.run([buf, "lint", "protos"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
