"""etcd as a three-member cluster under the mesh (`Mesh(etcd_members=3)`, `meshserve up
--etcd-members 3`): every service gets all three addresses and fails over between them. Losing
one member goes unnoticed beyond a retry; losing quorum stops changes (no placement is
written) while routers and agents keep serving READY models from what they hold, and the mesh
recovers by itself when quorum returns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from meshserve.cluster.etcd_process import EtcdCluster
from meshserve.localmesh import Mesh
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import apply, assert_clean_stop, generate, model_spec, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
QUORUM_LOSS_S = 30.0


@pytest.fixture(scope="module")
def emesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("etcd-cluster"), lease_ttl_s=3, etcd_members=3)
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_router()
        yield m
    except BaseException:
        m.stop()
        raise
    assert_clean_stop(m)


def members(mesh: Mesh) -> EtcdCluster:
    assert isinstance(mesh.etcd, EtcdCluster)
    return mesh.etcd


def request(model: str) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt="quorum")
    r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = 8, 0.0, True
    return r


async def place(mesh: Mesh, name: str) -> None:
    spec = model_spec(name, f"sim://{name}", engine="sim", memory="64MiB", min_replicas=1)
    spec.engine_args.update(ttft_ms="2", itl_ms="2")
    await apply(mesh, spec)
    router = mesh.services["router"].address
    await eventually(lambda: ready_replicas(router, name), 60, f"{name} READY")


async def serve_during(mesh: Mesh, model: str, seconds: float) -> tuple[int, list[str]]:
    """Requests back to back for ``seconds``: (served, failures)."""
    router = mesh.services["router"].address
    served, failures = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out = await generate(router, request(model), timeout=10)
            assert len(out.token_ids) == 8
            served += 1
        except grpc.aio.AioRpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")
        await asyncio.sleep(0.05)
    return served, failures


async def test_etcd_member_loss_goes_unnoticed(emesh: Mesh) -> None:
    await place(emesh, "before")
    cluster = members(emesh)
    cluster.members[0].kill()  # the first address every client was given
    try:
        served, failures = await serve_during(emesh, "before", 5.0)
        assert not failures and served > 20, (served, failures[:3])
        await place(emesh, "during-member-loss")  # placements still made: quorum holds
    finally:
        cluster.members[0].start()


async def test_etcd_quorum_loss_keeps_serving_and_recovers_by_itself(emesh: Mesh) -> None:
    await place(emesh, "steady")
    cluster = members(emesh)
    for m in cluster.members[1:]:
        m.kill()  # two of three gone: no quorum, no writes, no linearizable reads
    try:
        served, failures = await serve_during(emesh, "steady", QUORUM_LOSS_S)
        # Every request to a READY model was served from what routers and agents hold.
        assert not failures and served > 50, (served, failures[:3])
        assert all(s.alive() for s in emesh.services.values())
    finally:
        for m in cluster.members[1:]:
            m.start()
    # Recovery without a hand on it: the same replica serves, and changes are placed again.
    out = await generate(emesh.services["router"].address, request("steady"), timeout=10)
    assert len(out.token_ids) == 8
    await place(emesh, "after-quorum-loss")
