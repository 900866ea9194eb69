"""What tracing costs the router, side by side in one run: off, JSONL files, OTLP to a live Phoenix.

    python bench/tracing.py [--seconds 3] [--rounds 2] [--idle-seconds 30] [--json PATH]

One real local mesh (etcd, scheduler, one agent serving `engine: sim` models) and three routers
in front of the same agent, identical but for tracing:

- ``off``: ``OTEL_SDK_DISABLED=true`` (no tracer provider; trace context still passes on);
- ``jsonl``: ``MESHSERVE_TRACE_DIR`` (what `meshserve up` always does);
- ``otlp-phoenix``: the standard ``OTEL_*`` variables pointing at a real Arize Phoenix
  (`meshserve up --trace-ui`'s, meshserve/traceui.py; its environment is built on first use).

Loads (from bench/router.py): ``c1`` (TTFT), ``c16`` (saturation: 16 streams x 256 messages, the
sim model as fast as it can) and ``paced64`` (64 streams x 100 messages/s: a fixed load, so CPU %
compares directly). Router CPU is read from /proc; ``us/msg`` is router CPU per streamed message.
The agent and the scheduler write JSONL throughout (the same for every row), which gives spans per
request (router, and the whole mesh), and, after the loads, spans per idle hour: the spans every
process exported while nothing was asked of the mesh for ``--idle-seconds``, scaled to an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meshserve.localmesh import Mesh
from meshserve.traceui import TraceUI, otel_env
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.router import (
    CHANNELS,
    LOADS,
    MODELS,
    Row,
    Sample,
    put_models,
    row,
    run_load,
    wait_serving,
)

BENCH_LOADS = ("c1", "c16", "paced64")


def span_lines(folder: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in folder.glob("*.jsonl"))


def summary(
    rows: list[Row], per_request: dict[str, float], idle: dict[str, float]
) -> dict[str, Any]:
    by = {(r.path, r.load): r for r in rows}

    def us_per_msg(path: str, load: str) -> float:
        r = by.get((path, load))
        return 1e6 * r.proxy_cpu_s / r.messages if r and r.messages else 0.0

    out: dict[str, Any] = {}
    for load in BENCH_LOADS:
        off = us_per_msg("off", load)
        for path in ("jsonl", "otlp-phoenix"):
            mode = us_per_msg(path, load)
            out[f"cost_pct_{path}_{load}"] = round(100 * (mode / off - 1), 1) if off else 0.0
    for path in ("off", "jsonl", "otlp-phoenix"):
        p50 = by.get((path, "c1"))
        out[f"ttft_p50_ms_c1_{path}"] = p50.ttft_p50_ms if p50 else 0.0
    return {**out, **per_request, **idle, "cores": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per closed-loop row")
    parser.add_argument("--rounds", type=int, default=2, help="each load over every path, again")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loads = [load for load in LOADS if load.name in BENCH_LOADS]
    console = Console(width=130)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ui = TraceUI.start(root / "phoenix", _port(), _port(), say=console.print)
        mesh = Mesh(root / "mesh", lease_ttl_s=3, trace_dir=root / "mesh-spans")
        try:
            mesh.start_etcd()
            mesh.start_scheduler()
            mesh.start_agent(
                "agent-0",
                device="cpu",
                extra=["--simulate", "1", "--memory-limit", "4GiB", "--max-in-flight", "512"],
            )
            asyncio.run(put_models(mesh))
            # Routers: the mesh's trace dir is for the agent and the scheduler only.
            mesh.trace_dir = None
            mesh.env = {"OTEL_SDK_DISABLED": "true"}
            off = mesh.start_router("router-off")
            mesh.env = {"MESHSERVE_TRACE_DIR": str(root / "router-spans")}
            jsonl = mesh.start_router("router-jsonl")
            mesh.env = otel_env(ui.otlp_port)
            phoenix = mesh.start_router("router-otlp")
            mesh.env = {}
            paths = {
                "off": off,
                "jsonl": jsonl,
                "otlp-phoenix": phoenix,
            }
            for service in paths.values():
                for model in MODELS:
                    asyncio.run(wait_serving(service.address, model))
            samples: dict[tuple[str, str], list[Sample]] = {}
            spans_before = (span_lines(root / "router-spans"), span_lines(root / "mesh-spans"))
            streams = dict.fromkeys(paths, 0)  # each load also warms up CHANNELS streams
            for _ in range(args.rounds):
                for load in loads:
                    for path, service in paths.items():
                        got = asyncio.run(
                            run_load(service.address, [service.proc.pid], load, args.seconds)
                        )
                        samples.setdefault((path, load.name), []).append(got)
                        streams[path] += len(got.ttfts) + CHANNELS
            rows = [row(path, load, got) for (path, load), got in samples.items()]
            time.sleep(3)  # let the JSONL batches (0.5 s) land before counting
            router_spans = span_lines(root / "router-spans") - spans_before[0]
            agent_spans = span_lines(root / "mesh-spans") - spans_before[1]
            per_request = {  # the JSONL router's own; the agent served every router's
                "router_spans_per_request": round(router_spans / streams["jsonl"], 2),
                "agent_spans_per_request": round(agent_spans / sum(streams.values()), 2),
            }
            # Idle: nothing asked; count what every process exports.
            console.print(f"idle for {args.idle_seconds:.0f} s …")
            time.sleep(3)
            before = span_lines(root / "mesh-spans") + span_lines(root / "router-spans")
            time.sleep(args.idle_seconds)
            idle_spans = span_lines(root / "mesh-spans") + span_lines(root / "router-spans")
            idle = {
                "idle_spans": idle_spans - before,
                "idle_spans_per_hour": round((idle_spans - before) * 3600 / args.idle_seconds, 1),
            }
        finally:
            mesh.stop()
            ui.stop()
    table = Table(title=f"tracing cost in the router ({os.cpu_count()} cores; one agent, sim)")
    for col in ("load", "tracing", "streams", "msgs/s", "router CPU %", "us/msg",
                "TTFT p50 ms", "TTFT p99 ms"):  # fmt: skip
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (BENCH_LOADS.index(r.load), list(paths).index(r.path))):
        us = 1e6 * r.proxy_cpu_s / r.messages if r.messages else 0.0
        table.add_row(
            r.load, r.path, str(r.streams), str(r.msgs_per_s), str(r.proxy_cpu_pct),
            f"{us:.1f}", str(r.ttft_p50_ms), str(r.ttft_p99_ms),
        )  # fmt: skip
    console.print(table)
    keys = summary(rows, per_request, idle)
    console.print(json.dumps(keys, indent=1))
    if args.json:
        args.json.write_text(json.dumps({**keys, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


def _port() -> int:
    from meshserve.cluster.etcd_process import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
