"""Router overhead: the same streaming workload sent directly to an agent and through the router,
side by side in one run, against a real local mesh (etcd, scheduler, one agent, router).

    python bench/router_vs_direct.py [--requests 96] [--concurrency 8] [--max-tokens 64]
                                     [--json PATH]

Prints a table and writes JSON. Rounds alternate direct / router so machine noise hits both.
Router CPU is read from /proc for the router process during each round (raw: everything the
process did), and separately over an idle stretch of the same length right after (its
pollers, watches and demand publishing with no traffic): the two are reported side by side,
never subtracted; messages forwarded per router CPU-second divide by the raw figure. A request
that fails, or streams fewer tokens than asked, is counted as an error and left out of the
latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.demo_model import build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import demo_spec
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.common import cpu_seconds, one_agent_mesh


@dataclass
class Result:
    path: str  # "direct" or "router"
    requests: int
    tokens: int
    messages: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    router_cpu_s: float  # router process CPU during the round, raw (it serves no direct round)
    router_idle_cpu_s: float  # ... and over an idle stretch as long as the round, right after
    errors: int  # requests that failed or came back short


async def one(
    stub: inference_pb2_grpc.InferenceStub, max_tokens: int
) -> tuple[float, int, int] | None:
    """(TTFT s, tokens, messages), or None for a failed or short request."""
    try:
        got = await _one(stub, max_tokens)
    except grpc.aio.AioRpcError:
        return None
    return got if got[1] == max_tokens else None


async def _one(stub: inference_pb2_grpc.InferenceStub, max_tokens: int) -> tuple[float, int, int]:
    req = inference_pb2.GenerateRequest(model="demo", prompt="Once upon a time")
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    req.sampling.ignore_eos = True
    start = time.perf_counter()
    ttft = 0.0
    tokens = messages = 0
    async for msg in stub.Generate(req, timeout=120):
        if not messages:
            ttft = time.perf_counter() - start
        messages += 1
        tokens += len(msg.token_ids)
    return ttft, tokens, messages


async def run_round(address: str, path: str, args: argparse.Namespace, router_pid: int) -> Result:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        await one(stub, 4)  # connection warm-up
        gate = asyncio.Semaphore(args.concurrency)

        async def limited() -> tuple[float, int, int] | None:
            async with gate:
                return await one(stub, args.max_tokens)

        cpu0 = cpu_seconds(router_pid)
        start = time.perf_counter()
        got = await asyncio.gather(*(limited() for _ in range(args.requests)))
        wall = time.perf_counter() - start
        cpu = cpu_seconds(router_pid) - cpu0
        # The router's idle CPU over as long a stretch with no traffic (gRPC pollers, watches,
        # demand publishing), reported beside the raw figure.
        idle0 = cpu_seconds(router_pid)
        await asyncio.sleep(wall)
        idle = cpu_seconds(router_pid) - idle0
    results = [r for r in got if r is not None]
    ttfts = sorted(r[0] for r in results) or [float("nan")]
    tokens = sum(r[1] for r in results)
    return Result(
        path=path,
        requests=args.requests,
        tokens=tokens,
        messages=sum(r[2] for r in results),
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(ttfts[len(ttfts) // 2] * 1000, 2),
        ttft_p99_ms=round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 2),
        router_cpu_s=round(cpu if path == "router" else 0.0, 3),
        router_idle_cpu_s=round(idle if path == "router" else 0.0, 3),
        errors=len(got) - len(results),
    )


async def register(mesh: Mesh, model_dir: Path) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).put(Keyspace().model("demo"), demo_spec(model_dir))
    finally:
        await client.close()


async def wait_ready(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        for _ in range(600):
            models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            if any(m.name == "demo" and m.ready_replicas for m in models.models):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError("demo not READY")


def median_of(results: list[Result], path: str) -> Result:
    rounds = sorted((r for r in results if r.path == path), key=lambda r: r.tokens_per_s)
    return rounds[len(rounds) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="agent torch threads")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    console = Console(width=max(120, Console().width))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_demo_model(Path(tmp) / "demo")
        with one_agent_mesh(Path(tmp) / "mesh", threads=args.threads) as (mesh, agent, router):
            asyncio.run(register(mesh, model_dir))
            asyncio.run(wait_ready(router.address))
            results: list[Result] = []
            for _ in range(args.rounds):
                for path, address in (("direct", agent.address), ("router", router.address)):
                    results.append(asyncio.run(run_round(address, path, args, router.proc.pid)))
    direct, routed = median_of(results, "direct"), median_of(results, "router")
    table = Table(
        title=f"router vs direct — {args.requests} streams x {args.max_tokens} tokens, "
        f"concurrency {args.concurrency}, median of {args.rounds} rounds"
    )
    for col in (
        "path",
        "errors",
        "tokens/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "messages",
        "router CPU s (raw)",
        "router idle CPU s",
        "msgs per router CPU-s",
    ):
        table.add_column(col, justify="right")
    for r in (direct, routed):
        per_cpu = f"{r.messages / r.router_cpu_s:,.0f}" if r.router_cpu_s else "-"
        table.add_row(
            r.path,
            str(r.errors),
            f"{r.tokens_per_s:,.0f}",
            f"{r.ttft_p50_ms:.1f}",
            f"{r.ttft_p99_ms:.1f}",
            f"{r.messages:,}",
            f"{r.router_cpu_s:.2f}",
            f"{r.router_idle_cpu_s:.2f}" if r.path == "router" else "-",
            per_cpu,
        )
    console.print(table)
    summary = {
        "direct": asdict(direct),
        "router": asdict(routed),
        "throughput_ratio_router_over_direct": round(routed.tokens_per_s / direct.tokens_per_s, 3),
        "ttft_p50_added_ms": round(routed.ttft_p50_ms - direct.ttft_p50_ms, 2),
        "router_messages_per_cpu_s": round(routed.messages / routed.router_cpu_s, 0)
        if routed.router_cpu_s
        else None,
        "router_idle_cpu_share": round(routed.router_idle_cpu_s / routed.router_cpu_s, 3)
        if routed.router_cpu_s
        else None,
        "errors": sum(r.errors for r in results),
        "rounds": [asdict(r) for r in results],
        "args": vars(args) | {"json": str(args.json) if args.json else None},
    }
    console.print(
        f"router/direct throughput {summary['throughput_ratio_router_over_direct']:.3f}, "
        f"TTFT p50 +{summary['ttft_p50_added_ms']:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
