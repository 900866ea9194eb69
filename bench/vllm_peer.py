"""meshserve's OpenAI front over the vLLM CPU engine, side by side with vLLM's own OpenAI server
on the same box and the same model, both loaded by guidellm (the vLLM project's load generator,
from its own environment: scripts/guidellm-env.sh) with streamed chat requests of 64 output
tokens at concurrency 1, 8 and 32.

    python bench/vllm_peer.py [--requests 48] [--json PATH]     (bench/frontends.py --vllm too)

One after the other, so that each has the machine: vLLM's server alone (`vllm serve` from
.venv-vllm, the engine arguments the agent gives vLLM on CPU: eager, 1 GiB KV cache), then a
one-agent mesh whose agent runs the same model through vLLM, behind the router's HTTP front.
Per server and concurrency: output tokens/s, TTFT p50/p99 (guidellm's own figures), errors;
then meshserve's ratios to vLLM's. Goal (issue 23): tokens/s >= 0.9x at every concurrency and
TTFT p99 <= 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.demo_model import build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.common import one_agent_mesh

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MESHSERVE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
GUIDELLM = ROOT / ".venv-guidellm" / "bin" / "guidellm"
MODEL = "tinyvllm"
CONCURRENCY = (1, 8, 32)
OUTPUT_TOKENS = 64
KV_GIB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {timeout_s:.0f} s")


def guidellm(
    target: str, model_dir: Path, streams: int, requests: int, out: Path
) -> dict[str, Any]:
    """One guidellm run (concurrent streams, a fixed number of requests): its figures."""
    run = subprocess.run(
        [
            str(GUIDELLM), "run",
            "--backend", f"kind=openai_http,target={target}",
            "--profile", f"kind=concurrent,streams={streams}",
            "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
            "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
            "--output", f"kind=json,path={out}",
            "--disable-console",
        ],
        capture_output=True, text=True, timeout=900, cwd=out.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"guidellm failed: {run.stdout[-2000:]}{run.stderr[-2000:]}")
    (bench,) = json.loads(out.read_text())["benchmarks"]
    metrics = bench["metrics"]
    made = bench["scheduler_metrics"]["requests_made"]
    ttft = metrics["time_to_first_token_ms"]["successful"]
    return {
        "concurrency": streams,
        "requests": made["successful"],
        "errors": made["errored"],
        "tokens_per_s": round(metrics["output_tokens_per_second"]["successful"]["mean"], 1),
        "ttft_p50_ms": round(ttft["median"], 1),
        "ttft_p99_ms": round(ttft["percentiles"]["p99"], 1),
    }


def measure(
    server: str, target: str, model_dir: Path, requests: int, tmp: Path
) -> list[dict[str, Any]]:
    rows = []
    for c in CONCURRENCY:
        out = tmp / f"{server}-{c}.json"
        got = guidellm(target, model_dir, c, max(requests, 2 * c), out)
        rows.append({"server": server, **got})
    return rows


def vllm_alone(model_dir: Path, requests: int, tmp: Path) -> list[dict[str, Any]]:
    port = free_port()
    cmd = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--enforce-eager",
    ]  # fmt: skip
    log = (tmp / "vllm-server.log").open("wb")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_GIB), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
        return measure("vLLM server", f"http://127.0.0.1:{port}", model_dir, requests, tmp)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def put_model(mesh: Mesh, model_dir: Path) -> None:
    spec = spec_from_dict(
        {"name": MODEL, "source": str(model_dir), "engine": "vllm", "min_replicas": 1,
         "max_model_len": 2048, "kv_headroom": f"{KV_GIB}GiB"}
    )  # fmt: skip
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).put(Keyspace().model(MODEL), spec)
    finally:
        await client.close()


def meshserve_front(model_dir: Path, requests: int, tmp: Path) -> list[dict[str, Any]]:
    http = ["--http-listen", "127.0.0.1:0"]
    with one_agent_mesh(
        tmp / "mesh", router_extra=http, agent_python=str(VLLM_PYTHON), agent_timeout_s=300
    ) as (mesh, _agent, router):
        asyncio.run(put_model(mesh, model_dir))
        base = f"http://{router.info['http']}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # READY: /v1/models lists it and a request streams
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
                    if MODEL in r.read().decode():
                        break
            except OSError:
                pass
            time.sleep(1)
        guidellm(base, model_dir, 1, 2, tmp / "warm.json")  # waits out the replica's load
        return measure("meshserve (router → agent → vLLM)", base, model_dir, requests, tmp)


def run(requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_demo_model(tmp / "model", hidden=256, layers=4, intermediate=512)
        rows = vllm_alone(model_dir, requests, tmp) + meshserve_front(model_dir, requests, tmp)
    peer = {r["concurrency"]: r for r in rows if r["server"] == "vLLM server"}
    ratios = []
    for r in rows:
        if r["server"] != "vLLM server":
            v = peer[r["concurrency"]]
            ratios.append(
                {
                    "concurrency": r["concurrency"],
                    "tokens_per_s_ratio": round(r["tokens_per_s"] / v["tokens_per_s"], 3),
                    "ttft_p99_ratio": round(r["ttft_p99_ms"] / v["ttft_p99_ms"], 2),
                }
            )
    return {"rows": rows, "ratios": ratios}


def print_tables(result: dict[str, Any]) -> None:
    table = Table(title=f"OpenAI front over vLLM (CPU) vs vLLM's own server, {OUTPUT_TOKENS} tok")
    for col in ("server", "c", "requests", "errors", "tokens/s", "TTFT p50 ms", "TTFT p99 ms"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(
            r["server"], str(r["concurrency"]), str(r["requests"]), str(r["errors"]),
            str(r["tokens_per_s"]), str(r["ttft_p50_ms"]), str(r["ttft_p99_ms"]),
        )  # fmt: skip
    ratios = Table(title="meshserve / vLLM (goal: tokens/s >= 0.9, TTFT p99 <= 1.5)")
    for col in ("c", "tokens/s ratio", "TTFT p99 ratio"):
        ratios.add_column(col)
    for r in result["ratios"]:
        ratios.add_row(
            str(r["concurrency"]), str(r["tokens_per_s_ratio"]), str(r["ttft_p99_ratio"])
        )
    console = Console(width=120)
    console.print(table)
    console.print(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48, help="per server and concurrency")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for needed in (VLLM_PYTHON, GUIDELLM):
        if not needed.exists():
            sys.exit(
                f"{needed} is missing: bash scripts/vllm-env.sh && bash scripts/guidellm-env.sh"
            )
    result = run(args.requests)
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if any(r["errors"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
