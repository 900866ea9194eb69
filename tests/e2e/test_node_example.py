"""The Node.js examples (examples/node, @grpc/grpc-js) against a live mesh: generate.js streams
Generate and reports a meshserve error as its gRPC status; kserve.js speaks KServe v2. Skipped
where node or npm is absent, or where npm cannot reach a registry to install @grpc/grpc-js."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import demo_mesh

pytestmark = pytest.mark.e2e
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed here")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        got = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if got.returncode != 0:
            pytest.skip(f"npm could not install @grpc/grpc-js here: {got.stderr.strip()[-300:]}")
    return EXAMPLE


def test_the_node_example_streams_and_reports_errors(
    node_example: Path, tmp_path: Path, demo_model: Path
) -> None:
    with demo_mesh(tmp_path, demo_model) as mesh:
        router = mesh.services["router"].address
        ok = run_node(node_example, router, "demo")
        assert ok.returncode == 0, ok.stderr
        *_text, last = ok.stdout.strip().splitlines()
        assert '"tokens":8' in last and '"finish_reason":"FINISH_REASON_LENGTH"' in last, last
        missing = run_node(node_example, router, "no-such-model")
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr and "not registered" in missing.stderr
        # The KServe v2 example: liveness, the repository, a decoupled stream.
        kserve = run_node(node_example, router, "demo", "kserve.js")
        assert kserve.returncode == 0, kserve.stderr
        seen = json.loads(kserve.stdout.strip().splitlines()[-1])
        assert seen["live"] and ["demo", "READY"] in seen["index"] and seen["responses"] >= 2
        gone = run_node(node_example, router, "no-such-model", "kserve.js")
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


def run_node(
    example: Path, router: str, model: str, script: str = "generate.js"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", script, router, model, "Once upon a time"],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=60,
        # Greedy: the random-weight demo model can sample its end-of-text token early.
        env={**os.environ, "MESHSERVE_MAX_TOKENS": "8", "MESHSERVE_TEMPERATURE": "0"},
    )
