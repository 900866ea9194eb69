"""A model's registry: an S3-compatible object store (MinIO, SeaweedFS, Ceph RGW, AWS S3).

The client is `obstore` (the Rust object_store crate: async, parallel ranged reads at several
hundred MB/s on loopback here, SigV4, retries with backoff; DESIGN §7). Path-style addressing
(what MinIO and SeaweedFS serve); credentials and a session token from the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` variables (in
Kubernetes: a Secret mounted as those variables, deploy/). Plain HTTP is allowed only for an
explicit ``http://`` endpoint (a registry on a private network or loopback).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshserve.artifacts.manifest import MANIFEST, Manifest, build, parse

if TYPE_CHECKING:  # obstore is imported where a registry is used (modelspec reads this module)
    from obstore.store import S3Store

SCHEME = "s3://"
PUT_PARALLEL = 4
CONNECT_TIMEOUT, TIMEOUT, RETRY_S = "5s", "300s", 30.0


def reason(e: BaseException) -> str:
    """A registry error in one line: obstore's message without its Rust debug dump."""
    return " ".join(str(e).split("\n\nDebug source")[0].split()) or type(e).__name__


def is_registry(source: str) -> bool:
    return source.startswith(SCHEME)


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing "/")
    endpoint: str = ""  # "" = AWS's own
    region: str = ""

    @classmethod
    def parse(cls, source: str, endpoint: str = "", region: str = "") -> Location:
        """``s3://bucket/prefix``; raises ValueError saying what is wrong."""
        if not is_registry(source):
            raise ValueError(f"source: an s3://bucket/prefix URL expected, got {source!r}")
        bucket, _, prefix = source[len(SCHEME) :].partition("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"source: no bucket in {source!r}")
        prefix = prefix.strip("/")
        if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
            raise ValueError(f"source: bad prefix in {source!r}")
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint: an http(s):// URL expected, got {endpoint!r}")
        return cls(bucket, prefix, endpoint, region)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def store(self) -> S3Store:
        from obstore.store import S3Store

        config: dict[str, Any] = {"virtual_hosted_style_request": False}
        if self.endpoint:
            config["endpoint"] = self.endpoint
        config["region"] = self.region or os.environ.get("AWS_REGION", "") or "us-east-1"
        # A registry that is down fails a load within about half a minute (obstore's defaults
        # retry for 3 minutes) with the reason; one chunk may take up to TIMEOUT.
        options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "timeout": TIMEOUT}
        if self.endpoint.startswith("http://"):
            options["allow_http"] = True
        retry = {"max_retries": 4, "retry_timeout": timedelta(seconds=RETRY_S)}
        return S3Store(self.bucket, config=config, client_options=options, retry_config=retry)  # type: ignore[arg-type]


async def read_manifest(loc: Location, store: S3Store | None = None) -> tuple[Manifest, bytes]:
    """The prefix's manifest and its bytes (raises ValueError when it is not a manifest,
    FileNotFoundError when there is none)."""
    import obstore

    got = await obstore.get_async(store or loc.store(), loc.key(MANIFEST))
    data = bytes(await got.bytes_async())
    return parse(data), data


async def read_pinned(
    loc: Location, revision: str, store: S3Store | None = None
) -> tuple[Manifest, bytes]:
    """`read_manifest`, which must hash to ``revision``: else ValueError (the registry holds
    other weights than the spec pins)."""
    manifest, raw = await read_manifest(loc, store)
    if manifest.revision != revision:
        raise ValueError(
            f"{loc.url} holds revision {manifest.revision[:12]}…, the spec pins "
            f"{revision[:12]}…: refusing weights that do not match (apply the model again "
            "to serve the new revision)"
        )
    return manifest, raw


async def push(
    directory: Path, loc: Location, progress: Callable[[int, int], None] | None = None
) -> Manifest:
    """Uploads every file of ``directory`` under the prefix, then the manifest (last: a reader
    who finds a manifest finds its files). ``progress(uploaded, total)``: bytes, after each
    file."""
    import obstore

    manifest = await asyncio.to_thread(build, directory)
    store = loc.store()
    sem = asyncio.Semaphore(PUT_PARALLEL)
    done = 0

    async def put(path: str, size: int) -> None:
        nonlocal done
        async with sem:
            await obstore.put_async(store, loc.key(path), directory / path)
        done += size
        if progress is not None:
            progress(done, manifest.total_bytes)

    await asyncio.gather(*(put(f.path, f.size) for f in manifest.files))
    await obstore.put_async(store, loc.key(MANIFEST), manifest.to_bytes())
    return manifest


async def fetch_files(loc: Location, revision: str, wanted: set[str], dest: Path) -> list[str]:
    """The files of ``revision`` named in ``wanted`` (those it has) into ``dest``, each checked
    against the manifest's sha256 (small files: a router's tokenizer); raises ValueError when
    the registry holds another revision or a file does not match."""
    import hashlib

    import obstore

    store = loc.store()
    manifest, _raw = await read_pinned(loc, revision, store)
    got = []
    for f in manifest.files:
        if f.path not in wanted:
            continue
        data = bytes(await (await obstore.get_async(store, loc.key(f.path))).bytes_async())
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise ValueError(f"{loc.url}/{f.path}: sha256 does not match the manifest")
        (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
        (dest / f.path).write_bytes(data)
        got.append(f.path)
    return got
