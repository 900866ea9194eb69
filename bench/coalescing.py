"""Token coalescing, measured where it pays: the router's CPU for a paced streaming load, with
and without it, side by side in one run, against a real local mesh (etcd, scheduler, one agent,
one router) serving a simulated model (`engine: sim`, 100 tokens/s per stream: itl 10 ms).

    python bench/coalescing.py [--streams 64] [--tokens 300] [--json PATH]

Rows: stream_interval 0 (one message per token) and 20 / 50 ms. Columns: router CPU as a share
of one core, messages and tokens the clients got, TTFT p50 (the first token always goes alone,
so coalescing must not move it). Rounds alternate between the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.common import cpu_seconds, one_agent_mesh

INTERVALS_MS = (0, 20, 50)


async def put_model(mesh: Mesh) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    spec = spec_from_dict(
        {"name": "paced", "source": "sim://paced", "engine": "sim", "memory": "256MiB",
         "min_replicas": 1, "max_model_len": 8192,
         "engine_args": {"ttft_ms": "20", "itl_ms": "10", "max_batch": "256"}}
    )  # fmt: skip
    try:
        await Store(client, Keyspace()).put(Keyspace().model("paced"), spec)
    finally:
        await client.close()


async def one(stub: Any, tokens: int, interval_ms: int) -> tuple[float, int, int]:
    r = inference_pb2.GenerateRequest(model="paced", prompt="pace me")
    r.sampling.max_tokens, r.sampling.temperature = tokens, 0.0
    r.stream_interval_ms = interval_ms
    start = time.perf_counter()
    ttft, messages, got = 0.0, 0, 0
    async for m in stub.Generate(r, timeout=120):
        if not ttft:
            ttft = time.perf_counter() - start
        messages += 1
        got += len(m.token_ids)
    return ttft, messages, got


async def round_(address: str, pid: int, streams: int, tokens: int, ms: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        await one(stub, 2, ms)  # the channel up
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        got = await asyncio.gather(*(one(stub, tokens, ms) for _ in range(streams)))
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - wall0
    return {
        "ttfts": [g[0] for g in got],
        "messages": sum(g[1] for g in got),
        "tokens": sum(g[2] for g in got),
        "cpu_s": cpu,
        "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=300, help="per stream (3 s at 100/s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    per: dict[int, list[dict[str, Any]]] = {ms: [] for ms in INTERVALS_MS}
    with (
        tempfile.TemporaryDirectory() as tmp,
        one_agent_mesh(Path(tmp) / "mesh") as (mesh, _agent, router),
    ):
        asyncio.run(put_model(mesh))
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(round_(router.address, router.proc.pid, 1, 2, 0))
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for _ in range(args.rounds):
            for ms in INTERVALS_MS:
                per[ms].append(
                    asyncio.run(
                        round_(router.address, router.proc.pid, args.streams, args.tokens, ms)
                    )
                )
    rows = []
    for ms, got in per.items():
        wall = sum(g["wall_s"] for g in got)
        rows.append(
            {
                "stream_interval_ms": ms,
                "router_cpu_pct": round(100 * sum(g["cpu_s"] for g in got) / wall, 1),
                "messages": sum(g["messages"] for g in got),
                "tokens": sum(g["tokens"] for g in got),
                "tokens_per_s": round(sum(g["tokens"] for g in got) / wall, 1),
                "ttft_p50_ms": round(
                    statistics.median(t for g in got for t in g["ttfts"]) * 1000, 2
                ),
            }
        )
    table = Table(
        title=f"token coalescing: {args.streams} streams x 100 tokens/s (sim), router CPU"
    )
    for col in ("stream_interval", "router CPU % of a core", "messages", "tokens", "tokens/s",
                "TTFT p50 ms"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r['stream_interval_ms']} ms", str(r["router_cpu_pct"]), str(r["messages"]),
            str(r["tokens"]), str(r["tokens_per_s"]), str(r["ttft_p50_ms"]),
        )  # fmt: skip
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
