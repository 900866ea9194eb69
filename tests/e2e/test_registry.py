"""A model from a registry through a real mesh: a real S3 server (SeaweedFS, tests/s3server.py),
etcd, a scheduler, two agents with empty artifact caches and a router. `meshserve model push`
uploads the demo model with its manifest, `meshserve model apply` pins its revision, both agents
cold-start it from the registry (each file fetched once per node) and it serves; the nodes
publish the revision they cache; after the registry's content changes, `model apply` of a
file that pins the old revision is refused, and agents refuse a pinned revision the registry
does not hold (never the wrong weights)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from meshserve.artifacts.manifest import build
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2, inference_pb2

from tests import s3server
from tests.e2e.conftest import free_port, generate, ready_replicas, replica_records
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
S = cluster_pb2


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "meshserve", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_registry_cold_start_on_empty_caches_and_a_stale_revision_refused(
    tmp_path: Path, demo_model: Path
) -> None:
    server = s3server.start(tmp_path / "s3")
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        for name in ("agent-0", "agent-1"):
            mesh.start_agent(name)
        router = mesh.start_router().address
        pushed = cli(
            "model", "push", str(demo_model), "s3://models/demo", "--endpoint", server.endpoint
        )
        revision = pushed.stdout.split("revision ")[-1].split()[0]
        assert len(revision) == 64, pushed.stdout
        doc = tmp_path / "reg-demo.yaml"
        doc.write_text(
            f"name: reg-demo\nsource: s3://models/demo\nendpoint: {server.endpoint}\n"
            "min_replicas: 2\nmax_model_len: 2048\nkv_headroom: 16MiB\n"
        )
        applied = cli("model", "apply", str(doc), "--etcd", mesh.etcd.endpoint)
        assert f"revision {revision[:12]}" in applied.stdout, applied.stdout

        async def scenario() -> None:
            async def two_ready() -> bool:
                return await ready_replicas(router, "reg-demo") >= 2

            await eventually(two_ready, 120, "2 READY", 0.2)
            request = inference_pb2.GenerateRequest(model="reg-demo", prompt="Once upon a time")
            request.sampling.max_tokens, request.sampling.temperature = 8, 0.0
            request.sampling.ignore_eos = True
            got = await generate(router, request, timeout=60)
            assert len(got.token_ids) == 8
            manifest_files = len(demo_files(demo_model))
            for name in ("agent-0", "agent-1"):  # each node fetched each file once
                blobs = list((mesh.data_dir / "cache" / name / "artifacts" / "blobs").iterdir())
                assert len(blobs) == manifest_files, blobs

            async def published() -> bool:
                nodes = await _nodes(mesh)
                return len(nodes) == 2 and all(revision in n.cached_revisions for n in nodes)

            await eventually(published, 30, "both nodes publish the cached revision", 0.2)

            # The registry's content changes under the same prefix; a spec that still pins the
            # old revision must not be served the new bytes.
            changed = tmp_path / "changed"
            changed.mkdir()
            for f in demo_files(demo_model):
                (changed / f.name).write_bytes(f.read_bytes())
            (changed / "generation_config.json").write_text('{"changed": true}')
            push = (
                "model",
                "push",
                str(changed),
                "s3://models/demo",
                "--endpoint",
                server.endpoint,
            )
            await asyncio.to_thread(cli, *push)
            stale = tmp_path / "stale.yaml"
            stale.write_text(
                f"name: reg-stale\nsource: s3://models/demo\nendpoint: {server.endpoint}\n"
                f"revision: {revision}\nmemory: 1MiB\nmin_replicas: 1\nmax_model_len: 2048\n"
                "kv_headroom: 16MiB\n"
            )
            apply = [sys.executable, "-m", "meshserve", "model", "apply", str(stale)]
            refused = await asyncio.to_thread(
                subprocess.run,
                [*apply, "--etcd", mesh.etcd.endpoint],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refused.returncode != 0 and "not the" in refused.stderr + refused.stdout
            # A pin the nodes do not cache and the registry does not hold (a spec written past
            # the CLI, e.g. a GitOps copy of weights never pushed there): the agents refuse it.
            # (The old revision itself is still served where it is cached: content-addressed,
            # those are exactly the pinned bytes.)
            other = tmp_path / "other"
            other.mkdir()
            (other / "config.json").write_text('{"other": true}')
            never_pushed = build(other).revision
            spec = cluster_pb2.ModelSpec(
                name="reg-stale", source="s3://models/demo", source_endpoint=server.endpoint,
                revision=never_pushed, memory_bytes=1 << 20, kv_headroom_bytes=16 << 20,
                min_replicas=1, max_model_len=2048,
            )  # fmt: skip
            client = connect(EtcdConfig(mesh.etcd.endpoint))
            try:
                await Store(client, Keyspace()).put(Keyspace().model("reg-stale"), spec)
            finally:
                await client.close()

            async def failed() -> cluster_pb2.ReplicaStatus | None:
                for r in await replica_records(mesh):
                    if r.model == "reg-stale" and r.state == S.REPLICA_STATE_FAILED:
                        return r
                return None

            r = await eventually(failed, 60, "the stale revision refused", 0.2)
            assert "refusing weights that do not match" in r.error, r.error
            # The model from the first push goes on serving.
            assert len((await generate(router, request, timeout=60)).token_ids) == 8

        asyncio.run(scenario())
    finally:
        mesh.stop()
        server.stop()


def demo_files(model: Path) -> list[Path]:
    return [p for p in sorted(model.rglob("*")) if p.is_file() and not p.name.startswith(".")]


async def _nodes(mesh: Mesh) -> list[cluster_pb2.NodeStatus]:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        got = await client.get_prefix(Keyspace().nodes())
        return [cluster_pb2.NodeStatus.FromString(kv.value) for kv in got]
    finally:
        await client.close()


def test_registry_up_serves_the_demo_from_a_local_registry(tmp_path: Path) -> None:
    """`meshserve up --registry`: the whole path locally — a local S3 server, the demo pushed and
    pinned, the agent fetching it into its cache, a completion streamed — and nothing left."""
    data = tmp_path / "up"
    done = subprocess.run(
        [sys.executable, "-m", "meshserve", "up", "--registry", "--exit-after-demo",
         "--agents", "1", "--data-dir", str(data), "--port", str(free_port()),
         "--http-port", "0", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # The demo samples from random weights: it may stop early (CI saw 2 tokens and STOP).
    streamed = re.search(r"(\d+) tokens from agent-0", out)
    assert "demo pinned at revision" in out and streamed and int(streamed[1]) >= 1, out
    revision = out.split("demo pinned at revision ")[1].split()[0]
    cached = list((data / "cache" / "agent-0" / "artifacts" / "revisions").glob("*.json"))
    assert [p.stem[:12] for p in cached] == [revision], cached
    weed = subprocess.run(["pgrep", "-f", f"weed -logdir={data}"], capture_output=True)
    assert weed.returncode == 1, "the registry outlived `meshserve up`"
