"""Cold start of a model from its local directory vs from an S3 registry, side by side in one run.

    python -m bench.artifacts [--quick] [--hidden 1024 --layers 12] [--repeats 3]
                              [--drop-caches] [--json PATH]

A random Llama-shaped model (≈ 1 GB in float32 by default) is built locally and pushed to a real
S3 server on loopback (SeaweedFS, tests/s3server.py). Each row is the agent's cold start until
the first token, with the torch engine (safetensors through transformers): (a) from the local
directory; (b) from the registry into an empty node cache (manifest, parallel ranged fetch,
sha256 check, link, then the same load); (c) from the node cache the fetch left (no download).
Also the registry's bandwidth on loopback, and the loader alone: safetensors vs
runai-model-streamer reading every tensor into CPU memory (the streamer is optional), beside the
disk's ceiling (the same bytes read raw in parallel: no loader can beat it).
Goals (issue 25): (c) ≤ 1.1 x (a); a streaming loader ≥ 2x safetensors where it applies.
Without --drop-caches (root only) every read after the first is served from the page cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshserve.artifacts import s3
from meshserve.artifacts.cache import NodeCache
from meshserve.demo_model import build_demo_model
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.torch_engine import TorchEngine
from meshserve.v1 import cluster_pb2
from rich.console import Console
from rich.table import Table

from bench.swap import drop_page_cache
from tests import s3server

ONE_TOKEN = GenerationParams(1, 0.0, 1.0, 0, None, (), True)
CHUNK = 16 << 20


async def first_token(source: Path, tmp: Path, threads: int) -> tuple[float, float]:
    """(load seconds, load + first token seconds) of the torch engine from ``source``."""
    engine = TorchEngine(EngineConfig(device="cpu", threads=threads, cache_dir=str(tmp)))
    spec = cluster_pb2.ModelSpec(name="cold", source=str(source))
    started = time.perf_counter()
    await engine.load(spec)
    loaded = time.perf_counter() - started
    async for _chunk in engine.generate("Once upon a time", [], ONE_TOKEN):
        break
    total = time.perf_counter() - started
    await engine.unload()
    return loaded, total


def loaders(model: Path, repeats: int, drop: bool) -> dict[str, Any]:
    """Reading every tensor of the model's safetensors into CPU memory (part 3: the loader
    alone): the safetensors library vs runai-model-streamer (parallel reads into a host buffer;
    optional: `pip install runai-model-streamer`), median seconds."""
    import safetensors.torch

    files = sorted(str(p) for p in model.glob("*.safetensors"))
    nbytes = sum(Path(f).stat().st_size for f in files)

    def st_load() -> None:
        for f in files:
            tensors = safetensors.torch.load_file(f)
            sum(int(t.view(-1)[0].item() != 0) for t in tensors.values())  # touch each tensor

    def runai_load() -> None:
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files)
            for _name, t in streamer.get_tensors():
                t.clone()  # the streamer reuses its buffer: keep a copy, as a loader must

    def raw_read() -> None:
        """The disk's ceiling for any loader: every byte read into memory (no parsing, no
        tensors), 16 MiB ranges over 4 threads."""
        ranges = []
        for f in files:
            size = Path(f).stat().st_size
            ranges += [(f, o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]

        def read(job: tuple[str, int, int]) -> None:
            path, offset, length = job
            fd = os.open(path, os.O_RDONLY)
            try:
                os.pread(fd, length, offset)
            finally:
                os.close(fd)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(read, ranges))

    out: dict[str, Any] = {"loader_bytes": nbytes}
    runs = (("raw_read", raw_read), ("safetensors", st_load), ("runai_streamer", runai_load))
    for name, fn in runs:
        times = []
        try:
            for _ in range(repeats):
                if drop:
                    drop_page_cache()
                started = time.perf_counter()
                fn()
                times.append(time.perf_counter() - started)
        except ImportError:
            out[f"{name}_s"] = None
            continue
        out[f"{name}_s"] = round(statistics.median(times), 3)
    if out.get("runai_streamer_s"):
        out["runai_vs_safetensors"] = round(out["safetensors_s"] / out["runai_streamer_s"], 2)
    # No loader beats reading the bytes: the most any can gain over safetensors on this disk.
    out["raw_read_bytes_per_s"] = round(nbytes / out["raw_read_s"])
    out["ceiling_vs_safetensors"] = round(out["safetensors_s"] / out["raw_read_s"], 2)
    return out


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model = build_demo_model(
        tmp / "model", hidden=args.hidden, layers=args.layers, intermediate=args.hidden * 11 // 4
    )
    server = s3server.start(tmp / "s3")
    try:
        loc = server.location("bench/model")
        started = time.perf_counter()
        manifest = await s3.push(model, loc)
        push_s = time.perf_counter() - started
        rows: dict[str, list[float]] = {"local": [], "registry": [], "cache": [], "fetch": []}
        for i in range(args.repeats):
            if args.drop_caches:
                drop_page_cache()
            rows["local"].append((await first_token(model, tmp, args.threads))[1])
            root = tmp / f"cache-{i}"
            cache = NodeCache(root, 0)
            if args.drop_caches:
                drop_page_cache()
            started = time.perf_counter()
            local = await cache.materialize(loc, manifest.revision, lambda h, t: None)
            fetched = time.perf_counter() - started
            rows["fetch"].append(fetched)
            rows["registry"].append(fetched + (await first_token(local, tmp, args.threads))[1])
            if args.drop_caches:
                drop_page_cache()
            started = time.perf_counter()
            again = await NodeCache(root, 0).materialize(loc, manifest.revision, lambda h, t: None)
            hit = time.perf_counter() - started
            rows["cache"].append(hit + (await first_token(again, tmp, args.threads))[1])
            shutil.rmtree(root)
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return loaders(model, args.repeats, args.drop_caches) | {
        "model_bytes": manifest.total_bytes,
        "files": len(manifest.files),
        "loader": "safetensors (transformers from_pretrained), torch engine on the CPU",
        "push_s": round(push_s, 3),
        "cold_start_local_s": round(med["local"], 3),
        "cold_start_registry_empty_cache_s": round(med["registry"], 3),
        "cold_start_node_cache_s": round(med["cache"], 3),
        "registry_fetch_s": round(med["fetch"], 3),
        "registry_bytes_per_s": round(manifest.total_bytes / med["fetch"]),
        "node_cache_vs_local": round(med["cache"] / med["local"], 3),
        "registry_vs_local": round(med["registry"] / med["local"], 3),
        "page_cache_dropped": bool(args.drop_caches),
        "repeats": args.repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a ≈ 50 MB model, 1 repeat")
    parser.add_argument("--drop-caches", action="store_true", help="root only: cold page cache")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.repeats = 512, 4, 1
    with tempfile.TemporaryDirectory(prefix="meshserve-artifacts-") as tmp:
        r = asyncio.run(measure(args, Path(tmp)))
    mib = r["model_bytes"] / 2**20
    table = Table(title=f"cold start until the first token ({mib:.0f} MiB, {r['files']} files)")
    for col in ("from", "seconds", "vs local directory"):
        table.add_column(col, justify="right" if col != "from" else "left")
    table.add_row("(a) local directory", f"{r['cold_start_local_s']:.3f}", "1.00")
    table.add_row(
        "(b) S3 registry, empty node cache",
        f"{r['cold_start_registry_empty_cache_s']:.3f}",
        f"{r['registry_vs_local']:.2f}",
    )
    table.add_row(
        "(c) node cache", f"{r['cold_start_node_cache_s']:.3f}", f"{r['node_cache_vs_local']:.2f}"
    )
    Console().print(table)
    runai = r.get("runai_streamer_s")
    Console().print(
        f"loader alone ({r['loader_bytes'] / 2**20:.0f} MiB into CPU memory): safetensors "
        f"{r['safetensors_s']:.3f} s, runai-model-streamer "
        + (f"{runai:.3f} s ({r['runai_vs_safetensors']:.2f}x)" if runai else "not installed")
        + f"; the bytes alone (the disk's ceiling) {r['raw_read_s']:.3f} s, "
        f"{r['raw_read_bytes_per_s'] / 1e9:.2f} GB/s: at most {r['ceiling_vs_safetensors']:.2f}x "
        "for any loader here"
    )
    Console().print(
        f"registry on loopback: {r['registry_bytes_per_s'] / 1e6:.0f} MB/s "
        f"(fetch {r['registry_fetch_s']:.2f} s; push {r['push_s']:.2f} s); loader: {r['loader']}; "
        f"page cache {'dropped' if r['page_cache_dropped'] else 'warm'}"
    )
    out = json.dumps(r, indent=2)
    if args.json:
        args.json.write_text(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
