"""The GPU check script (bench/gpu_check.py) stays working where there is no GPU: with
--allow-cpu its device checks run on the CPU, the GPU-only ones skip, and the mesh check puts a
real mesh of processes through a placement, a stream and a published decode rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_check_on_the_cpu_and_prints_one_table(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on CI, even on a GPU machine
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    outcomes = {r["check"]: (r["outcome"], r["figure"] or r["note"]) for r in doc["rows"]}
    assert {k for k, (o, _) in outcomes.items() if o == "pass"} == {
        "torch tiers",
        "decode rate",
        "mesh",
    }, outcomes
    # The swap goal (restore vs a GPU's pinned host→device copy) means nothing on the CPU: it
    # runs and reports its figure, but never as a pass.
    swap = next(r for r in doc["rows"] if r["check"] == "swap")
    assert swap["outcome"] == "n/a" and "restore" in swap["figure"], swap
    for gpu_only in ("nvml", "binding", "vllm 2 models", "vllm gang"):
        assert outcomes[gpu_only] == ("skip", "no CUDA GPU"), outcomes
    assert "meter capacity" in outcomes["decode rate"][1]
    assert "tok/s published" in outcomes["mesh"][1]
    assert "meshserve GPU check on the CPU" in run.stdout
