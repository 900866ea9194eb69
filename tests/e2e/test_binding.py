"""Engines run on the GPUs their placement names, by uuid: a real node agent (vLLM engine, CPU
build) on a host that NVML describes as 8 GPUs, two of them MIG-partitioned (a stand-in NVML:
the GPUs are what is absent here, see tests/standins/pynvml.py). Placements are written to etcd
as the scheduler leader writes them; each engine-core process vLLM spawns must see exactly the
placement's devices in CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2 as S
from meshserve.weights import grant_bytes

from tests.e2e.conftest import model_spec
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
AGENT = "gpu-host"
GIB = 2**30
STANDINS = Path(__file__).resolve().parents[1] / "standins"
EPOCH = 1


def host(path: Path) -> Path:
    gpus = [{"uuid": f"GPU-{i:04d}", "total": 80 * GIB} for i in range(6)]
    for parent in (6, 7):
        gpus.append(
            {
                "uuid": f"GPU-{parent:04d}",
                "total": 80 * GIB,
                "children": [{"uuid": f"MIG-{parent}-{k}", "total": 10 * GIB} for k in range(2)],
            }
        )
    path.write_text(json.dumps({"gpus": gpus}))
    return path


@pytest.fixture(scope="module")
def gpu_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Path]]:
    python = os.environ.get("MESHSERVE_VLLM_PYTHON", "")
    if not python:
        pytest.skip("MESHSERVE_VLLM_PYTHON not set (README: the vLLM environment)")
    root = tmp_path_factory.mktemp("binding")
    from meshserve.demo_model import build_demo_model

    model = build_demo_model(root / "model")
    env = {
        "MESHSERVE_STANDIN_NVML": str(host(root / "nvml.json")),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(STANDINS), os.environ.get("PYTHONPATH")) if p
        ),
    }
    m = Mesh(root, lease_ttl_s=3, env=env)
    try:
        m.start_etcd()
        m.start_agent(AGENT, threads=1, python=python, timeout_s=180)
        yield m, model
    finally:
        m.stop(timeout_s=30)


async def place(mesh: Mesh, name: str, model: Path, devices: list[str]) -> None:
    """What the scheduler leader writes: the spec, then a placement naming ``devices``."""
    spec = model_spec(name, model, engine="vllm", max_model_len=512)
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    keys = Keyspace()
    try:
        store = Store(client, keys)
        await store.put(keys.model(name), spec)
        placement = S.Placement(
            model=name,
            node_id=AGENT,
            epoch=EPOCH,
            memory_bytes=grant_bytes(spec.memory_bytes, spec.kv_headroom_bytes),
            devices=devices,
        )
        placement.tier = S.TIER_DEVICE
        await store.put(keys.placement(AGENT, name), placement)
    finally:
        await client.close()


async def replica(mesh: Mesh, name: str) -> S.ReplicaStatus | None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        return await Store(client, Keyspace()).get(Keyspace().replica(name, AGENT), S.ReplicaStatus)
    finally:
        await client.close()


async def settled(mesh: Mesh, name: str) -> S.ReplicaStatus | None:
    r = await replica(mesh, name)
    if r is not None and r.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_FAILED):
        return r
    return None


def engine_cores(pid: int) -> dict[int, dict[str, str]]:
    """Environment of every vLLM engine-core process below ``pid``."""
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for kid in kids:
                todo.append(kid)
                try:
                    cmd = Path(f"/proc/{kid}/cmdline").read_bytes()
                    raw = Path(f"/proc/{kid}/environ").read_bytes()
                except OSError:
                    continue
                if b"VLLM::EngineCore" in cmd:
                    pairs = (x.split(b"=", 1) for x in raw.split(b"\0") if b"=" in x)
                    found[kid] = {k.decode(): v.decode(errors="replace") for k, v in pairs}
    return found


async def test_engines_see_only_their_placements_visible_devices(
    gpu_mesh: tuple[Mesh, Path],
) -> None:
    mesh, model = gpu_mesh
    agent_pid = mesh.services[AGENT].proc.pid
    await place(mesh, "on-gpu3", model, ["GPU-0003"])
    first = await eventually(lambda: settled(mesh, "on-gpu3"), 240, "on-gpu3 to settle")
    assert first.state == S.REPLICA_STATE_READY, first.error
    before = set(engine_cores(agent_pid))
    await place(mesh, "on-mig", model, ["MIG-7-1"])
    second = await eventually(lambda: settled(mesh, "on-mig"), 240, "on-mig to settle")
    assert second.state == S.REPLICA_STATE_READY, second.error
    cores = engine_cores(agent_pid)
    seen = sorted(env.get("CUDA_VISIBLE_DEVICES", "") for env in cores.values())
    assert seen == ["GPU-0003", "MIG-7-1"], cores.keys()  # each its own, never each other's
    newer = [env for pid, env in cores.items() if pid not in before]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in newer] == ["MIG-7-1"]
    # The agent's own environment is left as it was: no device list leaks into later engines.
    agent_env = Path(f"/proc/{agent_pid}/environ").read_bytes()
    assert b"CUDA_VISIBLE_DEVICES" not in agent_env


async def test_a_placement_on_a_gpu_the_host_lacks_fails_with_what_it_has(
    gpu_mesh: tuple[Mesh, Path],
) -> None:
    mesh, model = gpu_mesh
    await place(mesh, "nowhere", model, ["GPU-9999"])
    r = await eventually(lambda: settled(mesh, "nowhere"), 60, "nowhere to settle")
    assert r.state == S.REPLICA_STATE_FAILED
    assert "GPU-9999, which this node does not have" in r.error and "GPU-0003" in r.error
    assert mesh.services[AGENT].alive()


async def test_the_agent_publishes_the_hosts_gpus_and_mig_instances(
    gpu_mesh: tuple[Mesh, Path],
) -> None:
    """What the agent's NVML probe made of the host, as the scheduler reads it from etcd: six
    whole GPUs and the MIG instances of the two partitioned ones (a partitioned GPU is placed
    on only through its instances), each with its memory."""
    mesh, _model = gpu_mesh
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        node = await Store(client, Keyspace()).get(Keyspace().node(AGENT), S.NodeStatus)
    finally:
        await client.close()
    assert node is not None and node.device_kind == "cuda"
    memory = {g.uuid: g.memory_total_bytes for g in node.gpus}
    whole = {f"GPU-{i:04d}": 80 * GIB for i in range(6)}
    mig = {f"MIG-{p}-{k}": 10 * GIB for p in (6, 7) for k in range(2)}
    assert memory == whole | mig, memory
