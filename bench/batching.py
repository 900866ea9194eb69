"""Dynamic batching of a tensor model, off vs fixed vs adaptive, at three load levels, in one run
against a real local mesh (etcd, scheduler, one agent, one router): an image classifier
(random-initialised ResNet, 32x32 RGB) served three times under three names, one per mode, each
request one image through the router's Infer RPC.

    python bench/batching.py [--seconds 8] [--slo-ms 25] [--json PATH]

Load is open-loop (Poisson arrivals, as independent users send): each level is a fraction of the
unbatched capacity measured first in the same run. Per mode and level: offered and achieved
requests/s, P50/P95/P99 latency as the client sees it, mean rows per batch, errors, and whether
P95 stayed under the SLO. Fixed: window 20 ms, max batch 8. Adaptive: window moves in [0, 20] ms
against a P95 target of 70 % of the SLO (AGENT_SHARE: the agent measures from a request's
arrival in its batcher to its result; the client's latency adds the router and two gRPC hops).
Goal: adaptive keeps P95 under its SLO where fixed batching does not.
Also run by bench/frontends.py after its streaming table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.demo_model import build_classifier
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.common import one_agent_mesh

MODES = ("off", "fixed", "adaptive")
LEVELS = (("low", 0.1), ("medium", 0.5), ("high", 1.2))  # x the unbatched capacity


# The adaptive model's target is the agent's share of the client's SLO: the agent measures from a
# request's arrival in its batcher to its result; the router and two gRPC hops take the rest
# (≈ 5-6 ms of 25 here: the P50 of batching-off at low load is ≈ 10 ms for ≈ 2 ms of compute).
AGENT_SHARE = 0.7


def model_args(mode: str, slo_ms: float) -> dict[str, str]:
    args = {"task": "classify", "batching": mode, "batch_window_ms": "20", "max_batch_size": "8"}
    if mode == "adaptive":
        args["latency_slo_ms"] = str(round(slo_ms * AGENT_SHARE, 2))
    return args


async def put_models(mesh: Mesh, model_dir: Path, slo_ms: float) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    store = Store(client, Keyspace())
    try:
        for mode in MODES:
            spec = spec_from_dict(
                {
                    "name": f"cls-{mode}",
                    "source": str(model_dir),
                    "engine_args": model_args(mode, slo_ms),
                    "min_replicas": 1,
                    "kv_headroom": "1MiB",
                }
            )
            await store.put(Keyspace().model(spec.name), spec)
    finally:
        await client.close()


def one_image(rng: np.random.Generator, model: str) -> inference_pb2.InferRequest:
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    r = inference_pb2.InferRequest(model=model, outputs=["class_id"])
    r.inputs.add(name="pixel_values", datatype="FP32", shape=list(x.shape), data=x.tobytes())
    return r


async def wait_ready(address: str) -> None:
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + 120
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for mode in MODES:
            while True:
                try:
                    await stub.Infer(one_image(rng, f"cls-{mode}"), timeout=10)
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.3)


async def unbatched_capacity(address: str, n: int = 200, concurrency: int = 4) -> float:
    """Requests/s the batching-off model serves with a few callers always waiting."""
    rng = np.random.default_rng(1)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def caller() -> None:
            for _ in range(n // concurrency):
                await stub.Infer(one_image(rng, "cls-off"), timeout=30)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


async def open_loop(
    address: str, model: str, rate: float, seconds: float, warmup_s: float
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``warmup_s + seconds``; what arrived after the warm-up
    is measured (latency from its scheduled send time, so a slow client shows as latency)."""
    rng = np.random.default_rng(2)
    gaps = random.Random(3)
    latencies: list[float] = []
    rows: list[int] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)

        async def one(at: float, measured: bool) -> None:
            nonlocal errors
            try:
                reply = await stub.Infer(one_image(rng, model), timeout=10)
            except grpc.aio.AioRpcError:
                errors += measured
                return
            if measured:
                latencies.append(time.perf_counter() - at)
                rows.append(reply.batch_size)

        start = time.perf_counter()
        end = start + warmup_s + seconds
        at = start
        tasks = []
        while (at := at + gaps.expovariate(rate)) < end:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at, at - start >= warmup_s)))
        await asyncio.gather(*tasks)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else 0.0

    return {
        "served_per_s": round(len(lat) / seconds, 1),
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_batch_rows": round(statistics.mean(rows), 2) if rows else 0.0,
        "errors": errors,
    }


def run_batching(mesh: Mesh, model_dir: Path, seconds: float, slo_ms: float) -> dict[str, Any]:
    """Puts the three models on ``mesh`` (which runs an agent and a router) and measures."""
    address = mesh.services["router"].address
    asyncio.run(put_models(mesh, model_dir, slo_ms))
    asyncio.run(wait_ready(address))
    capacity = asyncio.run(unbatched_capacity(address))
    rows = []
    for level, share in LEVELS:
        rate = capacity * share
        for mode in MODES:  # the modes take turns at each level: noise hits each
            got = asyncio.run(open_loop(address, f"cls-{mode}", rate, seconds, warmup_s=3.0))
            got.update(mode=mode, level=level, offered_per_s=round(rate, 1))
            got["within_slo"] = bool(got["p95_ms"] <= slo_ms and not got["errors"])
            rows.append(got)
    return {"unbatched_capacity_per_s": round(capacity, 1), "slo_p95_ms": slo_ms, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    table = Table(
        title=f"dynamic batching, one image per request, P95 SLO {result['slo_p95_ms']} ms "
        f"(unbatched capacity {result['unbatched_capacity_per_s']} req/s)"
    )
    for col in ("load", "mode", "offered/s", "served/s", "p50 ms", "p95 ms", "p99 ms",
                "rows/batch", "errors", "P95 ≤ SLO"):  # fmt: skip
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(
            r["level"], r["mode"], str(r["offered_per_s"]), str(r["served_per_s"]),
            str(r["p50_ms"]), str(r["p95_ms"]), str(r["p99_ms"]), str(r["mean_batch_rows"]),
            str(r["errors"]), "yes" if r["within_slo"] else "NO",
        )  # fmt: skip
    Console(width=140).print(table)


def classifier(root: Path) -> Path:
    """The bench's classifier: deeper than the tests' (4 stages of 2 blocks), so a forward pass
    has the fixed per-call cost that batching shares (≈ 1.2 ms alone, ≈ 3 ms for 8 on one core)."""
    return build_classifier(root, widths=(32, 64, 128, 256), depth=2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured per mode and level")
    parser.add_argument("--slo-ms", type=float, default=25.0, help="P95 target (adaptive)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        one_agent_mesh(Path(tmp) / "mesh") as (mesh, _agent, _router),
    ):
        result = run_batching(mesh, classifier(Path(tmp) / "model"), args.seconds, args.slo_ms)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
