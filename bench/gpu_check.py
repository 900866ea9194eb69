"""meshserve's GPU paths, checked on the machine you run it on, in one table (< 8 minutes).

    python bench/gpu_check.py [--json PATH] [--allow-cpu] [--skip-mesh]

Each row is one check with its outcome (pass / FAIL / skip and why / n/a: it ran, but its goal
cannot be judged on this device) and its figure:
  nvml            the agent's NVML probe: GPUs, uuids, memory, MIG
  binding         for every GPU: the torch engine's device for a placement naming that uuid is
                  that GPU (a 64 MiB allocation there shows in NVML on that uuid, nowhere else)
  torch tiers     the torch engine on the GPU: greedy tokens equal after offload to pinned CPU RAM
                  and restore, and after offload to disk and restore; pinned buffer checked
  decode rate     16 greedy streams on an 8-stream batch: the engine's counter as tokens/s, and
                  the capacity the agent's meter (throughput.py) measures while streams queue
  swap            bench/swap.py: restore from CPU RAM vs the raw pinned host→device bandwidth
                  measured in the same run (goal >= 70 %)
  vllm 2 models   where vLLM is importable: two vLLM engines sharing one GPU by their grants,
                  both stream; sleep(level=1) frees memory and wake_up() serves the same tokens
  vllm gang       where vLLM is importable and the host has two GPUs: tensor_parallel_size=2
                  bound to the first two uuids
  mesh            etcd + scheduler + agent (--device cuda) + router as processes: a placement
                  names a GPU uuid, a request streams through the router, the node publishes that
                  uuid's measured decode rate

Without a GPU every check skips, unless --allow-cpu runs the device checks on the CPU (CI does
this so the script itself stays working). Missing Python packages are named, not crashed on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.70


@dataclass
class Row:
    check: str
    outcome: str  # pass | FAIL | skip | n/a (ran; its goal cannot be judged here)
    figure: str = ""
    note: str = ""
    seconds: float = 0.0


class Skip(Exception):
    """The check cannot run here (no GPU, no vLLM, one GPU only): its message says why."""


class NotMeasured(Exception):
    """The check ran, but its goal cannot be judged here (on the CPU): outcome "n/a", with the
    figure it got and why the goal does not apply — never a "pass"."""

    def __init__(self, figure: str, why: str) -> None:
        super().__init__(why)
        self.figure = figure


@dataclass
class Context:
    cuda: bool
    device: str  # "cuda:0" or "cpu"
    uuids: list[str]
    tmp: Path
    model: Path
    skip_mesh: bool


def params(max_tokens: int) -> Any:
    from meshserve.nodeagent.engines.params import GenerationParams

    return GenerationParams(max_tokens, 0.0, 1.0, 0, None, (), True)


async def collect(engine: Any, prompt: str, max_tokens: int = 32) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(prompt, [], params(max_tokens)):
        out += chunk.token_ids
    return out


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


# --- the checks ---------------------------------------------------------------------------------


def check_nvml(ctx: Context) -> str:
    from meshserve.nodeagent.devices import open_probe

    if not ctx.cuda:
        raise Skip("no CUDA GPU")
    probe = open_probe("cuda")
    try:
        gpus = probe.read().gpus
    finally:
        probe.close()
    if not gpus:
        raise AssertionError("NVML answered but reports no GPU")
    for g in gpus:
        assert g.uuid.startswith(("GPU-", "MIG-")), g.uuid
        assert g.memory_total_bytes > 0, g
    mig = sum(1 for g in gpus if g.mig)
    names = sorted({g.name for g in gpus})
    return f"{len(gpus)} x {', '.join(names)}, {gib(gpus[0].memory_total_bytes)} each, {mig} MIG"


def check_binding(ctx: Context) -> str:
    import torch
    from meshserve.nodeagent.devices import open_probe
    from meshserve.nodeagent.engines.base import EngineConfig
    from meshserve.nodeagent.engines.torch_device import torch_device

    if not ctx.cuda:
        raise Skip("no CUDA GPU")
    probe = open_probe("cuda")
    try:
        for uuid in ctx.uuids:
            dev = torch_device(EngineConfig(device="cuda:0", visible_devices=(uuid,)))
            assert f"GPU-{torch.cuda.get_device_properties(dev).uuid}" == uuid, (uuid, dev)
            before = {g.uuid: g.memory_used_bytes for g in probe.read().gpus}
            held = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
            torch.cuda.synchronize(dev)
            after = {g.uuid: g.memory_used_bytes for g in probe.read().gpus}
            grew = [u for u in after if after[u] - before.get(u, 0) >= 32 << 20]
            assert grew == [uuid], f"64 MiB on {uuid} showed on {grew}"
            del held
            torch.cuda.empty_cache()
    finally:
        probe.close()
    return f"{len(ctx.uuids)} GPU(s): each uuid's engine device allocates on that GPU only"


async def check_torch_tiers(ctx: Context) -> str:
    from meshserve.nodeagent.engines.base import EngineConfig
    from meshserve.nodeagent.engines.torch_engine import TorchEngine
    from meshserve.v1 import cluster_pb2

    config = EngineConfig(
        device=ctx.device, cache_dir=str(ctx.tmp / "tiers"), visible_devices=tuple(ctx.uuids[:1])
    )
    engine = TorchEngine(config)
    await engine.load(cluster_pb2.ModelSpec(name="check", source=str(ctx.model)))
    try:
        before = await collect(engine, "Once upon a time")
        weights = engine.memory_bytes()
        t0 = time.perf_counter()
        await engine.offload(cluster_pb2.TIER_HOST)
        if ctx.cuda:
            assert engine._host is not None and engine._host.is_pinned(), "host copy not pinned"
        await engine.restore()
        host_s = time.perf_counter() - t0
        assert await collect(engine, "Once upon a time") == before, "tokens changed (CPU RAM)"
        t0 = time.perf_counter()
        await engine.offload(cluster_pb2.TIER_DISK)
        await engine.restore()
        disk_s = time.perf_counter() - t0
        assert await collect(engine, "Once upon a time") == before, "tokens changed (disk)"
    finally:
        await engine.unload()
    return f"{gib(weights)} round trips: CPU RAM {host_s:.3f} s, disk {disk_s:.3f} s"


async def check_decode_rate(ctx: Context) -> str:
    from meshserve.nodeagent.engines.base import EngineConfig
    from meshserve.nodeagent.engines.torch_engine import TorchEngine
    from meshserve.nodeagent.throughput import Sample, Throughput
    from meshserve.v1 import cluster_pb2

    engine = TorchEngine(EngineConfig(device=ctx.device, visible_devices=tuple(ctx.uuids[:1])))
    spec = cluster_pb2.ModelSpec(name="rate", source=str(ctx.model), engine_args={"max_batch": "8"})
    await engine.load(spec)
    meter = Throughput()
    device = ctx.uuids[0] if ctx.uuids else ""
    try:
        await collect(engine, "warm up", 4)
        start, base = time.perf_counter(), engine.stats().generated_tokens
        n = 256 if ctx.cuda else 48
        runs = [asyncio.create_task(collect(engine, f"stream {i}", n)) for i in range(16)]
        while not all(r.done() for r in runs):
            st = engine.stats()
            meter.observe(time.monotonic(), [Sample("rate", (device,), st.generated_tokens,
                                                    st.waiting > 0)])  # fmt: skip
            await asyncio.sleep(0.5)
        await asyncio.gather(*runs)
        counted = (engine.stats().generated_tokens - base) / (time.perf_counter() - start)
    finally:
        await engine.unload()
    (dev,) = meter.devices()
    assert dev.measured, "16 streams on an 8-stream batch never queued"
    return f"{counted:.0f} tok/s counted; meter capacity {dev.capacity_tokens_per_s:.0f} tok/s"


def check_swap(ctx: Context) -> str:
    out = ctx.tmp / "swap.json"
    size = ["--hidden", "2048", "--layers", "16"] if ctx.cuda else ["--layers", "2"]
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "swap.py"), *size, "--json", str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    r = json.loads(out.read_text())
    ratio = float(r["restore_ratio"])
    figure = (
        f"restore {r['restore_from_cpu_bytes_per_s'] / 1e9:.1f} GB/s of raw "
        f"{r['raw_pinned_bytes_per_s'] / 1e9:.1f} GB/s = {ratio:.0%} ({gib(r['model_bytes'])})"
    )
    if not ctx.cuda:
        raise NotMeasured(figure, f"the {GOAL_RATIO:.0%} goal is a GPU's host→device copy")
    assert ratio >= GOAL_RATIO, f"{figure}: below the {GOAL_RATIO:.0%} goal"
    return figure


def vllm_or_skip(ctx: Context, gpus: int = 1) -> None:
    if not ctx.cuda:
        raise Skip("no CUDA GPU")
    if len(ctx.uuids) < gpus:
        raise Skip(f"needs {gpus} GPUs, this host has {len(ctx.uuids)}")
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise Skip(f"vLLM not importable here ({e.name or e})") from None


async def check_vllm_pair(ctx: Context) -> str:
    vllm_or_skip(ctx)
    from meshserve.nodeagent.engines.base import EngineConfig
    from meshserve.nodeagent.engines.vllm_engine import VllmEngine
    from meshserve.v1 import cluster_pb2

    uuid = ctx.uuids[0]
    total = gpu_total(uuid)
    engines = []
    for name in ("first", "second"):
        config = EngineConfig(
            device="cuda:0",
            memory_budget_bytes=int(total * 0.3),
            device_total_bytes=total,
            visible_devices=(uuid,),
        )
        e = VllmEngine(config)
        spec = cluster_pb2.ModelSpec(
            name=name, source=str(ctx.model), engine=cluster_pb2.ENGINE_KIND_VLLM, max_model_len=512
        )
        await e.load(spec)
        engines.append(e)
    try:
        outs = await asyncio.gather(*(collect(e, "Once upon a time") for e in engines))
        assert all(outs), "an engine streamed nothing"
        used = gpu_used(uuid)
        await engines[0].offload(cluster_pb2.TIER_HOST)  # sleep(level=1)
        slept = gpu_used(uuid)
        assert slept < used, f"sleep freed nothing ({gib(used)} → {gib(slept)})"
        await engines[0].restore()  # wake_up()
        assert await collect(engines[0], "Once upon a time") == outs[0], "tokens changed"
    finally:
        for e in engines:
            await e.unload()
    return f"2 engines at 30 % each: {gib(used)} used; sleep freed {gib(used - slept)}"


async def check_vllm_gang(ctx: Context) -> str:
    vllm_or_skip(ctx, gpus=2)
    from meshserve.nodeagent.engines.base import EngineConfig
    from meshserve.nodeagent.engines.vllm_engine import VllmEngine
    from meshserve.v1 import cluster_pb2

    uuids = tuple(ctx.uuids[:2])
    total = gpu_total(uuids[0])
    before = {u: gpu_used(u) for u in ctx.uuids}
    e = VllmEngine(
        EngineConfig(
            device="cuda:0",
            memory_budget_bytes=int(total * 0.6),
            device_total_bytes=total,
            visible_devices=uuids,
        )
    )
    spec = cluster_pb2.ModelSpec(
        name="gang",
        source=str(ctx.model),
        engine=cluster_pb2.ENGINE_KIND_VLLM,
        max_model_len=512,
        gpus_per_replica=2,
        engine_args={"tensor_parallel_size": "2"},
    )
    await e.load(spec)
    try:
        assert await collect(e, "Once upon a time"), "the gang streamed nothing"
        grew = [u for u in ctx.uuids if gpu_used(u) - before[u] > 256 << 20]
    finally:
        await e.unload()
    assert sorted(grew) == sorted(uuids), f"memory grew on {grew}, placed on {list(uuids)}"
    return f"TP=2 on {uuids[0][:12]}…, {uuids[1][:12]}… only"


def nvml_memory(uuid: str) -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid))


def gpu_total(uuid: str) -> int:
    return int(nvml_memory(uuid).total)


def gpu_used(uuid: str) -> int:
    return int(nvml_memory(uuid).used)


async def check_mesh(ctx: Context) -> str:
    if ctx.skip_mesh:
        raise Skip("--skip-mesh")
    from meshserve.localmesh import Mesh
    from meshserve.modelspec import spec_from_dict

    mesh = Mesh(ctx.tmp / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        mesh.start_agent("gpu-0", device="cuda" if ctx.cuda else "cpu")
        mesh.start_router()
        spec = spec_from_dict(
            {"name": "demo", "source": str(ctx.model), "min_replicas": 1, "memory": "64MiB"}
        )
        return await mesh_round_trip(mesh, spec, set(ctx.uuids))
    finally:
        mesh.stop()


async def mesh_round_trip(mesh: Any, spec: Any, uuids: set[str]) -> str:
    import grpc
    import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2, inference_pb2

    keys = Keyspace()
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    store = Store(client, keys)
    try:
        await store.put(keys.model("demo"), spec)
        placement = await until(
            lambda: store.get(keys.placement("gpu-0", "demo"), cluster_pb2.Placement), 60
        )
        # on a GPU host: the GPU's uuid; on a CPU node: none (its memory is device "")
        assert bool(placement.devices) == bool(uuids), placement
        assert set(placement.devices) <= uuids, placement
        request = inference_pb2.GenerateRequest(model="demo", prompt="Once upon a time")
        request.sampling.max_tokens, request.sampling.ignore_eos = 256, True
        async with grpc.aio.insecure_channel(mesh.services["router"].address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)

            async def ready() -> bool:
                got = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
                return any(m.name == "demo" and m.ready_replicas for m in got.models)

            await until(ready, 120)
            tokens = 0
            for _ in range(4):
                async for r in stub.Generate(request, timeout=60):
                    tokens += len(r.token_ids)

        async def rate() -> cluster_pb2.DeviceThroughput | None:
            node = await store.get(keys.node("gpu-0"), cluster_pb2.NodeStatus)
            hits = [t for t in (node.throughput if node else []) if t.decode_tokens_per_s > 0]
            return hits[0] if hits else None

        dev = await until(rate, 20)
        assert dev.device_id in (placement.devices or [""]), (dev, placement)
        where = dev.device_id[:12] + "…" if dev.device_id else "the CPU"
        return f"placed on {where}, {tokens} tokens, {dev.decode_tokens_per_s:.0f} tok/s published"
    finally:
        await client.close()


async def until(probe: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = await probe()
        except Exception:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout_s:.0f} s")
        await asyncio.sleep(0.25)


# --- running them -------------------------------------------------------------------------------

CHECKS: list[tuple[str, Callable[[Context], Any]]] = [
    ("nvml", check_nvml),
    ("binding", check_binding),
    ("torch tiers", check_torch_tiers),
    ("decode rate", check_decode_rate),
    ("swap", check_swap),
    ("vllm 2 models", check_vllm_pair),
    ("vllm gang", check_vllm_gang),
    ("mesh", check_mesh),
]


def missing_packages() -> list[str]:
    need = ["torch", "transformers", "grpc", "aetcd", "pynvml", "rich", "meshserve"]
    out = []
    for name in need:
        try:
            __import__(name)
        except ImportError:
            out.append(name)
    return out


def run_all(ctx: Context, only: set[str]) -> list[Row]:
    rows = []
    for name, check in CHECKS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            got = check(ctx)
            figure = asyncio.run(got) if asyncio.iscoroutine(got) else got
            row = Row(name, "pass", str(figure))
        except Skip as e:
            row = Row(name, "skip", note=str(e))
        except NotMeasured as e:
            row = Row(name, "n/a", e.figure, note=str(e))
        except Exception as e:
            detail = str(e) or type(e).__name__
            if not isinstance(e, AssertionError):
                detail = f"{type(e).__name__}: {detail}"
                traceback.print_exc()
            row = Row(name, "FAIL", note=detail[:300])
        row.seconds = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"{row.check}: {row.outcome} {row.figure or row.note} ({row.seconds} s)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--allow-cpu", action="store_true", help="run device checks on the CPU")
    parser.add_argument("--skip-mesh", action="store_true", help="leave out the process mesh")
    parser.add_argument("--only", action="append", default=[], help="run this check (repeatable)")
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        print(
            f"missing Python packages: {', '.join(missing)}. Install meshserve with its torch "
            "extra (pip install -e '.[torch]'; keep a CUDA torch that is already there), or put "
            "the repository on PYTHONPATH through its typing/ folder.",
            file=sys.stderr,
        )
        return 2
    import torch
    from meshserve.demo_model import build_demo_model
    from rich.console import Console
    from rich.table import Table

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA GPU here: every device check skips (--allow-cpu runs them on the CPU)")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # as agents run (binding.py)
    uuids = []
    if cuda:
        uuids = [
            f"GPU-{torch.cuda.get_device_properties(i).uuid}"
            for i in range(torch.cuda.device_count())
        ]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_model(Path(tmp) / "model", hidden=256, layers=4, intermediate=704)
        ctx = Context(cuda, "cuda:0" if cuda else "cpu", uuids, Path(tmp), model, args.skip_mesh)
        if not cuda and not args.allow_cpu:
            rows = [Row(name, "skip", note="no CUDA GPU") for name, _ in CHECKS]
        else:
            rows = run_all(ctx, set(args.only))
    where = torch.cuda.get_device_name(0) if cuda else "the CPU (no CUDA GPU)"
    table = Table(title=f"meshserve GPU check on {where}")
    for col in ("check", "outcome", "figure / why", "s"):
        table.add_column(col)
    for r in rows:
        why = f"{r.figure} — {r.note}" if r.figure and r.note else r.figure or r.note
        table.add_row(r.check, r.outcome, why, f"{r.seconds:.1f}")
    Console(width=160).print(table)
    if args.json:
        doc = {"device": where, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(doc, indent=2))
    return 1 if any(r.outcome == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
