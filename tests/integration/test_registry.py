"""The node's artifact cache against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
push with a manifest, fetch once, resume an interrupted fetch, refuse corrupted objects and
revisions that do not match, evict what no placed replica uses, and only that."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from meshserve.artifacts import s3
from meshserve.artifacts.cache import ArtifactError, NodeCache
from meshserve.artifacts.manifest import MANIFEST, parse, sha256_file
from meshserve.router.core.prefixes import Tokenizers
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2

from tests import s3server
from tests.waiting import eventually

MB = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    srv = s3server.start(tmp_path_factory.mktemp("s3"))
    yield srv
    srv.stop()


def model_dir(root: Path, seed: int, size: int = 3 * MB) -> Path:
    d = root / f"model-{seed}"
    (d / "tokenizer").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(hashlib.shake_256(str(seed).encode()).digest(size))
    (d / "config.json").write_text(f'{{"seed": {seed}}}')
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return d


async def pushed(
    server: s3server.S3Server, tmp: Path, name: str, seed: int
) -> tuple[s3.Location, str]:
    loc = server.location(name)
    manifest = await s3.push(model_dir(tmp, seed), loc)
    return loc, manifest.revision


async def test_registry_push_fetches_once_into_a_model_directory(
    server: s3server.S3Server, tmp_path: Path
) -> None:
    loc = server.location("once")
    uploads: list[tuple[int, int]] = []
    revision = (
        await s3.push(model_dir(tmp_path, 1), loc, lambda d, t: uploads.append((d, t)))
    ).revision
    manifest, _ = await s3.read_manifest(loc)
    # push reports its progress after each file, ending at the whole
    assert len(uploads) == len(manifest.files) and uploads[-1] == (manifest.total_bytes,) * 2
    assert manifest.revision == revision and manifest.weights_bytes() == 3 * MB
    cache = NodeCache(tmp_path / "cache", 0, chunk_bytes=MB // 2)
    seen: list[list[tuple[int, int]]] = [[], []]
    # Two replicas ask at once: each file is fetched once, and each hears all of its progress.
    a, b = await asyncio.gather(
        cache.materialize(loc, revision, lambda h, t: seen[0].append((h, t))),
        cache.materialize(loc, revision, lambda h, t: seen[1].append((h, t))),
    )
    assert a == b and cache.fetched_bytes == manifest.total_bytes
    for progress in seen:
        assert progress[-1] == (manifest.total_bytes, manifest.total_bytes), progress
        assert [h for h, _t in progress] == sorted(h for h, _t in progress)
    src = tmp_path / "model-1"
    for f in manifest.files:
        assert (a / f.path).read_bytes() == (src / f.path).read_bytes()
    assert parse((a / MANIFEST).read_bytes()).revision == revision
    assert cache.revisions() == [revision]
    await cache.materialize(loc, revision, lambda h, t: None)  # a third: from the cache
    assert cache.fetched_bytes == manifest.total_bytes


async def test_registry_interrupted_fetch_resumes_with_the_chunks_it_lacks(
    server: s3server.S3Server, tmp_path: Path
) -> None:
    loc, revision = await pushed(
        server,
        tmp_path,
        "resume",
        2,
    )
    total = (await s3.read_manifest(loc))[0].total_bytes
    first = NodeCache(tmp_path / "cache", 0, chunk_bytes=MB // 4, parallel=1)
    got = [0]
    fetch = asyncio.create_task(
        first.materialize(loc, revision, lambda h, t: got.__setitem__(0, h))
    )
    await eventually(lambda: got[0] >= MB, 30, "1 MB fetched", 0.005)
    for task in list(first._fetches.values()):  # the agent dies mid-fetch
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert first.revisions() == []
    again = NodeCache(tmp_path / "cache", 0, chunk_bytes=MB // 4)  # the agent restarted
    path = await again.materialize(loc, revision, lambda h, t: None)
    assert total - again.fetched_bytes > MB // 2  # what was written before is not fetched again
    assert sha256_file(path / "model.safetensors") == sha256_file(
        tmp_path / "model-2" / "model.safetensors"
    )


async def test_registry_corrupted_object_and_wrong_revision_are_refused(
    server: s3server.S3Server, tmp_path: Path
) -> None:
    loc, revision = await pushed(server, tmp_path, "corrupt", 3)
    cache = NodeCache(tmp_path / "cache", 0)
    with pytest.raises(ArtifactError, match="spec pins"):
        await cache.materialize(loc, "0" * 64, lambda h, t: None)
    # Same size, other bytes: only the sha256 can tell.
    await obstore.put_async(loc.store(), loc.key("model.safetensors"), os.urandom(3 * MB))
    with pytest.raises(ArtifactError, match="corrupted or was replaced"):
        await cache.materialize(loc, revision, lambda h, t: None)
    manifest, _ = await s3.read_manifest(loc)
    weights = next(f.sha256 for f in manifest.files if f.path == "model.safetensors")
    assert cache.revisions() == [] and not (tmp_path / "cache" / "blobs" / weights).exists()
    assert not list((tmp_path / "cache" / "partial").glob("*.part"))


async def test_registry_cache_evicts_unplaced_revisions_first_and_never_placed_ones(
    server: s3server.S3Server, tmp_path: Path
) -> None:
    revs = [await pushed(server, tmp_path, f"evict-{i}", 10 + i) for i in range(3)]
    placed: set[str] = set()
    cache = NodeCache(tmp_path / "cache", int(6.5 * MB), pinned=lambda: placed)
    (a_loc, a), (b_loc, b), (c_loc, c) = revs
    await cache.materialize(a_loc, a, lambda h, t: None)
    placed.add(a)  # a replica of A is placed here
    await cache.materialize(b_loc, b, lambda h, t: None)  # B: cached, not placed
    await cache.materialize(c_loc, c, lambda h, t: None)  # no room for C: B goes, A stays
    assert sorted(cache.revisions()) == sorted([a, c])
    placed.add(c)
    with pytest.raises(ArtifactError, match="cache is full"):  # A and C are both placed
        await cache.materialize(b_loc, b, lambda h, t: None)
    placed.discard(a)
    await cache.materialize(b_loc, b, lambda h, t: None)
    assert sorted(cache.revisions()) == sorted([b, c])
    assert cache.used_bytes() <= 6.5 * MB


async def test_registry_model_s_tokenizer_reaches_the_router_checked(
    server: s3server.S3Server, tmp_path: Path, demo_model: Path
) -> None:
    """A router hashes a registry model's prompts (prefix routing) with the tokenizer and chat
    template fetched from the registry at the pinned revision: the same tokens as from the
    model's directory; a pin the registry does not hold gives no tokenizer (routing by load)."""
    loc = server.location("tok/demo")
    manifest = await s3.push(demo_model, loc)
    spec = S.ModelSpec(
        name="t", source=loc.url, source_endpoint=server.endpoint, revision=manifest.revision
    )
    local = S.ModelSpec(name="t-local", source=str(demo_model))
    tokenizers = Tokenizers()
    await asyncio.to_thread(tokenizers.load, spec)
    await asyncio.to_thread(tokenizers.load, local)
    chat = inference_pb2.GenerateRequest(model="t")
    chat.messages.add(role="user", content="Where is my cached prefix?")
    plain = inference_pb2.GenerateRequest(model="t", prompt="Once upon a time")
    for req in (chat, plain):
        assert tokenizers.tokens(spec, req) == tokenizers.tokens(local, req) != []
    stale = S.ModelSpec(
        name="s", source=loc.url, source_endpoint=server.endpoint, revision="a" * 64
    )
    await asyncio.to_thread(tokenizers.load, stale)
    assert tokenizers.tokens(stale, plain) == []
