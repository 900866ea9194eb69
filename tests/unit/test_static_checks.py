"""ruff (lint + format) and mypy --strict are part of the suite, so CI keeps main clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN))
    if found is None:
        pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize(
    "args", [["check", "services", "tests", "scripts", "bench"], ["format", "--check", "."]]
)
def test_ruff(args: list[str]) -> None:
    result = subprocess.run([tool("ruff"), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts() -> None:
    """The architecture in pyproject's [tool.importlinter]: services independent, layers
    downward, no cycles."""
    result = subprocess.run([tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


MAX_MODULE_LINES = 400  # STYLE: a module past this is usually two concepts


def test_no_hand_written_module_is_a_hub() -> None:
    services = ROOT / "services"
    too_long = {
        str(p.relative_to(ROOT)): n
        for p in services.rglob("*.py")
        if p.relative_to(services).parts[0] not in ("v1", "kserve")  # generated
        and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"split these along their concepts: {too_long}"
