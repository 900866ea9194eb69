"""Router and scheduler never import torch or transformers (they install without the extra), and
nothing imports the HTTP front's packages unless it is switched on (the `http` extra)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import sys
for name in ("torch", "transformers", "vllm", "fastapi", "uvicorn", "starlette"):
    sys.modules[name] = None  # any import of these now raises ImportError
import meshserve.router.main, meshserve.scheduler.main, meshserve.cli
import meshserve.nodeagent.main
from meshserve.nodeagent.engines import preload_engines
assert preload_engines() == [], "engines must degrade to none without torch"
print("ok")
"""


@pytest.mark.parametrize("program", [PROGRAM])
def test_router_scheduler_and_agent_import_without_torch(program: str) -> None:
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
