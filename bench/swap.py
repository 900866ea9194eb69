"""Tier swap speed of the torch engine on whatever device is here, against the physical limit.

    python bench/swap.py [--hidden 1024 --layers 8] [--repeats 3] [--drop-caches] [--json PATH]

Measures, in one run: the raw host→device copy bandwidth of one buffer the model's size (pinned
host memory on CUDA; a plain memcpy when the device is the CPU), then the engine's restore of a
model from CPU RAM (TIER_HOST) and from local disk (TIER_DISK), each as seconds, bytes/s and a
ratio to the raw bandwidth. The disk file was just written, so without --drop-caches (root only)
the disk read is served from the page cache: the table says which.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from meshserve.demo_model import build_demo_model
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.torch_engine import TorchEngine
from meshserve.v1 import cluster_pb2
from rich.console import Console
from rich.table import Table


def raw_copy_bytes_per_s(nbytes: int, device: torch.device, repeats: int) -> float:
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if pinned:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        if pinned:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    source = build_demo_model(
        tmp / "model", hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 11 // 4
    )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    engine = TorchEngine(EngineConfig(device=str(device), threads=args.threads, cache_dir=str(tmp)))
    spec = cluster_pb2.ModelSpec(name="swap", source=str(source), engine_args={"dtype": dtype})
    start = time.perf_counter()
    await engine.load(spec)
    load_s = time.perf_counter() - start
    model_bytes = engine.memory_bytes()
    raw = raw_copy_bytes_per_s(model_bytes, device, args.repeats)

    async def timed(step: Callable[[], Awaitable[None]]) -> float:
        start = time.perf_counter()
        await step()
        return time.perf_counter() - start

    offload_host, from_cpu, offload_disk, from_disk = [], [], [], []
    cold = False
    for _ in range(args.repeats):
        offload_host.append(await timed(lambda: engine.offload(cluster_pb2.TIER_HOST)))
        from_cpu.append(await timed(engine.restore))
        offload_disk.append(await timed(lambda: engine.offload(cluster_pb2.TIER_DISK)))
        if args.drop_caches:
            cold = drop_page_cache()
        from_disk.append(await timed(engine.restore))
    await engine.unload()
    cpu_s, disk_s = statistics.median(from_cpu), statistics.median(from_disk)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype,
        "model_bytes": model_bytes,
        "load_from_source_s": round(load_s, 4),
        "raw_pinned_bytes_per_s": raw,
        "offload_to_cpu_s": round(statistics.median(offload_host), 4),
        "restore_from_cpu_s": round(cpu_s, 4),
        "restore_from_cpu_bytes_per_s": model_bytes / cpu_s,
        "offload_to_disk_s": round(statistics.median(offload_disk), 4),
        "restore_from_disk_s": round(disk_s, 4),
        "restore_from_disk_bytes_per_s": model_bytes / disk_s,
        "restore_ratio": round(model_bytes / cpu_s / raw, 3),
        "disk_ratio": round(model_bytes / disk_s / raw, 3),
        "disk_read_cold": cold,
        "repeats": args.repeats,
        "raw_is": "pinned host→GPU copy" if device.type == "cuda" else "host memcpy (no GPU)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drop-caches", action="store_true", help="cold disk reads (root)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = asyncio.run(measure(args, Path(tmp)))
    gb = 1e9
    size = f"{r['model_bytes'] / gb:.2f} GB ({r['dtype']})"
    table = Table(title=f"tier swap on {r['device']} — model {size}")
    for col in ("what", "seconds", "GB/s", "vs raw"):
        table.add_column(col, justify="right")
    raw = float(r["raw_pinned_bytes_per_s"])
    table.add_row(f"raw copy ({r['raw_is']})", "", f"{raw / gb:.2f}", "1.00")
    for label, key in (
        ("restore from CPU RAM", "restore_from_cpu"),
        ("restore from disk", "restore_from_disk"),
    ):
        seconds = float(r[f"{key}_s"])
        rate = float(r[f"{key}_bytes_per_s"])
        table.add_row(label, f"{seconds:.4f}", f"{rate / gb:.2f}", f"{rate / raw:.2f}")
    table.add_row("offload to CPU RAM", f"{r['offload_to_cpu_s']:.4f}", "", "")
    table.add_row("offload to disk", f"{r['offload_to_disk_s']:.4f}", "", "")
    table.add_row("load from source (safetensors)", f"{r['load_from_source_s']:.4f}", "", "")
    Console().print(table)
    Console().print(
        f"disk reads: {'cold (page cache dropped)' if r['disk_read_cold'] else 'page cache (warm)'}"
    )
    if r["device"] == "cpu":
        Console().print(
            "device is the CPU: restoring from CPU RAM re-points the model at the host buffer "
            "(no copy), so its ratio to memcpy only says that no copy happened; run on a GPU for "
            "the PCIe figure"
        )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
