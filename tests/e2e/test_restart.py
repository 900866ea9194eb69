"""The only replica's agent dies and comes back while a request waits: the request is served
once it is back, and the error it would have got says what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2, inference_pb2

from tests.e2e.conftest import demo_mesh, generate, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    with demo_mesh(tmp_path_factory.mktemp("restart"), demo_model) as m:
        yield m


async def test_request_waits_out_the_only_agents_restart(mesh: Mesh) -> None:
    router = mesh.services["router"].address
    request = inference_pb2.GenerateRequest(model="demo", prompt="Hello")
    request.sampling.max_tokens = 8
    request.sampling.ignore_eos = True  # exactly 8 tokens, whatever the random weights say
    mesh.kill("agent-0")  # its replica stays in the table until the lease expires
    waiting = asyncio.create_task(generate(router, request, timeout=90))
    # The request failed on the dead agent and now waits in the router's queue (the router
    # publishes that in its demand record).
    await eventually(lambda: _queued(mesh), 20, "the request to wait in the router's queue")
    assert not waiting.done()
    mesh.start_agent("agent-0")  # same node: the scheduler's placement brings the model back
    out = await waiting
    assert len(out.token_ids) == 8 and out.final is not None
    assert int(out.headers["meshserve-attempts"]) >= 2  # it failed on the dead one first


async def test_without_a_replica_the_error_says_why(mesh: Mesh) -> None:
    router = mesh.services["router"].address
    mesh.kill("agent-0")
    await eventually(lambda: _none_ready(router), 30, "the replica to leave the table")
    request = inference_pb2.GenerateRequest(model="demo", prompt="Hello")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(router, request, timeout=3)
    details = f"{e.value.code().name}: {e.value.details()}"
    assert "DEADLINE_EXCEEDED" in details and "demo" in details
    assert "is starting" not in details  # nothing is starting: no agent is alive
    mesh.start_agent("agent-0")
    await eventually(lambda: ready_replicas(router, "demo"), 90, "demo READY again")


async def _queued(mesh: Mesh) -> bool:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        entries, _ = await Store(client, Keyspace()).list(
            Keyspace().demands(), cluster_pb2.RouterDemand
        )
    finally:
        await client.close()
    return any(m.model == "demo" and m.queued for e in entries for m in e.value.models)


async def _none_ready(router: str) -> bool:
    return await ready_replicas(router, "demo") == 0
