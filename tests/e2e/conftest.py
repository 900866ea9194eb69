"""A real mesh of processes (etcd, schedulers, agents, router) and client helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import cluster_pb2, inference_pb2, nodeagent_pb2, nodeagent_pb2_grpc

from tests.waiting import eventually

pytestmark = pytest.mark.e2e


def free_port() -> int:
    """A loopback port free now (for servers whose port must be known before they start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def apply(mesh: Mesh, spec: cluster_pb2.ModelSpec) -> None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).put(Keyspace().model(spec.name), spec)
    finally:
        await client.close()


def model_spec(name: str, source: Path | str, **extra: object) -> cluster_pb2.ModelSpec:
    doc: dict[str, object] = {
        "name": name,
        "source": str(source),
        "max_model_len": 2048,
        "kv_headroom": "16MiB",
        "memory": "1MiB",
        **extra,
    }
    return spec_from_dict(doc)


@dataclass
class Streamed:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    messages: int = 0
    final: inference_pb2.GenerateResponse | None = None
    headers: dict[str, str] = field(default_factory=dict)


async def generate(
    address: str, request: inference_pb2.GenerateRequest, timeout: float = 30
) -> Streamed:
    out = Streamed()
    async with grpc.aio.insecure_channel(address) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=timeout)
        async for msg in call:
            out.messages += 1
            out.text += msg.text
            out.token_ids.extend(msg.token_ids)
            if msg.finish_reason:
                out.final = msg
        out.headers = {k: str(v) for k, v in (await call.initial_metadata() or ())}
    return out


async def counted_stream(
    address: str, model: str, tokens: int, started: asyncio.Event, prompt: str = "stream"
) -> tuple[int, str]:
    """A greedy stream of ``tokens`` tokens through ``address`` on a channel of its own,
    setting ``started`` at its first message: (tokens received, the router's
    meshserve-failovers trailer)."""
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt)
    request.sampling.max_tokens, request.sampling.temperature = tokens, 0.0
    request.sampling.ignore_eos = True
    options = (("grpc.use_local_subchannel_pool", 1),)
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=60)
        got = 0
        async for msg in call:
            got += len(msg.token_ids)
            started.set()
        trailers = dict(await call.trailing_metadata() or ())
    return got, str(trailers.get("meshserve-failovers", "?"))


@contextlib.asynccontextmanager
async def ready_history(store: Store, every_s: float = 0.05) -> AsyncIterator[list[dict[str, str]]]:
    """While the block runs, where each model is READY (`ready_nodes`), sampled every
    ``every_s``: the list the block gets fills as it runs and ends with its last sample."""
    from meshserve.nodeagent.fleet import ready_nodes

    seen: list[dict[str, str]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(await ready_nodes(store))
            await asyncio.sleep(every_s)

    watcher = asyncio.create_task(watch())
    try:
        yield seen
    finally:
        done.set()
        await watcher


async def ready_replicas(address: str, model: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        listing = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    return sum(m.ready_replicas for m in listing.models if m.name == model)


async def known(address: str, model: str) -> bool:
    """True once the server at ``address`` lists ``model`` (its watch has seen the spec)."""
    async with grpc.aio.insecure_channel(address) as ch:
        listing = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    return any(m.name == model for m in listing.models)


async def replica_records(mesh: Mesh) -> list[cluster_pb2.ReplicaStatus]:
    """Every replica record in the mesh's etcd (replicas/<model>/<node>), as the agents wrote."""
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        entries, _ = await Store(client, Keyspace()).list(
            Keyspace().replicas(), cluster_pb2.ReplicaStatus
        )
    finally:
        await client.close()
    return [e.value for e in entries]


def status_text(mesh: Mesh) -> str:
    """`meshserve status` against the mesh's etcd, as an operator runs it (wide terminal)."""
    out = subprocess.run(
        [sys.executable, "-m", "meshserve", "status", "--etcd", mesh.etcd.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def read_spans(trace_dir: Path) -> list[dict[str, Any]]:
    spans = []
    for f in trace_dir.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


@contextlib.contextmanager
def demo_mesh(
    root: Path,
    demo_model: Path,
    agents: int = 1,
    min_replicas: int = 1,
    lease_ttl_s: int = 2,
    trace_dir: Path | None = None,
    agent_flags: Sequence[str] = (),
    router_flags: Sequence[str] = (),
) -> Iterator[Mesh]:
    """etcd, a scheduler, ``agents`` agents (each with ``agent_flags``) and a router (with
    ``router_flags``), serving the demo model with ``min_replicas`` READY replicas before it
    yields; then a clean stop (every service exits 0)."""
    m = Mesh(root, lease_ttl_s=lease_ttl_s, trace_dir=trace_dir)
    try:
        m.start_etcd()
        m.start_scheduler()
        for i in range(agents):
            m.start_agent(f"agent-{i}", extra=agent_flags)
        m.start_router(extra=router_flags)
        asyncio.run(apply(m, model_spec("demo", demo_model, min_replicas=min_replicas)))
        router = m.services["router"].address

        async def enough() -> bool:
            return await ready_replicas(router, "demo") >= min_replicas

        asyncio.run(eventually(enough, 120, f"{min_replicas} READY replica(s) of demo"))
        yield m
    except BaseException:
        m.stop()
        raise
    assert_clean_stop(m)


def assert_clean_stop(m: Mesh) -> None:
    """Stops the mesh; every service that was running must exit 0 within the stop timeout
    (`Mesh.stop` SIGKILLs a straggler and reports -9), and no log may hold a context leak."""
    codes = m.stop()
    unclean = {name: code for name, code in codes.items() if code != 0}
    assert not unclean, f"unclean stop {unclean}: " + "; ".join(m.tail(n, 5) for n in unclean)
    # A span entered in one context and left in another (a stream's generator closed by the
    # loop's finalizer instead of its own task) is a bug even when every request succeeded.
    for name, service in m.services.items():
        log = service.log.read_text(errors="replace") if service.log.exists() else ""
        assert "Failed to detach context" not in log, f"{name}: {m.tail(name, 20)}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    m = Mesh(root, lease_ttl_s=2, trace_dir=root / "traces")
    try:
        m.start_etcd()
        m.start_scheduler("scheduler-0")
        m.start_scheduler("scheduler-1")
        m.start_agent("agent-0")
        m.start_agent("agent-1")
        m.start_router()
        asyncio.run(apply(m, model_spec("demo", demo_model, aliases=["tiny"], min_replicas=1)))
        asyncio.run(
            eventually(
                lambda: ready_replicas(m.services["router"].address, "demo"), 90, "demo READY"
            )
        )
        yield m
    finally:
        m.stop()


async def agent_load(mesh: Mesh, node: str, model: str) -> nodeagent_pb2.ReplicaLoad:
    """What the agent ``node`` says of its replica of ``model``: requests in flight in its
    engine, tokens generated (GetNodeStatus)."""
    async with grpc.aio.insecure_channel(mesh.services[node].address) as ch:
        status = await nodeagent_pb2_grpc.NodeAgentStub(ch).GetNodeStatus(
            nodeagent_pb2.GetNodeStatusRequest(), timeout=15
        )
    load: nodeagent_pb2.ReplicaLoad = next(x for x in status.load if x.model == model)
    return load


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("MESHSERVE_VLLM_PYTHON", "")
    if not python:
        pytest.skip("MESHSERVE_VLLM_PYTHON is not set (the README's test command sets it)")
    python = os.path.abspath(python)  # not resolve(): the venv's symlink is what makes it a venv
    probe = subprocess.run(
        [python, "-c", "import vllm, meshserve; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, f"{python} cannot import vllm and meshserve:\n{probe.stderr}"
    return python
