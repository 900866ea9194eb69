"""Waking an asleep replica rather than queueing (issue 24, part 3) in a real mesh: etcd, a
scheduler, two simulated nodes of one stream each (`--max-in-flight 1`) and a router. A model
scaled from two replicas to one keeps the spare asleep in CPU RAM (with its agent's restore
estimate); a request that finds the READY replica's slot taken makes the router ask the
scheduler for a wake, and is served by the woken replica while the long stream that held the
slot still runs."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import pytest
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import cluster_pb2, inference_pb2

from tests.e2e.conftest import apply, free_port, generate, ready_replicas, replica_records
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
MODEL = "w-sim"
S = cluster_pb2


def _spec(min_replicas: int) -> cluster_pb2.ModelSpec:
    return spec_from_dict(
        {"name": MODEL, "source": "sim://w", "engine": "sim", "memory": "256MiB",
         "min_replicas": min_replicas, "max_replicas": 2, "scale_down_delay_s": 1,
         "engine_args": {"ttft_ms": "2", "itl_ms": "20"}}
    )  # fmt: skip


def _request(tokens: int) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=MODEL, prompt="Wake up")
    req.sampling.max_tokens, req.sampling.temperature = tokens, 0.0
    req.sampling.ignore_eos = True
    return req


def _metric(text: str, outcome: str) -> float:
    return sum(
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("meshserve_router_wakes_total{") and f'outcome="{outcome}"' in ln
    )


def test_a_saturated_replica_wakes_the_asleep_one_instead_of_queueing(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    metrics_port = free_port()
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        flags = ["--simulate", "2", "--memory-limit", "4GiB", "--max-in-flight", "1"]
        mesh.start_agent("fleet", device="cpu", extra=flags)
        router = mesh.start_router(extra=["--metrics-port", str(metrics_port)])
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        async def records(state: int) -> list[cluster_pb2.ReplicaStatus]:
            return [r for r in await replica_records(mesh) if r.model == MODEL and r.state == state]

        async def scenario() -> None:
            await apply(mesh, _spec(min_replicas=2))

            async def two() -> bool:
                ready = len(await records(S.REPLICA_STATE_READY))
                return ready == 2 and await ready_replicas(router.address, MODEL) == 2

            await eventually(two, 60, "2 READY replicas", 0.2)
            await apply(mesh, _spec(min_replicas=1))  # scaled down: the spare goes to sleep

            async def spare() -> cluster_pb2.ReplicaStatus | None:
                asleep = await records(S.REPLICA_STATE_OFFLOADED)
                return asleep[0] if asleep and asleep[0].tier == S.TIER_HOST else None

            sleeper = await eventually(spare, 60, "the spare replica asleep in CPU RAM", 0.2)
            assert sleeper.restore_seconds > 0  # the agent's estimate, for routers
            [awake] = await records(S.REPLICA_STATE_READY)

            # A long stream takes the READY replica's only slot ...
            started = asyncio.Event()

            async def long_stream() -> str:
                async with grpc.aio.insecure_channel(router.address) as ch:
                    call = inference_pb2_grpc.InferenceStub(ch).Generate(_request(400), timeout=60)
                    async for _msg in call:
                        started.set()
                    return str(dict(await call.initial_metadata() or ())["meshserve-node"])

            holder = asyncio.create_task(long_stream())
            await asyncio.wait_for(started.wait(), 30)
            # ... so the next request wakes the sleeper and is served there, while the long
            # stream still runs (queued, it would have waited for the slot: ~8 s).
            served = await generate(router.address, _request(4), timeout=30)
            assert served.headers["meshserve-node"] == sleeper.node_id != awake.node_id
            assert not holder.done()
            assert await holder == awake.node_id
            text = await asyncio.to_thread(_read, url)
            assert _metric(text, "asked") == 1 and _metric(text, "woken") == 1, text

        asyncio.run(scenario())
    finally:
        mesh.stop()


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())
