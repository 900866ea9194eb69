"""vLLM's KV-cache events, translated into `meshserve.kvblocks` events for the routers.

vLLM publishes its prefix cache's changes over ZMQ (``kv_events_config``, DESIGN §7): frames of
topic, an 8-byte big-endian sequence number and a msgpack `KVEventBatch` of `BlockStored` (block
hashes, the parent's hash, the blocks' token ids, the block size, the medium, and per block the
extra keys: LoRA name, multimodal ids, the cache salt), `BlockRemoved` and `AllBlocksCleared`.
The endpoint is a Unix socket in a private directory: vLLM's PUB socket binds it, this SUB socket
connects (ZMQ retries until the engine is up).

vLLM's block hashes are its own (by default sha256 over pickle, seeded): the router cannot
compute them from a prompt. The token ids in each event can: a block's name here is the chained
`kvblocks.chain` hash over its tokens from its parent's name, the first block's parent being the
root of its salt (from the event's extra keys) — exactly what the router computes from the
prompt. The map from vLLM's hashes to ours lives here, bounded by what vLLM still holds.

A gap in the sequence means events were lost: what vLLM holds is then unknown, so the routers are
told everything is cleared (they keep routing by their own sends) and the map starts over. A
block whose parent is unknown (it arrived before a resync) is skipped with its descendants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from meshserve.kvblocks import DEVICE, HOST, Cleared, Event, Removed, Stored, chain, root

log = logging.getLogger(__name__)
MEDIA = {"GPU": DEVICE, "CPU": HOST}  # vLLM's media; others (STORAGE) are not routed by
TOPIC = b"meshserve-kv"


def salt_of(extra: Sequence[Any] | None, lora: str | None) -> tuple[str, ...]:
    """The root extras of a first block from vLLM's extra keys: the adapter (first, when the
    event names one) and the cache salt (the string after any multimodal pairs)."""
    strings = [x for x in extra or () if isinstance(x, str)]
    if lora and strings and strings[0] == lora:
        strings = strings[1:]
    return tuple(s for s in (lora or "", strings[0] if strings else "") if s)


class Translator:
    """vLLM events → ours (pure; unit-tested without vLLM or ZMQ)."""

    def __init__(self) -> None:
        self.ours: dict[int, int] = {}  # vLLM hash → our hash, for blocks vLLM holds
        self.media: dict[int, set[int]] = {}  # vLLM hash → where vLLM holds it (GPU, CPU)
        self.last_seq = -1
        self.skipped = 0  # blocks whose chain could not be named (parent unknown)

    def batch(self, seq: int, events: Sequence[Any]) -> list[Event]:
        out: list[Event] = []
        if self.last_seq >= 0 and seq != self.last_seq + 1:
            log.warning("vLLM KV events %d..%d lost: routers forget this replica's blocks",
                        self.last_seq + 1, seq - 1)  # fmt: skip
            self.ours.clear()
            self.media.clear()
            out.append(Cleared())
        self.last_seq = seq
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif kind == "BlockRemoved":
                medium = MEDIA.get(ev.medium or "GPU")
                if medium is None:
                    continue
                gone = tuple(h for v in ev.block_hashes if (h := self._remove(_key(v), medium)))
                if gone:
                    out.append(Removed(gone, medium))
            elif kind == "AllBlocksCleared":
                self.ours.clear()
                self.media.clear()
                out.append(Cleared())
        return out

    def _stored(self, ev: Any) -> Stored | None:
        medium = MEDIA.get(ev.medium or "GPU")
        if medium is None:
            return None
        size = int(ev.block_size)
        if ev.parent_block_hash is None:
            extra = ev.extra_keys[0] if ev.extra_keys else None
            parent = root(*salt_of(extra, ev.lora_name))
        else:
            known = self.ours.get(_key(ev.parent_block_hash))
            if known is None:
                self.skipped += len(ev.block_hashes)
                return None
            parent = known
        names = chain(list(ev.token_ids), size, parent, limit=len(ev.block_hashes))
        for v, ours in zip(ev.block_hashes, names, strict=False):
            self.ours[_key(v)] = ours
            self.media.setdefault(_key(v), set()).add(medium)
        return Stored(tuple(names), medium) if names else None

    def _remove(self, v: int, medium: int) -> int | None:
        """Our name of vLLM's block ``v`` leaving ``medium`` (kept while another holds it)."""
        ours = self.ours.get(v)
        held = self.media.get(v)
        if ours is None or held is None or medium not in held:
            return None
        held.discard(medium)
        if not held:
            del self.ours[v], self.media[v]
        return ours


def _key(h: Any) -> int:
    """vLLM's external block hash: an int (the default), or bytes."""
    return h if isinstance(h, int) else int.from_bytes(bytes(h)[:8], "big")


class VllmKvEvents:
    """The SUB socket and the task that reads it (the agent's event loop)."""

    def __init__(self, sink: Callable[[Sequence[Event]], None]) -> None:
        import zmq
        import zmq.asyncio
        from msgspec.msgpack import Decoder
        from vllm.distributed.kv_events import KVEventBatch

        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        # A Unix socket in a directory only this user can enter: no other local process can
        # publish events into the routers' index (a TCP port on loopback would let it). vLLM
        # binds ipc endpoints, so this side connects (ZMQ retries until the engine is up).
        self._dir = tempfile.mkdtemp(prefix="meshserve-kv-")  # mode 0700
        self.endpoint = f"ipc://{self._dir}/events"
        self._sock.connect(self.endpoint)
        self._decode = Decoder(type=KVEventBatch).decode
        self._sink = sink
        self.translator = Translator()
        self._task: asyncio.Task[None] | None = None

    def config(self) -> dict[str, Any]:
        """vLLM's ``kv_events_config`` for this socket."""
        return {"enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": self.endpoint, "topic": TOPIC.decode()}  # fmt: skip

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._read(), name="vllm kv events")

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3:
                continue
            try:
                batch = self._decode(frames[2])
                events = self.translator.batch(int.from_bytes(frames[1], "big"), batch.events)
            except Exception:  # a malformed batch must not end the feed
                log.exception("undecodable vLLM KV event batch")
                continue
            if events:
                self._sink(events)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
