"""The node's artifact cache: registry files by content, shared by every engine on the node.

Layout under its root::

    blobs/<sha256>            a file of some revision, whole and verified (read-only)
    partial/<sha256>.part     one being fetched (full size, holes where chunks are missing)
    partial/<sha256>.done     the chunks of it already written (JSON), for a resume
    revisions/<revision>/     the model's directory as engines read it: hard links to blobs,
                              named as the manifest says, and the manifest itself
    revisions/<revision>.json its manifest; its mtime is the revision's last use (LRU)

A revision is fetched by `materialize`: the manifest is read from the registry and must hash to
the revision asked for (else `ArtifactError`: the registry holds other weights than the spec
pins); each file missing from ``blobs`` is fetched once however many replicas wait for it (one
task per sha256), in ``chunk_bytes`` ranges, ``parallel`` at a time, each written in place and
recorded so that an interrupted fetch (a killed agent, a dropped connection) resumes with the
chunks it lacks; a whole file is fsynced, checked against its sha256 (a mismatch deletes it and
fails: a corrupted or replaced object is never served) and renamed into ``blobs``. Bounded in
bytes: before a fetch, least recently used revisions that no placed replica uses (``pinned``)
are evicted with the blobs no other revision shares; when only pinned ones are left the fetch is
refused with what holds the space.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import obstore
from meshserve.artifacts.manifest import MANIFEST, File, Manifest, parse, sha256_file
from meshserve.artifacts.s3 import Location, read_pinned, reason

if TYPE_CHECKING:
    from obstore.store import S3Store

log = logging.getLogger(__name__)
CHUNK_BYTES = 16 << 20
PARALLEL = 4

Progress = Callable[[int, int], None]  # (bytes held, bytes of the revision)


class _HasCacheDir(Protocol):
    @property
    def tier_cache_dir(self) -> str: ...

    @property
    def artifact_cache_bytes(self) -> int: ...


class ArtifactError(Exception):
    """Weights that cannot be had as pinned: a mismatch, a full cache, a registry error."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class NodeCache:
    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        pinned: Callable[[], set[str]] = set,
        chunk_bytes: int = CHUNK_BYTES,
        parallel: int = PARALLEL,
    ) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.pinned = pinned  # revisions placed replicas use: never evicted
        self.chunk_bytes = chunk_bytes
        self.parallel = parallel
        self.blobs, self.partial, self.revs = root / "blobs", root / "partial", root / "revisions"
        for d in (self.blobs, self.partial, self.revs):
            d.mkdir(parents=True, exist_ok=True)
        self._fetches: dict[str, asyncio.Task[None]] = {}
        self._listeners: dict[str, list[Callable[[int], None]]] = {}  # per fetch: its waiters
        self._so_far: dict[str, int] = {}  # per fetch: bytes held so far
        self._lock = asyncio.Lock()  # eviction and the decision to fetch
        self.fetched_bytes = 0  # from the registry, since start (tests and metrics read it)
        self.bytes_per_s = 0.0  # the registry's measured bandwidth (smoothed)

    # --- what the node holds -----------------------------------------------------------------

    def revisions(self) -> list[str]:
        """Revisions whose every file is here."""
        return sorted(p.stem for p in self.revs.glob("*.json") if (self.revs / p.stem).is_dir())

    def used_bytes(self) -> int:
        dirs = (self.blobs, self.partial)
        return sum(p.stat().st_size for d in dirs for p in d.iterdir() if p.suffix != ".done")

    def _manifest_of(self, revision: str) -> Manifest | None:
        try:
            return parse((self.revs / f"{revision}.json").read_bytes())
        except (OSError, ValueError):
            return None

    # --- getting a revision ------------------------------------------------------------------

    async def materialize(self, loc: Location, revision: str, progress: Progress) -> Path:
        """The directory of ``revision`` of the model at ``loc``, fetched as needed."""
        done = self.revs / revision
        if done.is_dir() and (self.revs / f"{revision}.json").exists():
            os.utime(self.revs / f"{revision}.json")  # used now
            return done
        store = loc.store()
        try:
            manifest, raw = await read_pinned(loc, revision, store)
        except FileNotFoundError:
            raise ArtifactError(f"{loc.url}: no {MANIFEST} there (push the model first)") from None
        except ValueError as e:  # another revision, or not a manifest
            raise ArtifactError(str(e)) from None
        except Exception as e:
            raise ArtifactError(f"{loc.url}: the registry failed: {reason(e)}") from None
        total = manifest.total_bytes
        held = {f.sha256: f.size for f in manifest.files if (self.blobs / f.sha256).exists()}
        have = [sum(held.values())]
        progress(have[0], total)

        def step(n: int) -> None:
            have[0] += n
            progress(have[0], total)

        async with self._lock:
            need = sum(f.size for f in manifest.files if f.sha256 not in held)
            await asyncio.to_thread(self._make_room, need, revision)
            tasks = [
                self._fetch(store, loc, f, step) for f in manifest.files if f.sha256 not in held
            ]
        await asyncio.gather(*tasks)
        await asyncio.to_thread(self._link, manifest, raw, revision)
        return done

    def _fetch(
        self, store: S3Store, loc: Location, f: File, step: Callable[[int], None]
    ) -> Awaitable[None]:
        """One task per file (sha256) however many revisions and replicas wait for it; each
        waiter's ``step`` hears every byte of it (a late one first what came before it)."""
        task = self._fetches.get(f.sha256)
        if (task is None or task.done()) and (self.blobs / f.sha256).exists():
            step(f.size)  # another fetch brought it since this one looked
            return asyncio.sleep(0)
        if task is None or task.done():
            self._listeners[f.sha256], self._so_far[f.sha256] = [step], 0
            task = asyncio.create_task(self._download(store, loc, f))
            self._fetches[f.sha256] = task
            task.add_done_callback(partial(self._fetched, f.sha256))
        else:
            self._listeners[f.sha256].append(step)
            step(self._so_far[f.sha256])
        return asyncio.shield(task)

    def _fetched(self, sha: str, _task: asyncio.Task[None]) -> None:
        self._fetches.pop(sha, None)
        self._listeners.pop(sha, None)
        self._so_far.pop(sha, None)

    def _step(self, sha: str, n: int) -> None:
        self._so_far[sha] = self._so_far.get(sha, 0) + n
        for listener in self._listeners.get(sha, ()):
            listener(n)

    async def _download(self, store: S3Store, loc: Location, f: File) -> None:
        part, record = self.partial / f"{f.sha256}.part", self.partial / f"{f.sha256}.done"
        chunks = math.ceil(f.size / self.chunk_bytes)
        finished: set[int] = set()
        if part.exists() and part.stat().st_size == f.size and record.exists():
            with contextlib.suppress(ValueError, OSError):
                finished = {int(i) for i in json.loads(record.read_bytes())} & set(range(chunks))
        else:
            with part.open("wb") as out:
                out.truncate(f.size)
        self._step(
            f.sha256, sum(min(self.chunk_bytes, f.size - i * self.chunk_bytes) for i in finished)
        )
        fd = os.open(part, os.O_WRONLY)
        sem, recording = asyncio.Semaphore(self.parallel), asyncio.Lock()
        started, fetched = time.monotonic(), 0

        async def one(i: int) -> None:
            nonlocal fetched
            start = i * self.chunk_bytes
            end = min(f.size, start + self.chunk_bytes)
            async with sem:
                try:
                    data = await obstore.get_range_async(
                        store, loc.key(f.path), start=start, end=end
                    )  # type: ignore[arg-type]
                except Exception as e:
                    raise ArtifactError(
                        f"{loc.url}/{f.path}: the registry failed: {reason(e)}"
                    ) from None
                if len(data) != end - start:
                    raise ArtifactError(f"{loc.url}/{f.path}: short read (the object changed?)")
                await asyncio.to_thread(os.pwrite, fd, memoryview(data), start)
                finished.add(i)
                async with recording:  # one writer: the record names every chunk written
                    done = json.dumps(sorted(finished)).encode()
                    await asyncio.to_thread(_write_atomic, record, done)
                fetched += end - start
                self.fetched_bytes += end - start
                self._step(f.sha256, end - start)

        try:
            await asyncio.gather(*(one(i) for i in range(chunks) if i not in finished))
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        elapsed = time.monotonic() - started
        if fetched and elapsed > 0:
            rate = fetched / elapsed
            self.bytes_per_s = rate if not self.bytes_per_s else 0.7 * self.bytes_per_s + 0.3 * rate
        got = await asyncio.to_thread(sha256_file, part)
        if got != f.sha256:
            part.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
            raise ArtifactError(
                f"{loc.url}/{f.path}: sha256 {got[:12]}… is not the manifest's {f.sha256[:12]}…: "
                "the registry's object is corrupted or was replaced; refusing it"
            )
        blob = self.blobs / f.sha256
        os.chmod(part, 0o444)
        part.replace(blob)
        record.unlink(missing_ok=True)
        _fsync_dir(self.blobs)

    def _link(self, manifest: Manifest, raw: bytes, revision: str) -> None:
        """The revision's directory: hard links to its blobs, built aside and renamed in."""
        final = self.revs / revision
        if final.is_dir():
            return
        tmp = self.revs / f".{revision}.{secrets.token_hex(6)}.tmp"
        for f in manifest.files:
            dest = tmp / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.blobs / f.sha256, dest)
        (tmp / MANIFEST).write_bytes(raw)
        _write_atomic(self.revs / f"{revision}.json", raw)
        try:
            tmp.rename(final)
        except OSError:  # another replica's materialize linked it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
        _fsync_dir(self.revs)

    # --- room --------------------------------------------------------------------------------

    def _make_room(self, need: int, wanted: str) -> None:
        """Evicts least recently used revisions no placed replica uses until ``need`` more bytes
        fit; raises ArtifactError when they cannot."""
        if not self.capacity_bytes:
            return
        pinned = self.pinned() | {wanted}
        by_age = sorted(
            (p.stat().st_mtime, p.stem) for p in self.revs.glob("*.json") if p.stem not in pinned
        )
        while self.used_bytes() + need > self.capacity_bytes and by_age:
            _, victim = by_age.pop(0)
            self._drop(victim)
        if self.used_bytes() + need > self.capacity_bytes:
            raise ArtifactError(
                f"the node's artifact cache is full: {need} bytes more do not fit in "
                f"{self.capacity_bytes} (held by models placed here: {sorted(pinned - {wanted})})"
            )

    def _drop(self, revision: str) -> None:
        manifest = self._manifest_of(revision)
        shutil.rmtree(self.revs / revision, ignore_errors=True)
        (self.revs / f"{revision}.json").unlink(missing_ok=True)
        if manifest is None:
            return
        kept = {
            f.sha256 for r in self.revisions() for f in (self._manifest_of(r) or Manifest(())).files
        }
        for f in manifest.files:
            if f.sha256 not in kept and f.sha256 not in self._fetches:
                (self.blobs / f.sha256).unlink(missing_ok=True)
                (self.partial / f"{f.sha256}.part").unlink(missing_ok=True)
                (self.partial / f"{f.sha256}.done").unlink(missing_ok=True)
        log.info("artifact cache: evicted revision %s", revision[:12])


def node_cache(config: _HasCacheDir, pinned: Callable[[], set[str]]) -> NodeCache:
    """An agent's cache under ``<cache_dir>/artifacts``: ``artifact_cache_bytes``, else half the
    size of the filesystem it is on."""
    root = Path(config.tier_cache_dir) / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    capacity = config.artifact_cache_bytes
    if not capacity:
        st = os.statvfs(root)
        capacity = st.f_blocks * st.f_frsize // 2
    return NodeCache(root, capacity, pinned)
