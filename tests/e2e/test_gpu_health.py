"""A GPU that turns sick under a serving replica, through real processes: two node agents on hosts
with one GPU each (the GPUs are what is absent here: a stand-in NVML answers for them,
tests/standins/pynvml.py, and the test injects an Xid by rewriting one host's description), a
scheduler, a router and a sim model streaming. The sick device is judged FAILED in NodeStatus
with its reason, the model moves to the healthy node make before break while a stream runs (the
stream completes exactly), nothing new is placed on it, and once an operator clears it
(`meshserve node uncordon NODE --device UUID`) it is OK again."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import (
    apply,
    assert_clean_stop,
    generate,
    model_spec,
    replica_records,
    status_text,
)
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
STANDINS = Path(__file__).resolve().parents[1] / "standins"
HOSTS = {"gpu-a": "GPU-A0", "gpu-b": "GPU-B0"}


def describe(path: Path, uuid: str, **faults: object) -> None:
    path.write_text(json.dumps({"gpus": [{"uuid": uuid, "total": 80 << 30, **faults}]}))


@pytest.fixture(scope="module")
def gmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("gpu-health")
    m = Mesh(root, lease_ttl_s=2)
    pythonpath = os.pathsep.join(p for p in (str(STANDINS), os.environ.get("PYTHONPATH")) if p)
    try:
        m.start_etcd()
        m.start_scheduler()
        for node, uuid in HOSTS.items():
            describe(root / f"{node}.json", uuid)
            env = {"MESHSERVE_STANDIN_NVML": str(root / f"{node}.json"), "PYTHONPATH": pythonpath}
            m.start_agent(node, device="cuda", env=env)
        m.start_router()
        yield m
    except BaseException:
        m.stop()
        raise
    assert_clean_stop(m)


async def gpu(mesh: Mesh, node: str) -> S.GpuDevice | None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        status = await Store(client, Keyspace()).get(Keyspace().node(node), S.NodeStatus)
    finally:
        await client.close()
    return status.gpus[0] if status is not None and status.gpus else None


async def ready_on(mesh: Mesh, model: str) -> set[str]:
    return {
        r.node_id
        for r in await replica_records(mesh)
        if r.model == model and r.state == S.REPLICA_STATE_READY
    }


def request(tokens: int) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model="simgpu", prompt="a sick GPU")
    r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = tokens, 0.0, True
    return r


async def test_gpu_health_failed_device_is_evacuated_and_cleared(gmesh: Mesh) -> None:
    for node, uuid in HOSTS.items():
        got = await eventually(lambda node=node: gpu(gmesh, node), 30, f"{node}'s GPU")  # type: ignore[misc]
        assert got.uuid == uuid and got.health == S.DEVICE_HEALTH_OK, got
    spec = model_spec("simgpu", "sim://gpu", engine="sim", memory="1GiB", min_replicas=1)
    spec.engine_args.update(ttft_ms="5", itl_ms="20")
    await apply(gmesh, spec)
    (sick,) = await eventually(lambda: ready_on(gmesh, "simgpu"), 60, "simgpu READY")
    healthy = next(n for n in HOSTS if n != sick)
    router = gmesh.services["router"].address
    expected = (await generate(router, request(300), timeout=60)).token_ids
    running = asyncio.create_task(generate(router, request(300), timeout=60))
    await asyncio.sleep(0.5)  # the stream is under way on the sick node
    describe(gmesh.data_dir / f"{sick}.json", HOSTS[sick], xids=[79])  # the GPU falls off

    async def failed() -> S.GpuDevice | None:
        g = await gpu(gmesh, sick)
        return g if g is not None and g.health == S.DEVICE_HEALTH_FAILED else None

    judged = await eventually(failed, 15, f"{sick}'s GPU FAILED in its NodeStatus")
    assert "Xid 79: the GPU fell off the bus" in list(judged.health_reasons)
    # Make before break: READY on the healthy node first, then gone from the sick one.
    await eventually(
        lambda: _only(gmesh, "simgpu", healthy), 60, f"simgpu only on {healthy}, READY"
    )
    done = await running
    assert done.token_ids == expected  # the stream ran through the move, exactly
    status = await asyncio.to_thread(status_text, gmesh)
    assert "FAILED" in status and "Xid 79" in status
    # Nothing new on the FAILED device: a second model goes to the healthy node too.
    other = model_spec("simgpu2", "sim://gpu2", engine="sim", memory="1GiB", min_replicas=1)
    await apply(gmesh, other)
    assert await eventually(lambda: ready_on(gmesh, "simgpu2"), 60, "simgpu2 READY") == {healthy}
    # The operator resets the GPU and clears it: OK again.
    describe(gmesh.data_dir / f"{sick}.json", HOSTS[sick])
    cleared = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshserve", "node", "uncordon", sick, "--device", HOSTS[sick],
         "--etcd", gmesh.etcd.endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cleared.returncode == 0, cleared.stderr

    async def well() -> bool:
        g = await gpu(gmesh, sick)
        return g is not None and g.health == S.DEVICE_HEALTH_OK and not g.health_reasons

    await eventually(well, 15, f"{sick}'s GPU OK after the clear")
    wrong = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshserve", "node", "uncordon", sick, "--device", "GPU-NOPE",
         "--etcd", gmesh.etcd.endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert wrong.returncode == 1 and "has no device GPU-NOPE" in wrong.stderr


async def _only(mesh: Mesh, model: str, node: str) -> bool:
    records = [r for r in await replica_records(mesh) if r.model == model]
    return [(r.node_id, r.state) for r in records] == [(node, S.REPLICA_STATE_READY)]
