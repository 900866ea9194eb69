"""`meshserve router --workers 2`: two router processes share one port (SO_REUSEPORT). Streams
opened on separate connections are served by both (each worker's own metrics count what it
served, and the counts add up to what was sent); a worker killed with SIGKILL is restarted by its
parent and serves again; SIGTERM stops the parent and every worker cleanly and frees the port."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest
from meshserve.localmesh import Mesh
from meshserve.nodeagent.fleet import sim_spec
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from tests.e2e.conftest import apply, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
SENT = 24


def served(metrics_port: int) -> float | None:
    """Generate requests this worker's router served, from its Prometheus endpoint (None while
    it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    pattern = r'meshserve_requests_total\{code="OK",model="w-sim",service="router"\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.add(int(entry.name))
    return found


async def stream_once(address: str) -> int:
    """One stream on a connection of its own (a local subchannel pool: gRPC would otherwise share
    one connection among a process's channels to the same address, and so one worker)."""
    request = inference_pb2.GenerateRequest(model="w-sim", prompt="workers")
    request.sampling.max_tokens = 8
    options = (("grpc.use_local_subchannel_pool", 1),)
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        tokens = 0
        async for msg in inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=30):
            tokens += len(msg.token_ids)
    return tokens


async def listed_ready(address: str) -> int:
    options = (("grpc.use_local_subchannel_pool", 1),)
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        listing = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    return sum(m.ready_replicas for m in listing.models if m.name == "w-sim")


def test_two_router_workers_share_a_port_restart_and_stop_cleanly(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    metrics = free_port()
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        mesh.start_agent("w", device="cpu", extra=["--simulate", "1", "--memory-limit", "4GiB"])
        router = mesh.start_router(extra=["--workers", "2", "--metrics-port", str(metrics)])
        workers = router.info["workers"]
        assert len(workers) == 2  # type: ignore[arg-type]
        pids = {int(w["pid"]) for w in workers}  # type: ignore[union-attr,index]
        assert pids == children(router.proc.pid)
        address = router.address

        async def serve_and_count() -> None:
            await apply(mesh, sim_spec("w-sim", "256MiB", "64MiB"))

            async def both_ready() -> bool:
                # Each worker has its own route table; new connections reach either.
                counts = await asyncio.gather(*(listed_ready(address) for _ in range(8)))
                return all(counts)

            await eventually(both_ready, 60, "w-sim READY in both workers' tables", 0.2)
            before = [served(metrics) or 0.0, served(metrics + 1) or 0.0]
            tokens = await asyncio.gather(*(stream_once(address) for _ in range(SENT)))
            assert tokens == [8] * SENT
            after = [served(metrics) or 0.0, served(metrics + 1) or 0.0]
            per_worker = [a - b for a, b in zip(after, before, strict=True)]
            assert sum(per_worker) == SENT, per_worker  # every stream counted by one worker
            assert all(n > 0 for n in per_worker), per_worker  # the kernel spread them

        asyncio.run(serve_and_count())

        # A worker dies hard: its parent starts another on the same port.
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> set[int] | None:
            now = children(router.proc.pid)
            return now if len(now) == 2 and victim not in now else None

        asyncio.run(eventually(replaced, 30, "a new worker in place of the killed one", 0.1))

        async def all_serving() -> bool:
            if served(metrics) is None or served(metrics + 1) is None:
                return False
            counts = await asyncio.gather(*(listed_ready(address) for _ in range(8)))
            return all(counts)

        asyncio.run(eventually(all_serving, 60, "both workers serving after the restart", 0.2))
        assert asyncio.run(stream_once(address)) == 8
        after_restart = children(router.proc.pid)

        # SIGTERM: the parent stops its workers gracefully, then exits 0; the port is free.
        os.kill(router.proc.pid, signal.SIGTERM)
        assert router.proc.wait(30) == 0, mesh.tail("router")
        for pid in after_restart:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)

        async def refused() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stream_once(address)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(refused())
    finally:
        mesh.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
