"""Twenty fine-tunes of one base: as LoRA adapters on two base replicas vs as twenty full models,
side by side in one run.

    python -m bench.adapters [--quick] [--slots 8] [--requests 200] [--json PATH]
                             [--adapter-routing ttft=8,affinity=4,kv=2,load=1,adapter=4]

- A real mesh (etcd, a scheduler, two agents with the torch engine, a router) serves a random
  Llama-shaped base (hidden 512, 8 layers, float32: ≈ 110 MB) with ``max_adapters`` slots per
  replica, and twenty rank-8 LoRA adapters of it (q, k, v, o projections) made here with peft.
- TTFT (first streamed token through the router) at a fixed concurrency: the base alone, then
  the adapters with Zipf(1.1) popularity (a few hot, a long tail: swaps happen), then uniform
  popularity (the worst case: most requests find their adapter evicted); adapter loads and
  evictions counted from the agents' metrics.
- Memory: the two base replicas as the agents measured them (weights and adapter slots), vs
  twenty full models (each fine-tune merged into its own copy of the weights: one such model
  loaded in the same mesh, measured, times twenty).
- GPUs in the scheduler's own placement (snapshot.with_adapters + placement.place) for the same
  shape at Llama-3-8B scale (16 GiB of bf16 weights, 8 GiB KV headroom, rank-16 adapters of
  27 MB) on H100-80GB nodes: twenty full models vs one base with two replicas.

``--adapter-routing``: the adapters' own scorer weights (their spec's ``routing:``), to compare
with the router's default (the adapter scorer at weight 1: router/routing/pipeline.py).

Goals (issue 25): adapters use ≤ 15 % of the memory of full models, at TTFT p99 ≤ 1.5x the base
model's. `--quick`: a 4-layer base of hidden 256, 60 requests per row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from meshserve.demo_model import build_demo_adapter, build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.scheduler.placement import place
from meshserve.scheduler.snapshot import build_snapshot, with_adapters
from meshserve.v1 import cluster_pb2, inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

from tests.e2e.conftest import apply, free_port, ready_replicas, replica_records
from tests.waiting import eventually

ADAPTERS = 20
GIB = 2**30


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


async def ttft(router: str, model: str, tokens: int = 8) -> float:
    req = inference_pb2.GenerateRequest(model=model, prompt="Once upon a time")
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = tokens, 0.0, True
    async with grpc.aio.insecure_channel(router) as ch:
        started = time.perf_counter()
        call = inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=120)
        first = 0.0
        async for _msg in call:
            first = first or time.perf_counter() - started
    return first


async def run_load(
    router: str, names: list[str], weights: list[float], n: int, concurrency: int, seed: int
) -> list[float]:
    """``n`` requests, ``concurrency`` at a time, each for a model drawn by ``weights``."""
    rng = random.Random(seed)
    picks = rng.choices(names, weights, k=n)
    out: list[float] = []
    queue = list(picks)

    async def worker() -> None:
        while queue:
            out.append(await ttft(router, queue.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def counter(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def gpus_at_scale() -> dict[str, int]:
    """GPUs the scheduler's placement uses for 20 full 8B models vs a base of 2 replicas with
    20 adapters, on nodes of 8 H100-80GB."""
    nodes = [
        cluster_pb2.NodeStatus(
            node_id=f"n{i}",
            capacity_bytes=8 * 80 * GIB,
            gpus=[
                cluster_pb2.GpuDevice(
                    uuid=f"n{i}-g{g}", name="H100-80GB", memory_total_bytes=80 * GIB
                )
                for g in range(8)
            ],
        )
        for i in range(4)
    ]
    full = [
        cluster_pb2.ModelSpec(
            name=f"ft-{i}", memory_bytes=16 * GIB, kv_headroom_bytes=8 * GIB, min_replicas=1
        )
        for i in range(ADAPTERS)
    ]
    base = cluster_pb2.ModelSpec(name="base", memory_bytes=16 * GIB, kv_headroom_bytes=8 * GIB,
                                 min_replicas=2, max_adapters=8)  # fmt: skip
    adapters = [
        cluster_pb2.ModelSpec(name=f"lora-{i}", base="base", memory_bytes=27 * 10**6)
        for i in range(ADAPTERS)
    ]
    out = {}
    for label, specs in (("full models", full), ("adapters", [base, *adapters])):
        placed, _load = with_adapters(specs, {})
        plan = place(build_snapshot(placed, nodes, [], [], {}, {}))
        out[label] = len({d for devices in plan.devices.values() for d in devices})
    return out


async def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    base_dir = build_demo_model(root / "base", hidden=args.hidden, layers=args.layers,
                                intermediate=args.hidden * 3)  # fmt: skip
    names = [f"ft-{i:02d}" for i in range(ADAPTERS)]
    dirs = {n: build_demo_adapter(base_dir, root / n, seed=i + 1) for i, n in enumerate(names)}
    adapter_bytes = max((d / "adapter_model.safetensors").stat().st_size for d in dirs.values())
    # One fine-tune merged into a full model of its own (what serving it as a model means).
    merged = root / "merged"
    if not (merged / "model.safetensors").exists():
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        full = PeftModel.from_pretrained(m, str(dirs[names[0]])).merge_and_unload()
        full.save_pretrained(merged, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged)
    ports = [free_port(), free_port()]
    mesh = Mesh(root / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        for i, port in enumerate(ports):
            mesh.start_agent(f"agent-{i}", threads=1, extra=["--metrics-port", str(port)])
        router = mesh.start_router().address
        common = {"max_model_len": 2048, "kv_headroom": "16MiB"}
        base = {"name": "base", "source": str(base_dir), "min_replicas": 2, **common}
        # Slots sized for these adapters (rank 8 on q, k, v, o), as an operator would set them.
        slots = {"max_adapters": args.slots, "max_adapter_rank": 8}
        modules = {"adapter_modules": "q_proj,k_proj,v_proj,o_proj"}
        await apply(mesh, spec_from_dict({**base, **slots, "engine_args": modules}))
        for n, d in dirs.items():
            adapter: dict[str, Any] = {
                "name": n,
                "kind": "adapter",
                "base": "base",
                "source": str(d),
            }
            if args.adapter_routing:
                adapter["routing"] = {
                    k: float(v)
                    for k, v in (kv.split("=") for kv in args.adapter_routing.split(","))
                }
            await apply(mesh, spec_from_dict(adapter))
        full = {"name": "merged", "source": str(merged), "min_replicas": 1, **common}
        await apply(mesh, spec_from_dict(full))

        async def ready() -> bool:
            return await ready_replicas(router, "base") == 2 and bool(
                await ready_replicas(router, "merged")
            )

        await eventually(ready, 300, "base x2 and the merged model READY")
        memory = {r.model: int(r.memory_bytes) for r in await replica_records(mesh)}
        rows: dict[str, list[float]] = {}
        for _ in range(4):  # warm both paths before measuring
            await ttft(router, "base")
        rows["base model alone"] = await run_load(
            router, ["base"], [1.0], args.requests, args.concurrency, 1
        )
        loads0 = sum(counter(p, "meshserve_adapter_loads_total") for p in ports)
        rows["adapters, Zipf(1.1)"] = await run_load(
            router, names, zipf_weights(ADAPTERS), args.requests, args.concurrency, 2
        )
        loads1 = sum(counter(p, "meshserve_adapter_loads_total") for p in ports)
        rows["adapters, uniform"] = await run_load(
            router, names, [1.0] * ADAPTERS, args.requests, args.concurrency, 3
        )
        loads2 = sum(counter(p, "meshserve_adapter_loads_total") for p in ports)
        evictions = sum(counter(p, "meshserve_adapter_evictions_total") for p in ports)
        load_s = sum(counter(p, "meshserve_adapter_load_seconds_sum") for p in ports)
        load_n = sum(counter(p, "meshserve_adapter_load_seconds_count") for p in ports)
    finally:
        mesh.stop()
    adapters_mem = 2 * memory["base"]  # as measured: weights and the adapter slots
    full_mem = ADAPTERS * memory["merged"]
    base_p99 = pct(rows["base model alone"], 99)
    return {
        "base_bytes": memory["base"],
        "slots_bytes": memory["base"] - memory["merged"],
        "full_model_bytes": memory["merged"],
        "adapter_bytes": adapter_bytes,
        "slots_per_replica": args.slots,
        "memory_adapters_bytes": adapters_mem,
        "memory_full_models_bytes": full_mem,
        "memory_share": adapters_mem / full_mem,
        "ttft": {
            k: {
                "p50_s": pct(v, 50),
                "p99_s": pct(v, 99),
                "vs_base_p99": pct(v, 99) / base_p99,
                "requests": len(v),
            }
            for k, v in rows.items()
        },
        "adapter_loads": {"zipf": loads1 - loads0, "uniform": loads2 - loads1},
        "adapter_evictions": evictions,
        "adapter_load_mean_s": load_s / load_n if load_n else None,  # fetch + check + fill
        "gpus_at_8b_scale": gpus_at_scale(),
        "concurrency": args.concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="max_adapters per replica")
    parser.add_argument("--requests", type=int, default=200, help="per row")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--adapter-routing", default="", help="scorer weights of the adapters: ttft=8,adapter=1,..."
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.requests = 256, 4, 60
    with tempfile.TemporaryDirectory(prefix="meshserve-adapters-") as tmp:
        r = asyncio.run(measure(args, Path(tmp)))
    console = Console()
    mem = Table(title=f"{ADAPTERS} fine-tunes: memory")
    for col in ("served as", "bytes", "share"):
        mem.add_column(col, justify="left" if col == "served as" else "right")
    mem.add_row(
        f"{ADAPTERS} full models", f"{r['memory_full_models_bytes'] / 2**20:.0f} MiB", "1.00"
    )
    mem.add_row(
        f"adapters on 2 base replicas ({args.slots} slots each)",
        f"{r['memory_adapters_bytes'] / 2**20:.0f} MiB",
        f"{r['memory_share']:.3f}",
    )
    console.print(mem)
    lat = Table(title=f"TTFT through the router, {args.concurrency} streams at a time")
    for col in ("requests for", "p50 ms", "p99 ms", "p99 vs base"):
        lat.add_column(col, justify="left" if col == "requests for" else "right")
    for name, t in r["ttft"].items():
        lat.add_row(
            name, f"{t['p50_s'] * 1e3:.1f}", f"{t['p99_s'] * 1e3:.1f}", f"{t['vs_base_p99']:.2f}"
        )
    console.print(lat)
    console.print(
        f"adapter loads: Zipf {r['adapter_loads']['zipf']:.0f}, uniform "
        f"{r['adapter_loads']['uniform']:.0f} (evictions {r['adapter_evictions']:.0f}, a load "
        f"{(r['adapter_load_mean_s'] or 0) * 1000:.1f} ms on average); GPUs at "
        f"8B scale (the scheduler's placement, H100-80GB): {r['gpus_at_8b_scale']}"
    )
    out = json.dumps(r, indent=2)
    if args.json:
        args.json.write_text(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
