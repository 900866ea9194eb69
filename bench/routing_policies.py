"""The policies of bench/routing.py: each a `Router` over the simulated fleet that routes with
meshserve's real pipeline (`pick`) and prefix index, given the scorers and feeds it names.
Anchor defaults and the files they come from are noted where they are set."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.pipeline import SCORERS, Ask, Score, View, pick
from meshserve.router.routing.prefix import NO_MATCH, Event, Match, PrefixIndex
from meshserve.router.routing.ttft import Forecaster, Work, predict

from bench.routing_sim import Costs, Fleet, Req

MODEL, KIND = "m", "sim"
REFRESH_S = 0.1  # engine figures (queued streams, KV use) as every policy sees them

# Gateway API inference extension / llm-d approximate prefix scorer (llm-d-inference-scheduler):
# blocks of 16 tokens (blockSizeTokens; hashed as 16 x 4 = 64 characters; we hash the tokens),
# lruCapacityPerServer 31,250 and maxPrefixBlocksToMatch 256
# (pkg/epp/framework/plugins/requestcontrol/dataproducer/approximateprefix/types.go); weights
# prefix 3, queue 2, KV utilisation 2 (pkg/epp/config/loader/defaults.go, GIE >= v1.4.0).
GIE_LRU_BLOCKS = 31_250
GIE_MAX_BLOCKS = 256
GIE_WEIGHTS = {"gie_prefix": 3.0, "gie_queue": 2.0, "gie_kv": 2.0}
# Dynamo KV router: overlap_score_weight 1.0, router_temperature 0.0
# (lib/llm/src/kv_router/config.rs; lib/kv-router/src/scheduling/config.rs).
DYNAMO_OVERLAP_WEIGHT = 1.0


class Router:
    """A routing policy over a `Fleet`; `route` is called once per arrival."""

    weights: Mapping[str, float] = {"affinity": 4.0, "kv": 2.0, "load": 1.0}
    events_feed = False  # its index learns from the engines' KV events
    sends_feed = False  # ... and from its own sends (pending blocks)
    pending_ttl = 2.0

    def __init__(self, fleet: Fleet, costs: Costs) -> None:
        self.fleet = fleet
        self.costs = costs
        self.endpoints = [Endpoint(f"n{i}", f"r{i}") for i in range(len(fleet.replicas))]
        self.outstanding: dict[str, int] = {}  # sent, not finished (as the router counts)
        self.prefilling: dict[str, int] = {}  # sent, first token not back yet
        self.index = PrefixIndex(capacity=self.index_capacity(), pending_ttl=self.pending_ttl)
        self.forecast = Forecaster()
        self.errors: list[float] = []
        self.decision_us: list[float] = []
        self._refreshed = -1.0
        self._n = 0
        self._work: dict[int, tuple[Work, float]] = {}
        self.scorers: dict[str, Score] = dict(SCORERS)
        self._memo: tuple[Ask | None, Mapping[str, Match]] = (None, {})
        self.view = View(
            self.outstanding,
            {},
            matches=self._matches,
            predict=self._predict,
            all_allowed=lambda: True,
        )

    def index_capacity(self) -> int:
        return self.costs.kv_blocks * 2

    # --- what the fleet calls ----------------------------------------------------------------

    def route(self, req: Req) -> int:
        self._refresh()
        ask = Ask(blocks=req.blocks, tokens=len(req.tokens))
        t0 = time.perf_counter()
        i = self.choose(req, ask)
        self.decision_us.append((time.perf_counter() - t0) * 1e6)
        e = self.endpoints[i]
        self.outstanding[e.address] = self.outstanding.get(e.address, 0) + 1
        self.prefilling[e.address] = self.prefilling.get(e.address, 0) + 1
        if self.sends_feed:
            self.index.sent(e.address, req.blocks, self.fleet.now)
        self._note(req, e, ask)
        return i

    def choose(self, req: Req, ask: Ask) -> int:
        self._n += 1
        d = pick(MODEL, self.endpoints, ask, self.view, self.weights, self._n, self.scorers)
        assert d.chosen is not None
        return int(d.chosen.address[1:])

    def first_token(self, req: Req) -> None:
        e = self.endpoints[req.replica]
        self.prefilling[e.address] -= 1
        work, predicted = self._work.pop(req.rid)
        self.errors.append(
            self.forecast.first_token(
                MODEL, KIND, e.address, work, predicted, req.first_at - req.arrival
            )
        )

    def done(self, req: Req) -> None:
        self.outstanding[self.endpoints[req.replica].address] -= 1

    def events(self, replica: int, seq: int, evs: list[Event]) -> None:
        if self.events_feed:
            self.index.apply(f"r{replica}", seq, evs)

    # --- helpers -----------------------------------------------------------------------------

    def _refresh(self) -> None:
        if self.fleet.now - self._refreshed < REFRESH_S:
            return
        self._refreshed = self.fleet.now
        for e, r in zip(self.endpoints, self.fleet.replicas, strict=True):
            e.waiting = len(r.waiting)
            e.kv_cache_usage = r.kv_usage()

    def _matches(self, _m: str, _cands: Sequence[Endpoint], ask: Ask) -> Mapping[str, Match]:
        """Every replica's match, once per request (the scorers and the note share it)."""
        if self._memo[0] is not ask:
            addresses = [e.address for e in self.endpoints]
            self._memo = (ask, self.index.match(ask.blocks, addresses, self.fleet.now))
        return self._memo[1]

    def residency(self, e: Endpoint) -> float:
        return 0.0

    def _running(self, address: str) -> int:
        return self.outstanding.get(address, 0) - self.prefilling.get(address, 0)

    def _work_for(self, e: Endpoint, ask: Ask, m: Match) -> Work:
        b = self.costs.block_tokens
        return self.forecast.work(
            e.address,
            ask.tokens,
            m.blocks * b,
            m.host * b,
            self._running(e.address),
            residency_s=self.residency(e),
        )

    def _predict(
        self, _m: str, cands: Sequence[Endpoint], ask: Ask, matches: Mapping[str, Match]
    ) -> list[float]:
        b = self.costs.block_tokens
        ms = [matches.get(e.address, NO_MATCH) for e in cands]
        return self.forecast.predict_many(
            self.forecast.fit(MODEL, KIND),
            [e.address for e in cands],
            ask.tokens,
            [m.blocks * b for m in ms],
            [m.host * b for m in ms],
            [self._running(e.address) for e in cands],
            [0] * len(cands),
            [self.residency(e) for e in cands],
        )

    def _note(self, req: Req, e: Endpoint, ask: Ask) -> None:
        m = self._matches(MODEL, [e], ask).get(e.address, NO_MATCH) if ask.blocks else NO_MATCH
        work = self._work_for(e, ask, m)
        self._work[req.rid] = (work, predict(self.forecast.fit(MODEL, KIND), work))
        self.forecast.sent(e.address, work, ask.tokens)


class LeastLoad(Router):
    pass


class ApproxPrefix(Router):
    """GIE's approximate prefix scorer: its index holds what it sent (no TTL, LRU per server);
    queue scorer min-max normalised over the candidates' waiting streams; KV scorer 1 - usage."""

    sends_feed = True
    pending_ttl = 1e9
    weights = GIE_WEIGHTS

    def __init__(self, fleet: Fleet, costs: Costs) -> None:
        super().__init__(fleet, costs)
        self.scorers |= {"gie_prefix": _gie_prefix, "gie_queue": _queue, "gie_kv": _kv}

    def index_capacity(self) -> int:
        return GIE_LRU_BLOCKS


def _gie_prefix(m: str, cands: Sequence[Endpoint], a: Ask, v: View) -> list[float]:
    """Matched blocks / the prompt's blocks, over at most its first 256 blocks."""
    return SCORERS["prefix"](m, cands, replace(a, blocks=a.blocks[:GIE_MAX_BLOCKS]), v)


def _queue(_m: str, cands: Sequence[Endpoint], _a: Ask, _v: View) -> list[float]:
    qs = [e.waiting for e in cands]
    lo, hi = min(qs, default=0), max(qs, default=0)
    return [1.0 if hi == lo else (hi - q) / (hi - lo) for q in qs]


def _kv(_m: str, cands: Sequence[Endpoint], _a: Ask, _v: View) -> list[float]:
    return [1.0 - e.kv_cache_usage for e in cands]


class DynamoCost(Router):
    """Dynamo's KV router (lib/llm/src/kv_router/scheduler.rs, the classic cost, which its newer
    lib/kv-router/src/scheduling/selector/default.rs reduces to with device-only hits and its
    defaults): per worker, prefill_blocks = (its active prefill tokens + this prompt's tokens
    not cached there) / block; decode_blocks = its active blocks + this request's new ones;
    logit = overlap_score_weight x prefill_blocks + decode_blocks; temperature 0: the lowest,
    ties at random. Active figures are the router's own (Dynamo's ActiveSequences); the cache
    view is its events-fed index."""

    events_feed = True

    def __init__(self, fleet: Fleet, costs: Costs) -> None:
        super().__init__(fleet, costs)
        self.prefill: dict[int, float] = {}  # worker → active prefill tokens
        self.active: dict[int, float] = {}  # worker → active blocks
        self._rng = random.Random(1)

    def choose(self, req: Req, ask: Ask) -> int:
        m = self._matches(MODEL, self.endpoints, ask)
        b = self.costs.block_tokens
        request_blocks = -(-len(req.tokens) // b)
        costs = []
        for i, e in enumerate(self.endpoints):
            overlap = m.get(e.address, NO_MATCH).blocks
            prefill_tokens = self.prefill.get(i, 0.0) + len(req.tokens) - overlap * b
            decode = self.active.get(i, 0.0) + request_blocks - overlap
            costs.append(DYNAMO_OVERLAP_WEIGHT * prefill_tokens / b + decode)
        low = min(costs)
        best = self._rng.choice([i for i, c in enumerate(costs) if c == low])
        overlap = m.get(self.endpoints[best].address, NO_MATCH).blocks
        req.features = (len(req.tokens) - overlap * b, request_blocks)
        self.prefill[best] = self.prefill.get(best, 0.0) + req.features[0]
        self.active[best] = self.active.get(best, 0.0) + request_blocks
        return best

    def first_token(self, req: Req) -> None:
        super().first_token(req)
        self.prefill[req.replica] -= req.features[0]

    def done(self, req: Req) -> None:
        super().done(req)
        self.active[req.replica] -= req.features[1]


class Meshserve(Router):
    events_feed = True
    sends_feed = True
    weights = {"ttft": 8.0, "affinity": 4.0, "kv": 2.0, "load": 1.0}

    def residency(self, e: Endpoint) -> float:
        r = self.fleet.replicas[int(e.address[1:])]
        if r.asleep:
            return self.costs.restore_s
        return max(0.0, r.busy_until - self.fleet.now)


class Oracle(Router):
    """The replicas' exact caches at routing time; longest prefix, ties to the least loaded."""

    def choose(self, req: Req, ask: Ask) -> int:
        def key(i: int) -> tuple[int, int]:
            r = self.fleet.replicas[i]
            return (-r.cached_prefix(req.blocks), self.outstanding.get(f"r{i}", 0))

        return min(range(len(self.endpoints)), key=key)


POLICIES: dict[str, Callable[[Fleet, Costs], Router]] = {
    "least_load": LeastLoad,
    "approx_prefix": ApproxPrefix,
    "dynamo_cost": DynamoCost,
    "meshserve": Meshserve,
    "oracle": Oracle,
}
