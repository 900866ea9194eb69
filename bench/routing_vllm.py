"""Routing policies on a real mesh over the vLLM CPU engine (issue 24's "also once on vLLM"):
two agents, each a vLLM replica of the same tiny model (prefix caching on, block 128 on CPU),
and one router per policy in front of both: ``least_load`` (``--routing-weights
affinity=4,kv=2,load=1``, meshserve before issue 24) and ``meshserve`` (the default profile: the
TTFT predictor over the prefix index fed by vLLM's own KV events).

    python -m bench.routing_vllm [--requests 48] [--rate 2] [--json PATH]

Each policy gets its own shared-prefix load (8 groups, a ~1,300-token system prompt each, a
short question, 16 output tokens; Poisson arrivals at ``--rate``/s), with prefixes of its own so
neither inherits the other's cache. Per policy: TTFT p50/p90/p99 (streamed gRPC through the router),
errors, and the router's hit rate (its cached / prompt token counters). Two cores shared by two
engine cores, two agents and a router: compare within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.demo_model import build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.vllm_peer import VLLM_PYTHON, free_port

MODEL = "tinyvllm"
POLICIES = {"least_load": "affinity=4,kv=2,load=1", "meshserve": ""}
WORDS = ["mesh", "router", "replica", "prefix", "cache", "token", "block", "engine", "agent"]


def groups(seed: int, n: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(400)) for _ in range(n)]


async def one(address: str, prompt: str) -> tuple[float, bool]:
    req = inference_pb2.GenerateRequest(model=MODEL, prompt=prompt)
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = 16, 0.0, True
    t0 = time.perf_counter()
    first = math.nan
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            async for _msg in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=120):
                if math.isnan(first):
                    first = time.perf_counter() - t0
        return first, True
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return first, False


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(ln.split()[-1]) for ln in lines if ln.startswith(name) and MODEL in ln)


async def load(
    address: str, prompts: list[str], rate: float, seed: int
) -> list[tuple[float, bool]]:
    rng = random.Random(seed)
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(address, p)))
        await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.nan


def run(requests: int, rate: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_demo_model(tmp / "model", hidden=256, layers=4, intermediate=512)
        mesh = Mesh(tmp / "mesh", lease_ttl_s=3)
        try:
            mesh.start_etcd()
            mesh.start_scheduler()
            for i in range(2):
                mesh.start_agent(f"vllm-{i}", python=str(VLLM_PYTHON), timeout_s=300)
            routers = {}
            for name, weights in POLICIES.items():
                port = free_port()
                extra = ["--metrics-port", str(port)]
                extra += ["--routing-weights", weights] if weights else []
                routers[name] = (mesh.start_router(f"router-{name}", extra=extra), port)
            spec = spec_from_dict(
                {"name": MODEL, "source": str(model_dir), "engine": "vllm", "min_replicas": 2,
                 "max_model_len": 2048, "kv_headroom": "1GiB"}
            )  # fmt: skip
            asyncio.run(_apply(mesh, spec))
            asyncio.run(_until_two_ready(routers["meshserve"][0].address))
            for seed, (name, (router, port)) in enumerate(routers.items(), start=1):
                rng = random.Random(seed)
                texts = groups(seed * 100)
                prompts = [f"{rng.choice(texts)} question {i}?" for i in range(requests)]
                for w in range(2):  # the router's tokenizer loads (requests meanwhile go by load)
                    asyncio.run(one(router.address, f"warm-up {w} " * 50))
                before = metric(port, "meshserve_router_cached_prompt_tokens_total")
                prompt_before = metric(port, "meshserve_router_prompt_tokens_total")
                got = asyncio.run(load(router.address, prompts, rate, seed))
                cached = metric(port, "meshserve_router_cached_prompt_tokens_total") - before
                total = metric(port, "meshserve_router_prompt_tokens_total") - prompt_before
                ttfts = [t for t, ok in got if ok]
                rows.append({
                    "policy": name, "requests": len(got), "errors": sum(not ok for _t, ok in got),
                    "ttft_p50_ms": round(pct(ttfts, 0.5) * 1000, 1),
                    "ttft_p90_ms": round(pct(ttfts, 0.9) * 1000, 1),
                    "ttft_p99_ms": round(pct(ttfts, 0.99) * 1000, 1),
                    "hit_rate": round(cached / total, 3) if total else 0.0,
                })  # fmt: skip
                print(rows[-1], flush=True)
        finally:
            mesh.stop(timeout_s=30)
    return rows


async def _apply(mesh: Mesh, spec: Any) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).put(Keyspace().model(MODEL), spec)
    finally:
        await client.close()


async def _until_two_ready(address: str) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(address) as ch:
            listing = await inference_pb2_grpc.InferenceStub(ch).ListModels(
                inference_pb2.ListModelsRequest(), timeout=5
            )
        if sum(m.ready_replicas for m in listing.models if m.name == MODEL) >= 2:
            return
        await asyncio.sleep(1)
    raise TimeoutError("two vLLM replicas were not READY in 600 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=Path("bench-routing-vllm.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run(args.requests, args.rate)
    cols = ("policy", "requests", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "hit_rate")
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>12}" for c in cols))
    args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
