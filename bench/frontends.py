"""The same streaming workload through the router's native gRPC API, its OpenAI-compatible HTTP
front (SSE) and its KServe v2 gRPC API (ModelStreamInfer, decoupled), side by side in one run,
against a real local mesh (etcd, scheduler, one agent, one router serving all three).

    python bench/frontends.py [--requests 64] [--max-tokens 64] [--vllm] [--json PATH]

For concurrency 1 and 8: tokens/s, TTFT p50/p99 and router CPU per token, rounds alternating
between the fronts so machine noise hits each. Goal: HTTP adds <= 2 ms to p50 TTFT at c = 1.
Then, on the same mesh, the tensor model's table (bench/batching.py): batching off / fixed /
adaptive at three load levels; goal: adaptive keeps P95 under its SLO where fixed does not.
The HTTP client is a lean asyncio one (a new connection per request, SSE lines parsed as they
come), so what it measures is the server side, not an SDK's overhead. Every front gets the same
workload (greedy, ``ignore_eos``: exactly --max-tokens each). A request that fails — a gRPC
error, an HTTP status other than 200, an SSE error event, a KServe error_message — or streams
fewer tokens than asked is counted in the front's errors and left out of its latencies and
throughput; the run exits 1 when any front had one. ``--vllm`` adds bench/vllm_peer.py's table:
the OpenAI front over the vLLM CPU engine beside vLLM's own server (guidellm, c = 1, 8, 32).
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
from meshserve.demo_model import build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import demo_spec
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench import vllm_peer
from bench.batching import classifier, print_table, run_batching
from bench.common import cpu_seconds, one_agent_mesh

PROMPT = "Once upon a time"


class Failed(Exception):
    """One request failed: counted as an error, never as a latency."""


async def native_one(stub: inference_pb2_grpc.InferenceStub, tokens: int) -> tuple[float, int]:
    req = inference_pb2.GenerateRequest(model="demo", prompt=PROMPT)
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = tokens, 0.0, True
    start = time.perf_counter()
    ttft, n = 0.0, 0
    async for m in stub.Generate(req, timeout=120):
        if not ttft:
            ttft = time.perf_counter() - start
        n += len(m.token_ids)
    return ttft, n


async def kserve_one(stub: Any, tokens: int) -> tuple[float, int]:
    """One decoupled ModelStreamInfer: responses until ``triton_final_response``."""
    from meshserve.kserve import grpc_service_pb2 as K
    from meshserve.router.fronts.kserve_tensors import pack_bytes

    req = K.ModelInferRequest(model_name="demo")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(pack_bytes([PROMPT.encode()]))
    params = json.dumps({"max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(pack_bytes([params.encode()]))
    start = time.perf_counter()
    ttft, n = 0.0, 0
    call = stub.ModelStreamInfer(iter([req]), timeout=120)
    async for r in call:
        if r.error_message:
            raise Failed(r.error_message)
        if not ttft:
            ttft = time.perf_counter() - start
        if r.infer_response.outputs:  # one response per message; agents send a token each
            n += 1
        if r.infer_response.parameters["triton_final_response"].bool_param:
            call.cancel()
            break
    return ttft, n


async def http_one(address: str, tokens: int) -> tuple[float, int]:
    body = json.dumps(
        {"model": "demo", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    ).encode()  # fmt: skip
    host, port = address.rsplit(":", 1)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    ttft, n = 0.0, 0
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            raise Failed(f"HTTP {status.decode().strip()}: {(await reader.read(500)).decode()}")
        while line := await reader.readline():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise Failed(str(chunk["error"]))
            if not ttft:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                n = int(chunk["usage"]["completion_tokens"])
    finally:
        writer.close()
    return ttft, n


async def round_(
    front: str, router: Any, concurrency: int, requests: int, tokens: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    total = errors = 0
    async with grpc.aio.insecure_channel(router.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        from meshserve.kserve import grpc_service_pb2_grpc as KG

        kstub = KG.GRPCInferenceServiceStub(ch)

        async def worker(n: int) -> None:
            nonlocal total, errors
            for _ in range(n):
                try:
                    if front == "native gRPC":
                        t, k = await native_one(stub, tokens)
                    elif front == "KServe v2 gRPC":
                        t, k = await kserve_one(kstub, tokens)
                    else:
                        t, k = await http_one(router.info["http"], tokens)
                except (Failed, grpc.aio.AioRpcError, OSError, ValueError):
                    errors += 1
                    continue
                if k != tokens:  # short: not the same work as the other fronts did
                    errors += 1
                    continue
                ttfts.append(t)
                total += k

        cpu0, wall0 = cpu_seconds(router.proc.pid), time.perf_counter()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        cpu, wall = cpu_seconds(router.proc.pid) - cpu0, time.perf_counter() - wall0
    return {"ttfts": ttfts, "tokens": total, "wall_s": wall, "cpu_s": cpu, "errors": errors}


def summary(front: str, concurrency: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    served = sorted(t for r in rounds for t in r["ttfts"])
    ttfts = served or [float("nan")]
    tokens = sum(r["tokens"] for r in rounds)
    return {
        "front": front,
        "concurrency": concurrency,
        "requests": len(served),
        "errors": sum(r["errors"] for r in rounds),
        "tokens_per_s": round(tokens / sum(r["wall_s"] for r in rounds), 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 2),
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 2),
        "router_cpu_us_per_token": round(sum(r["cpu_s"] for r in rounds) / max(1, tokens) * 1e6, 1),
    }


async def put_model(mesh: Mesh, model_dir: Path) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).put(Keyspace().model("demo"), demo_spec(model_dir))
    finally:
        await client.close()


async def warm(router: Any) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            await http_one(router.info["http"], 2)
            async with grpc.aio.insecure_channel(router.address) as ch:
                await native_one(inference_pb2_grpc.InferenceStub(ch), 2)
            return
        except (grpc.aio.AioRpcError, OSError, ValueError):
            await asyncio.sleep(0.3)
    raise TimeoutError("demo did not serve")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64, help="per front and concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batching-seconds", type=float, default=8.0, help="0: skip that table")
    parser.add_argument("--slo-ms", type=float, default=25.0, help="the tensor model's P95 SLO")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--vllm", action="store_true", help="then the vLLM peer table (bench/vllm_peer.py)"
    )
    args = parser.parse_args()
    rows = []
    batching: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        http = ["--http-listen", "127.0.0.1:0"]
        with one_agent_mesh(Path(tmp) / "mesh", router_extra=http) as (mesh, _agent, router):
            asyncio.run(put_model(mesh, build_demo_model(Path(tmp) / "model")))
            asyncio.run(warm(router))
            for concurrency in (1, 8):
                per: dict[str, list[dict[str, Any]]] = {
                    "native gRPC": [],
                    "OpenAI HTTP (SSE)": [],
                    "KServe v2 gRPC": [],
                }
                for _ in range(args.rounds):
                    for front, got in per.items():
                        got.append(
                            asyncio.run(
                                round_(
                                    front,
                                    router,
                                    concurrency,
                                    args.requests // args.rounds,
                                    args.max_tokens,
                                )
                            )
                        )
                rows += [summary(front, concurrency, got) for front, got in per.items()]
            if args.batching_seconds:
                model = classifier(Path(tmp) / "classifier")
                batching = run_batching(mesh, model, args.batching_seconds, args.slo_ms)
    table = Table(title=f"native gRPC vs OpenAI HTTP vs KServe v2, {args.max_tokens} tokens each")
    for col in ("front", "c", "requests", "errors", "tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                "CPU µs/token"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["front"], str(r["concurrency"]), str(r["requests"]), str(r["errors"]),
            str(r["tokens_per_s"]),
            str(r["ttft_p50_ms"]), str(r["ttft_p99_ms"]), str(r["router_cpu_us_per_token"]),
        )  # fmt: skip
    Console(width=140).print(table)
    added = rows[1]["ttft_p50_ms"] - rows[0]["ttft_p50_ms"]
    Console().print(f"HTTP adds {added:+.2f} ms to p50 TTFT at c = 1 (goal <= 2 ms)")
    if batching:
        print_table(batching)
    peer: dict[str, Any] = {}
    if args.vllm:  # meshserve's OpenAI front over vLLM vs vLLM's own server (guidellm)
        peer = vllm_peer.run(48)
        vllm_peer.print_tables(peer)
    if args.json:
        doc = {"rows": rows, "http_added_p50_ms_c1": added, "batching": batching, "vllm": peer}
        args.json.write_text(json.dumps(doc, indent=2))
    errors = [*rows, *peer.get("rows", [])]
    return 1 if any(r["errors"] for r in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
