"""A model with min_replicas 0 scales to zero after its idle timeout and serves again on the next
request through the router's cold-start path (real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import apply, generate, known, model_spec, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def idle_mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("idle"), lease_ttl_s=2)
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_router()
        asyncio.run(apply(m, model_spec("sleepy", demo_model, min_replicas=0, idle_timeout_s=3)))
        yield m
    finally:
        m.stop()


async def test_scales_to_zero_after_idle_timeout_and_serves_again(idle_mesh: Mesh) -> None:
    router = idle_mesh.services["router"].address
    await eventually(lambda: known(router, "sleepy"), 5, "router to see the model")
    assert await ready_replicas(router, "sleepy") == 0  # nothing placed before any demand
    request = inference_pb2.GenerateRequest(model="sleepy", prompt="Once upon a time")
    request.sampling.max_tokens = 8
    request.sampling.temperature = 0.0  # greedy: the same text before and after
    first = await generate(router, request, timeout=60)  # cold start
    assert first.final is not None

    async def scaled_to_zero() -> bool:
        return await ready_replicas(router, "sleepy") == 0

    # Idle timeout 3 s, then the scheduler's next round (resync every 5 s) removes it.
    await eventually(scaled_to_zero, 20, "the idle model scaled to zero")
    again = await generate(router, request, timeout=60)  # back through the cold-start path
    assert again.final is not None and again.token_ids == first.token_ids
    assert await ready_replicas(router, "sleepy") == 1
