"""The policies of bench/routing.py: each a `Router` over the simulated fleet that routes with
meshserve's real pipeline (`pick`) and prefix index, given the scorers and feeds it names.
Anchor defaults and the files they come from are noted where they are set."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.pipeline import SCORERS, Ask, Score, View, pick
from meshserve.router.routing.prefix import NO_MATCH, Event, Match, PrefixIndex
from meshserve.router.routing.ttft import Forecaster, Work, predict

from bench.routing_sim import Costs, Fleet, Req

MODEL, KIND = "m", "sim"
REFRESH_S = 0.1  # engine figures (queued streams, KV use) as every policy sees them

# Gateway API inference extension / llm-d approximate prefix scorer.
GIE_LRU_BLOCKS = 31_250  # per server: pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go
GIE_WEIGHTS = {"gie_prefix": 3.0, "gie_queue": 2.0, "gie_kv": 2.0}
# Dynamo KV router: lib/llm/src/kv_router/scheduler.rs (overlap_score_weight 1, temperature 0).
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
        self.outstanding: dict[str, int] = {}
        self.index = PrefixIndex(capacity=self.index_capacity(), pending_ttl=self.pending_ttl)
        self.forecast = Forecaster()
        self.errors: list[float] = []
        self.decision_us: list[float] = []
        self._refreshed = -1.0
        self._n = 0
        self._work: dict[int, tuple[Work, float]] = {}
        self.scorers: dict[str, Score] = dict(SCORERS)
        self._memo: tuple[Ask | None, Mapping[str, Match]] = (None, {})
        self.view = View(self.outstanding, {}, matches=self._matches, predict=self._predict)

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
        if self.sends_feed:
            self.index.sent(e.address, req.blocks, self.fleet.now)
        self._note(req, e, ask)
        return i

    def choose(self, req: Req, ask: Ask) -> int:
        self._n += 1
        d = pick(MODEL, self.endpoints, ask, self.view, self.weights, self._n, self.scorers)
        assert d.chosen is not None
        return self.endpoints.index(d.chosen)

    def first_token(self, req: Req) -> None:
        e = self.endpoints[req.replica]
        self.outstanding[e.address] -= 1  # counts the prefill phase, where TTFT is decided
        work, predicted = self._work.pop(req.rid)
        self.errors.append(
            self.forecast.first_token(
                MODEL, KIND, e.address, work, predicted, req.first_at - req.arrival
            )
        )

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

    def _work_for(self, e: Endpoint, ask: Ask, m: Match) -> Work:
        b = self.costs.block_tokens
        return self.forecast.work(
            e.address,
            ask.tokens,
            m.blocks * b,
            m.host * b,
            self.outstanding.get(e.address, 0),
            residency_s=self.residency(e),
        )

    def _predict(self, _m: str, e: Endpoint, ask: Ask, m: Match) -> float:
        return predict(self.forecast.fit(MODEL, KIND), self._work_for(e, ask, m))

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
        self.scorers |= {"gie_prefix": SCORERS["prefix"], "gie_queue": _queue, "gie_kv": _kv}

    def index_capacity(self) -> int:
        return GIE_LRU_BLOCKS


def _queue(_m: str, cands: Sequence[Endpoint], _a: Ask, _v: View) -> list[float]:
    qs = [e.waiting for e in cands]
    lo, hi = min(qs, default=0), max(qs, default=0)
    return [1.0 if hi == lo else (hi - q) / (hi - lo) for q in qs]


def _kv(_m: str, cands: Sequence[Endpoint], _a: Ask, _v: View) -> list[float]:
    return [1.0 - e.kv_cache_usage for e in cands]


class DynamoCost(Router):
    """Dynamo's KV router: logit = overlap_weight x (prompt blocks not cached there) + the
    worker's active blocks; temperature 0 takes the lowest."""

    events_feed = True

    def choose(self, req: Req, ask: Ask) -> int:
        m = self._matches(MODEL, self.endpoints, ask)
        b = self.costs.block_tokens
        best, best_cost = 0, float("inf")
        for i, (e, r) in enumerate(zip(self.endpoints, self.fleet.replicas, strict=True)):
            prefill = len(ask.blocks) - m.get(e.address, NO_MATCH).blocks
            decode = self._active_blocks(r, b)
            cost = DYNAMO_OVERLAP_WEIGHT * prefill + decode
            if cost < best_cost:
                best, best_cost = i, cost
        return best

    @staticmethod
    def _active_blocks(r: object, b: int) -> float:
        return 0.0


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
