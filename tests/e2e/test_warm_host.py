"""`warm_in: host` with real processes: a model whose minimum may sleep in CPU RAM is loaded on a
device, leaves it for pinned CPU RAM once idle (no GPU held, the minimum still kept), comes back
on the next request by a restore (not a load from the source) with the same greedy output, and
is loaded again elsewhere when the node that held its only copy dies."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import apply, generate, model_spec, replica_records
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
IDLE_S = 3  # the model's idle timeout


@pytest.fixture(scope="module")
def warm_mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("warm"), lease_ttl_s=2)
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_agent("agent-1")
        m.start_router()
        spec = model_spec("warm", demo_model, min_replicas=1, warm_in="host", idle_timeout_s=IDLE_S)
        asyncio.run(apply(m, spec))
        yield m
    except BaseException:
        m.stop()
        raise
    m.stop()


async def _copies(mesh: Mesh) -> list[S.ReplicaStatus]:
    return [r for r in await replica_records(mesh) if r.model == "warm"]


async def _one(mesh: Mesh, state: int, tier: int) -> S.ReplicaStatus | None:
    """Its only copy, when that is in ``state`` at ``tier``."""
    copies = await _copies(mesh)
    if len(copies) == 1 and copies[0].state == state and copies[0].tier == tier:
        return copies[0]
    return None


def _request() -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model="warm", prompt="Once upon a time")
    r.sampling.max_tokens = 8
    r.sampling.temperature = 0.0
    return r


async def test_a_warm_minimum_sleeps_in_cpu_ram_when_idle_and_a_request_restores_it(
    warm_mesh: Mesh,
) -> None:
    router = warm_mesh.services["router"].address
    READY, ASLEEP = S.REPLICA_STATE_READY, S.REPLICA_STATE_OFFLOADED
    # Never loaded: its minimum is met on a device first, from the source; never asked for, it
    # is idle at once and sleeps in pinned CPU RAM (the minimum still kept: one copy)
    asleep = await eventually(lambda: _one(warm_mesh, ASLEEP, S.TIER_HOST), 60, "asleep in RAM")
    assert asleep.loaded_from == "source", asleep
    before = await generate(router, _request(), timeout=60)
    first = await _one(warm_mesh, READY, S.TIER_DEVICE)
    assert first is not None and first.node_id == asleep.node_id, await _copies(warm_mesh)
    assert first.loaded_from == "TIER_HOST", first  # restored, not loaded again
    # Idle for its timeout: back to CPU RAM
    await eventually(lambda: _one(warm_mesh, ASLEEP, S.TIER_HOST), 30, "asleep after its use")
    # The next request waits for a restore from CPU RAM on that node again, same greedy output
    after = await generate(router, _request(), timeout=60)
    assert after.token_ids == before.token_ids
    back = await _one(warm_mesh, READY, S.TIER_DEVICE)
    assert back is not None and back.node_id == asleep.node_id, await _copies(warm_mesh)
    assert back.loaded_from == "TIER_HOST", back


async def test_a_warm_minimum_whose_node_dies_is_loaded_again_on_another(warm_mesh: Mesh) -> None:
    asleep = await eventually(
        lambda: _one(warm_mesh, S.REPLICA_STATE_OFFLOADED, S.TIER_HOST), 60, "asleep in RAM"
    )
    warm_mesh.kill(asleep.node_id, signal.SIGKILL)
    other = "agent-1" if asleep.node_id == "agent-0" else "agent-0"

    async def elsewhere() -> bool:
        return any(
            r.node_id == other and r.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_OFFLOADED)
            for r in await _copies(warm_mesh)
        )

    # Its lease expires (2 s), the copy is gone: loaded on the other agent, then asleep there
    await eventually(elsewhere, 60, "a copy on the other agent")
    await eventually(
        lambda: _one(warm_mesh, S.REPLICA_STATE_OFFLOADED, S.TIER_HOST), 60, "asleep there"
    )
    assert (await _copies(warm_mesh))[0].node_id == other
