"""The fleet that bench/routing.py routes over: replicas of one model as a discrete-event
simulation of a continuous-batching engine with a prefix cache (vLLM's shape), on a simulated
clock, so policies compare on identical arrivals in seconds of CPU.

One engine step decodes a token for every running stream and prefills up to ``chunk_tokens`` of
prompts (chunked prefill); it takes ``step_s + prefill_s_per_token x prefilled +
decode_s_per_stream x decoding``. The KV pool holds ``kv_blocks`` blocks of ``block_tokens``: a
running stream pins its prompt's blocks and its output's; the rest of the pool keeps finished
prompts' full blocks as a prefix cache, least recently used out first. A new stream skips the
prefill of its leading cached blocks. Stored and evicted blocks become KV events (the same
`Stored`/`Removed` the agents send), delivered to the router ``event_delay_s`` later.
A replica may start asleep (weights in host RAM): its first request waits ``restore_s``.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.router.routing.prefix import Event, Removed, Stored


@dataclass(frozen=True)
class Costs:
    """An 8B-class model on one modern GPU, in round figures (prefill ~16 k tok/s, a decode
    step of a full batch ~30 ms): what matters is their ratio, prefill vs decode vs restore."""

    step_s: float = 0.006
    prefill_s_per_token: float = 0.00006
    decode_s_per_stream: float = 0.0002
    chunk_tokens: int = 2048
    max_batch: int = 128
    kv_blocks: int = 2048  # x 16 tokens = 32 k tokens of KV per replica
    block_tokens: int = 16
    restore_s: float = 2.0  # weights back from host RAM
    event_delay_s: float = 0.005


@dataclass(eq=False)
class Req:
    rid: int
    arrival: float
    tokens: list[int]
    blocks: list[int]  # chained hashes of its full blocks
    out_tokens: int
    replica: int = -1
    cached_blocks: int = 0
    private: int = 0  # KV blocks it holds outside the prefix cache
    prefill_left: int = 0
    produced: int = 0
    first_at: float = math.nan
    done_at: float = math.nan
    predicted: float = math.nan
    features: tuple[float, float] = (0.0, 0.0)


@dataclass
class Replica:
    index: int
    costs: Costs
    asleep: bool = False
    busy_until: float = 0.0  # restore in progress until then
    waiting: deque[Req] = field(default_factory=deque)
    running: list[Req] = field(default_factory=list)
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # hash → pins
    stepping: bool = False
    seq: int = 0
    restores: int = 0

    def used_blocks(self) -> int:
        """Blocks taken: running streams' own plus every cached one (pinned or not)."""
        return sum(r.private for r in self.running) + len(self.cache)

    def kv_usage(self) -> float:
        """The share that cannot be freed (what vLLM reports as KV cache usage)."""
        pinned = sum(1 for p in self.cache.values() if p)
        return min(1.0, (sum(r.private for r in self.running) + pinned) / self.costs.kv_blocks)

    def cached_prefix(self, blocks: list[int]) -> int:
        n = 0
        for h in blocks:
            if h not in self.cache:
                break
            n += 1
        return n


class Fleet:
    """Replicas on one simulated clock; `run` plays arrivals through a routing function."""

    def __init__(self, n: int, costs: Costs, asleep: int = 0) -> None:
        self.costs = costs
        self.replicas = [Replica(i, costs, asleep=i >= n - asleep) for i in range(n)]
        self.now = 0.0
        self._events: list[tuple[float, int, str, object]] = []
        self._tick = 0
        self.on_first: Callable[[Req], None] = lambda _r: None
        self.on_done: Callable[[Req], None] = lambda _r: None
        self.on_events: Callable[[int, int, list[Event]], None] = lambda *_a: None
        self.finished: list[Req] = []

    def at(self, t: float, kind: str, what: object) -> None:
        self._tick += 1
        heapq.heappush(self._events, (t, self._tick, kind, what))

    def send(self, req: Req, replica: int) -> None:
        req.replica = replica
        r = self.replicas[replica]
        r.waiting.append(req)
        if r.asleep:
            r.asleep, r.busy_until = False, self.now + self.costs.restore_s
            r.restores += 1
        self._kick(r)

    def _kick(self, r: Replica) -> None:
        if not r.stepping:
            r.stepping = True
            self.at(max(self.now, r.busy_until), "step", r)

    def run(self, arrivals: list[Req], route: Callable[[Req], int]) -> None:
        for req in arrivals:
            self.at(req.arrival, "arrive", req)
        while self._events:
            t, _, kind, what = heapq.heappop(self._events)
            self.now = t
            if kind == "arrive":
                assert isinstance(what, Req)
                self.send(what, route(what))
            elif kind == "step":
                assert isinstance(what, Replica)
                self._step(what)
            else:
                assert isinstance(what, tuple)
                self.on_events(*what)

    # --- one engine step ---------------------------------------------------------------------

    def _admit(self, r: Replica, events: list[Event]) -> None:
        c = self.costs
        while r.waiting and len(r.running) < c.max_batch:
            req = r.waiting[0]
            need = math.ceil((len(req.tokens) + req.out_tokens) / c.block_tokens)
            hit = r.cached_prefix(req.blocks)
            unpinned = sum(1 for h, p in r.cache.items() if not p) - sum(
                1 for h in req.blocks[:hit] if not r.cache[h]
            )
            if need - hit > c.kv_blocks - r.used_blocks() + unpinned and r.running:
                return  # waits for blocks (a lone stream always runs)
            r.waiting.popleft()
            req.cached_blocks, req.private = hit, need - hit
            req.prefill_left = len(req.tokens) - hit * c.block_tokens
            for h in reversed(req.blocks[:hit]):  # a prefix's head is used last: evicted last
                r.cache[h] += 1
                r.cache.move_to_end(h)
            r.running.append(req)
            self._evict(r, r.used_blocks() - c.kv_blocks, events)

    def _evict(self, r: Replica, n: int, events: list[Event]) -> None:
        """Frees ``n`` unpinned cached blocks, least recently used first."""
        gone = []
        for h in list(r.cache) if n > 0 else ():
            if n <= 0:
                break
            if not r.cache[h]:
                del r.cache[h]
                gone.append(h)
                n -= 1
        if gone:
            events.append(Removed(tuple(gone)))

    def _step(self, r: Replica) -> None:
        c = self.costs
        events: list[Event] = []
        self._admit(r, events)
        if not r.running:
            r.stepping = False
            self._publish(r, events)
            return
        budget, prefilled, decoding = c.chunk_tokens, 0, 0
        firsts, done = [], []
        for req in r.running:
            if req.prefill_left > 0:
                take = min(req.prefill_left, budget)
                budget -= take
                prefilled += take
                req.prefill_left -= take
                if req.prefill_left == 0:
                    firsts.append(req)
            else:
                decoding += 1
                req.produced += 1
                if req.produced >= req.out_tokens:
                    done.append(req)
        dt = c.step_s + prefilled * c.prefill_s_per_token + decoding * c.decode_s_per_stream
        end = self.now + dt
        for req in firsts:
            req.first_at = end
            req.produced = 1
            self._cache_prompt(r, req, events)
            self.on_first(req)
        for req in done:
            req.done_at = end
            r.running.remove(req)
            for h in req.blocks:  # all its prompt blocks are cached and pinned by now
                r.cache[h] -= 1
            self.finished.append(req)
            self.on_done(req)
        self._publish(r, events)
        self.at(end, "step", r)

    def _cache_prompt(self, r: Replica, req: Req, events: list[Event]) -> None:
        """Its prompt's full blocks move from the stream's own into the cache (pinned by it)."""
        mine = req.blocks[req.cached_blocks :]
        new = [h for h in mine if h not in r.cache]
        for h in reversed(mine):  # as vLLM frees them: a prefix's tail is evicted first
            r.cache[h] = r.cache.get(h, 0) + 1
            r.cache.move_to_end(h)
        req.private -= len(mine)
        if new:
            events.append(Stored(tuple(new)))
        self._evict(r, r.used_blocks() - self.costs.kv_blocks, events)

    def _publish(self, r: Replica, events: list[Event]) -> None:
        if events:
            r.seq += 1
            self.at(self.now + self.costs.event_delay_s, "events", (r.index, r.seq - 1, events))
