"""What the router costs per streamed message, against the Python floor, side by side in one run.

    python bench/router.py [--seconds 3] [--rounds 2] [--loads c1,c200] [--json PATH]

One real local mesh (etcd, scheduler, one agent serving `engine: sim` models) and, in front of
the same agent:

- ``direct``: clients call the agent;
- ``floor``: a minimal raw-bytes grpc.aio pass-through on uvloop (written here, `--serve-floor`):
  no parsing, no routing, no tracing — what any Python proxy pays per message;
- ``router``: a meshserve router, tracing off (``OTEL_SDK_DISABLED``);
- ``router+otlp``: a router exporting every span over OTLP/gRPC to a local collector process
  (`--serve-collector`: an OTLP endpoint that accepts and drops);
- ``router-w2``: `meshserve router --workers 2` (SO_REUSEPORT), tracing off.

Loads: ``c1`` (one stream at a time: TTFT), ``c16`` and ``c200`` (closed loop, the sim model
decodes as fast as it can: saturation), ``paced64`` (64 streams x 100 tokens/s) and
``paced64+20ms`` (the same with 20 ms token coalescing). CPU is read from /proc for the proxy's
processes (all workers); ``msgs/cpu-s`` is messages the clients received per proxy CPU-second.
Loads run in the order above, each over every path in turn, for each round; a row pools its
rounds. Clients use several channels
(separate connections) so that SO_REUSEPORT can spread them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
from bench.common import cpu_seconds

GENERATE = "/meshserve.v1.Inference/Generate"
CHANNELS = 8
MODELS = {
    # saturation: steps of 0.1 ms, so the path, not the engine, is the limit
    "fast": {"ttft_ms": "1", "itl_ms": "0.1", "max_batch": "512", "kv_tokens": "10000000"},
    # 100 tokens/s per stream
    "paced": {"ttft_ms": "5", "itl_ms": "10", "max_batch": "512", "kv_tokens": "10000000"},
}


# --- the floor and the collector: separate processes -------------------------------------------


async def serve_floor(port: int, upstream: str) -> None:
    """Raw bytes in, raw bytes out: one upstream channel, no parsing."""
    channel = grpc.aio.insecure_channel(upstream)
    call_upstream = channel.unary_stream(GENERATE)  # no serializers: bytes pass through

    async def generate(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        call = call_upstream(request, timeout=context.time_remaining())
        async for message in call:
            yield message

    handler = grpc.method_handlers_generic_handler(
        "meshserve.v1.Inference", {"Generate": grpc.unary_stream_rpc_method_handler(generate)}
    )
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def serve_collector(port: int) -> None:
    """An OTLP/gRPC trace endpoint that accepts every export (an empty ExportTraceServiceResponse
    is zero bytes) and counts the bytes it got."""
    got = [0]

    async def export(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        got[0] += len(request)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def side_process(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, *args, str(port)])
    return proc, port


async def wait_serving(address: str, model: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await stream(channel_stub(address)[1], model, 2, 0)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- load -----------------------------------------------------------------------------------


def channel_stub(address: str) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    ch = grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
    return ch, inference_pb2_grpc.InferenceStub(ch)


async def stream(
    stub: inference_pb2_grpc.InferenceStub, model: str, tokens: int, interval_ms: int
) -> tuple[float, int]:
    r = inference_pb2.GenerateRequest(model=model, prompt="bench the path")
    r.sampling.max_tokens, r.sampling.temperature = tokens, 0.0
    r.sampling.ignore_eos = True
    r.stream_interval_ms = interval_ms
    start = time.perf_counter()
    ttft, messages = 0.0, 0
    async for _ in stub.Generate(r, timeout=300):
        if not messages:
            ttft = time.perf_counter() - start
        messages += 1
    return ttft, messages


@dataclass
class Load:
    name: str
    model: str
    concurrency: int
    tokens: int  # per stream
    interval_ms: int = 0
    closed_loop: bool = True  # repeat streams until the time is up; else one wave


LOADS = (
    Load("c1", "fast", 1, 32),
    Load("c16", "fast", 16, 256),
    Load("c200", "fast", 200, 256),
    Load("paced64", "paced", 64, 300, 0, closed_loop=False),
    Load("paced64+20ms", "paced", 64, 300, 20, closed_loop=False),
)


@dataclass
class Row:
    path: str
    load: str
    streams: int
    messages: int
    wall_s: float
    msgs_per_s: float
    proxy_cpu_s: float
    proxy_cpu_pct: float
    msgs_per_cpu_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


@dataclass
class Sample:
    messages: int
    cpu_s: float
    wall_s: float
    ttfts: list[float]


async def run_load(address: str, pids: list[int], load: Load, seconds: float) -> Sample:
    chans = [channel_stub(address) for _ in range(CHANNELS)]
    try:
        for _, stub in chans:  # connections up before measuring
            await stream(stub, load.model, 2, 0)
        results: list[tuple[float, int]] = []
        stop_at = time.perf_counter() + seconds

        async def client(i: int) -> None:
            stub = chans[i % CHANNELS][1]
            while True:
                results.append(await stream(stub, load.model, load.tokens, load.interval_ms))
                if not load.closed_loop or time.perf_counter() > stop_at:
                    return

        cpu0 = sum(cpu_seconds(p) for p in pids)
        wall0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(load.concurrency)))
        wall = time.perf_counter() - wall0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    finally:
        for ch, _ in chans:
            await ch.close()
    return Sample(sum(m for _, m in results), cpu, wall, [t for t, _ in results])


def row(path: str, load: str, samples: list[Sample]) -> Row:
    """The rounds of one (path, load), pooled: totals over totals, percentiles over all."""
    messages = sum(s.messages for s in samples)
    cpu = sum(s.cpu_s for s in samples)
    wall = sum(s.wall_s for s in samples)
    ttfts = sorted(t for s in samples for t in s.ttfts)
    return Row(
        path=path,
        load=load,
        streams=len(ttfts),
        messages=messages,
        wall_s=round(wall, 2),
        msgs_per_s=round(messages / wall, 1),
        proxy_cpu_s=round(cpu, 2),
        proxy_cpu_pct=round(100 * cpu / wall, 1),
        msgs_per_cpu_s=round(messages / cpu, 1) if cpu > 0 else 0.0,
        ttft_p50_ms=round(statistics.median(ttfts) * 1000, 2),
        ttft_p99_ms=round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 2),
    )


async def put_models(mesh: Mesh) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        store = Store(client, Keyspace())
        for name, engine_args in MODELS.items():
            spec = spec_from_dict(
                {"name": name, "source": f"sim://{name}", "engine": "sim", "memory": "256MiB",
                 "min_replicas": 1, "max_model_len": 8192, "engine_args": engine_args}
            )  # fmt: skip
            await store.put(store.keys.model(name), spec)
    finally:
        await client.close()


def summary(rows: list[Row]) -> dict[str, Any]:
    by = {(r.path, r.load): r for r in rows}

    def get(path: str, load: str, field: str) -> float:
        return float(getattr(by[(path, load)], field)) if (path, load) in by else 0.0

    floor = get("floor", "c200", "msgs_per_cpu_s")
    router = get("router", "c200", "msgs_per_cpu_s")
    traced = get("router+otlp", "c200", "msgs_per_cpu_s")
    one = get("router", "c200", "msgs_per_s")
    return {
        "floor_msgs_per_cpu_s": floor,
        "router_msgs_per_cpu_s": router,
        "ratio_to_floor": round(router / floor, 3) if floor else 0.0,
        "added_ttft_p50_ms_c1": round(
            get("router", "c1", "ttft_p50_ms") - get("direct", "c1", "ttft_p50_ms"), 2
        ),
        "floor_added_ttft_p50_ms_c1": round(
            get("floor", "c1", "ttft_p50_ms") - get("direct", "c1", "ttft_p50_ms"), 2
        ),
        "tracing_cost_pct": round(100 * (router / traced - 1), 1) if traced else 0.0,
        "workers2_speedup": round(get("router-w2", "c200", "msgs_per_s") / one, 2) if one else 0.0,
        "paced_cpu_pct": get("router", "paced64", "proxy_cpu_pct"),
        "paced_cpu_pct_coalesced": get("router", "paced64+20ms", "proxy_cpu_pct"),
        "floor_paced_cpu_pct": get("floor", "paced64", "proxy_cpu_pct"),
        "cores": os.cpu_count(),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-floor":
        import uvloop

        uvloop.run(serve_floor(int(sys.argv[3]), sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-collector":
        import uvloop

        uvloop.run(serve_collector(int(sys.argv[2])))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per closed-loop row")
    parser.add_argument("--rounds", type=int, default=2, help="each load over every path, again")
    parser.add_argument("--loads", default=",".join(load.name for load in LOADS))
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout's root: its router runs beside ours as 'router@base' (before/after "
        "in one run; e.g. git worktree add /tmp/base <rev>)",
    )
    args = parser.parse_args()
    loads = [load for load in LOADS if load.name in args.loads.split(",")]
    rows: list[Row] = []
    sides: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp) / "mesh", lease_ttl_s=3)
        try:
            mesh.start_etcd()
            mesh.start_scheduler()
            agent = mesh.start_agent(
                "agent-0",
                device="cpu",
                extra=["--simulate", "1", "--memory-limit", "4GiB", "--max-in-flight", "512"],
            )
            asyncio.run(put_models(mesh))
            direct = agent.info["addresses"].split(",")[0]
            floor_proc, floor_port = side_process("--serve-floor", direct)
            collector, collector_port = side_process("--serve-collector")
            sides += [floor_proc, collector]
            mesh.env = {"OTEL_SDK_DISABLED": "true"}
            router = mesh.start_router("router")
            w2 = mesh.start_router("router-w2", extra=["--workers", "2"])
            mesh.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}"}
            traced = mesh.start_router("router-otlp")
            mesh.env = {}
            base = None
            if args.baseline is not None:  # `meshserve` from the other checkout, first on the path
                shim = Path(tmp) / "baseline"
                shim.mkdir()
                (shim / "meshserve").symlink_to((args.baseline / "services").resolve())
                mesh.env = {"OTEL_SDK_DISABLED": "true", "PYTHONPATH": str(shim)}
                base = mesh.start_router("router-base")
                mesh.env = {}
            w2_pids = [int(w["pid"]) for w in w2.info["workers"]]  # type: ignore[index,union-attr]
            paths = {
                "direct": (direct, [agent.proc.pid]),
                "floor": (f"127.0.0.1:{floor_port}", [floor_proc.pid]),
                "router": (router.address, [router.proc.pid]),
                "router+otlp": (traced.address, [traced.proc.pid]),
                "router-w2": (w2.address, w2_pids),
            }
            if base is not None:
                paths["router@base"] = (base.address, [base.proc.pid])
            for address, _ in paths.values():
                for model in MODELS:
                    asyncio.run(wait_serving(address, model))
            samples: dict[tuple[str, str], list[Sample]] = {}
            for _ in range(args.rounds):
                for load in loads:
                    for path, (address, pids) in paths.items():
                        if path == "direct":
                            pids = []  # the agent's CPU is not the proxy's
                        got = asyncio.run(run_load(address, pids, load, args.seconds))
                        samples.setdefault((path, load.name), []).append(got)
            rows = [row(path, load, got) for (path, load), got in samples.items()]
        finally:
            for p in sides:
                p.terminate()
            mesh.stop()
    table = Table(title=f"router vs the Python floor ({os.cpu_count()} cores; one agent, sim)")
    for col in ("load", "path", "streams", "msgs/s", "proxy CPU %", "msgs/cpu-s",
                "TTFT p50 ms", "TTFT p99 ms"):  # fmt: skip
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.load, r.path, str(r.streams), str(r.msgs_per_s),
            str(r.proxy_cpu_pct) if r.path != "direct" else "-",
            str(r.msgs_per_cpu_s) if r.path != "direct" else "-",
            str(r.ttft_p50_ms), str(r.ttft_p99_ms),
        )  # fmt: skip
    console = Console(width=130)
    console.print(table)
    keys = summary(rows)
    console.print(json.dumps(keys, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**keys, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
