"""guidellm, the vLLM project's load generator, runs unmodified against the router's OpenAI
front: it checks GET /health, takes the first model /v1/models lists, streams chat completions
with vLLM's extensions (ignore_eos, continuous usage) — and every request succeeds with the
tokens it asked for. guidellm runs from its own environment (scripts/guidellm-env.sh)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshserve.localmesh import Mesh

from tests.e2e.conftest import demo_mesh

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
GUIDELLM = ROOT / ".venv-guidellm" / "bin" / "guidellm"
REQUESTS, OUTPUT_TOKENS = 24, 16


@pytest.fixture(scope="module")
def guidellm() -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "guidellm-env.sh")], check=True, timeout=900)
    return GUIDELLM


@pytest.fixture(scope="module")
def http_mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("guidellm")
    with demo_mesh(root, demo_model, router_flags=["--http-listen", "127.0.0.1:0"]) as m:
        yield m


def test_guidellm_runs_unmodified_and_every_request_succeeds(
    guidellm: Path, http_mesh: Mesh, demo_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "benchmarks.json"
    run = subprocess.run(
        [
            str(guidellm), "run",
            "--backend", f"kind=openai_http,target=http://{http_mesh.services['router'].info['http']}",
            "--profile", "kind=concurrent,streams=4",
            "--constraint", f"kind=max_requests,count={REQUESTS}",
            "--data", f"kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
            "--tokenizer", f"kind=huggingface_auto,model={demo_model}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (bench,) = json.loads(out.read_text())["benchmarks"]
    made = bench["scheduler_metrics"]["requests_made"]
    errors = [r["info"].get("error") for r in bench["requests"].get("errored", [])][:3]
    assert made["errored"] == 0 and made["successful"] == REQUESTS, (made, errors)
    tokens = bench["metrics"]["output_token_count"]["successful"]
    assert tokens["min"] == tokens["max"] == OUTPUT_TOKENS  # ignore_eos honoured, counted right
