"""Demand shifts among three models on two agents that fit one model each (--memory-limit): the
scheduler evicts to CPU RAM and restores on demand where the model waits; greedy outputs are
identical across the swap (real etcd, scheduler, agents and router processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2, inference_pb2

from tests.e2e.conftest import apply, generate, known, model_spec, read_spans, replica_records
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("tiers")
    m = Mesh(root, lease_ttl_s=2, trace_dir=root / "traces")
    try:
        m.start_etcd()
        m.start_scheduler()
        # Each model needs (1 MiB + 16 MiB KV headroom) x 1.15 ≈ 19.6 MiB: one fits in 24 MiB.
        m.start_agent("agent-0", memory_limit="24MiB", host_memory_limit="1GiB")
        m.start_agent("agent-1", memory_limit="24MiB", host_memory_limit="1GiB")
        m.start_router()
        for name in ("x", "y", "z"):
            asyncio.run(apply(m, model_spec(name, demo_model, min_replicas=0)))
        yield m
    finally:
        m.stop()


async def replicas(mesh: Mesh) -> dict[str, cluster_pb2.ReplicaStatus]:
    return {r.model: r for r in await replica_records(mesh)}


def greedy(model: str) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt="Once upon a time")
    r.sampling.max_tokens = 24
    r.sampling.temperature = 0.0
    return r


def state_is(model: str, state: int, tier: int) -> object:
    async def probe(mesh: Mesh) -> bool:
        r = (await replicas(mesh)).get(model)
        return r is not None and r.state == state and r.tier == tier

    return probe


async def test_demand_shift_swaps_models_through_cpu_ram(small_mesh: Mesh) -> None:
    router = small_mesh.services["router"].address
    for name in ("x", "y", "z"):
        await eventually(lambda n=name: known(router, n), 5, f"router to see {name}")  # type: ignore[misc]
    x_before = await generate(router, greedy("x"), timeout=60)
    await generate(router, greedy("y"), timeout=60)  # the other agent: nothing evicted
    placed = await replicas(small_mesh)
    node_x, node_y = placed["x"].node_id, placed["y"].node_id
    assert node_x != node_y

    # z is asked for: no room anywhere; x (least recently used) goes to CPU RAM, z takes its GPU.
    await generate(router, greedy("z"), timeout=60)
    offloaded = state_is("x", cluster_pb2.REPLICA_STATE_OFFLOADED, cluster_pb2.TIER_HOST)
    await eventually(lambda: offloaded(small_mesh), 15, "x offloaded to CPU RAM")  # type: ignore[operator]
    assert (await replicas(small_mesh))["z"].node_id == node_x
    assert (await replicas(small_mesh))["y"].state == cluster_pb2.REPLICA_STATE_READY

    # x is asked for again: it is restored where it waits (not loaded elsewhere from the
    # source) and outputs are identical. Three models are in demand for two GPUs, so the two
    # most recently used stay: y, the least recently used, ends in CPU RAM.
    x_after = await generate(router, greedy("x"), timeout=60)
    assert x_after.token_ids == x_before.token_ids
    assert x_after.text == x_before.text
    await _restore_links_back_to_the_eviction(small_mesh, x_after.headers["traceresponse"])
    y_off = state_is("y", cluster_pb2.REPLICA_STATE_OFFLOADED, cluster_pb2.TIER_HOST)
    await eventually(lambda: y_off(small_mesh), 20, "y offloaded to CPU RAM")  # type: ignore[operator]
    z_ready = state_is("z", cluster_pb2.REPLICA_STATE_READY, cluster_pb2.TIER_DEVICE)
    await eventually(lambda: z_ready(small_mesh), 20, "z serving again")  # type: ignore[operator]
    x = (await replicas(small_mesh))["x"]
    assert x.node_id == node_x
    assert x.state == cluster_pb2.REPLICA_STATE_READY and x.tier == cluster_pb2.TIER_DEVICE
    assert x.transition_seconds > 0  # it came back through a restore
    assert x.predicted_bytes > 0 and x.memory_bytes > 0


async def _restore_links_back_to_the_eviction(mesh: Mesh, traceresponse: str) -> None:
    """The request that waited for x's restore links the restore; the restore links the round
    that asked for it and the offload it undoes; the offload links the round that evicted x."""
    assert mesh.trace_dir is not None
    trace_id = "0x" + traceresponse.split("-")[1]

    def found() -> dict[str, dict[str, Any]] | None:
        spans = read_spans(mesh.trace_dir)  # type: ignore[arg-type]
        by_id = {s["context"]["span_id"]: s for s in spans}

        def linked(span: dict[str, Any]) -> list[dict[str, Any]]:
            ids = [link["context"]["span_id"] for link in span.get("links") or []]
            return [by_id[i] for i in ids if i in by_id]

        for pick in spans:
            if pick["name"] != "router.pick" or pick["context"]["trace_id"] != trace_id:
                continue
            restore = next((s for s in linked(pick) if s["name"] == "model.restore"), None)
            if restore is None:
                continue
            offload = next((s for s in linked(restore) if s["name"] == "model.offload"), None)
            rounds = [s for s in linked(restore) if s["name"] == "scheduler.round"]
            if offload is None or not rounds:
                continue
            evicted_by = [s for s in linked(offload) if s["name"] == "scheduler.round"]
            summary = [
                s
                for s in spans
                if s["name"] == "cold_start.load" and s["parent_id"] == pick["context"]["span_id"]
            ]
            if evicted_by and summary:
                return {
                    "restore": restore,
                    "offload": offload,
                    "eviction": evicted_by[0],
                    "summary": summary[0],
                }
        return None

    chain = await eventually(found, 15, "x's restore linked back to its eviction")
    assert chain["offload"]["attributes"]["gen_ai.request.model"] == "x"
    assert chain["offload"]["attributes"]["meshserve.tier.to"] == "TIER_HOST"
    # Inside the request's trace: the wait's load part says it was a restore from host RAM.
    summary = chain["summary"]["attributes"]
    assert summary["meshserve.load.from"] == "TIER_HOST"
    assert "0x" + summary["meshserve.linked.span_id"] == chain["restore"]["context"]["span_id"]
    events = chain["eviction"].get("events", [])
    assert any(
        e["attributes"].get("gen_ai.request.model") == "x" and e["name"] in ("evict", "place")
        for e in events
    ), events
