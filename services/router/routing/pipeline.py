"""Routing as a pipeline (pure), as the scheduler places (and as llm-d's endpoint picker and the
Kubernetes scheduling framework do): filters say which READY replicas may take a request, each
with its reason when not; weighted scorers in [0, 1] rank the ones left; the picker takes the
best, rotating ties. Every pick is a `Decision` (candidates, verdicts, scores, chosen) that the
router records on the request's ``router.pick`` span and keeps for `meshserve explain-route`.

Filters: ``slot`` (a free stream slot: this router sends a replica at most its published
``max_streams``, and sheddable requests leave it a reserve), ``excluded`` (the request gave up on
the replica), ``breaker`` (open circuit breaker; soft: lifted when nothing else is left).
Scorers: ``ttft`` (the predicted time to first token, routing.ttft, from the prompt's cached
prefix there (View.matches, routing.prefix) and its queue: 1 for the fastest and those within
NEAR_TIE of it, fastest / own for the rest), ``prefix`` (the share of the prompt's blocks it
holds: GIE's approximate scorer), ``affinity`` (the replica that rendezvous hashing gives the
request's session key, unless it carries more than AFFINITY_SLACK streams above the least
loaded), ``kv`` (its KV cache below KV_FULL: a new stream on a nearly full one waits for blocks
or preempts one), ``load`` (1 / (1 + this router's streams on it + streams queued in its
engine)), ``adapter`` (for a LoRA adapter: 1 where it is loaded, 0.8 where there is room to load
it, 0.6 where another must go first; weight 1 for adapters' requests: a tie-breaker). The
default weights (ttft 8, affinity 4, kv 2, load 1; prefix off) let a session keep its replica
unless another would answer over twice as fast; without a hashed prompt the ttft column is all
0 and the others rank lexicographically in that order. A router profile
(``--routing-weights``) or a model (``routing:`` in its spec) may set others.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.exclusions import Identity
from meshserve.router.routing.prefix import NO_MATCH, Match
from meshserve.v1 import common_pb2

AFFINITY_SLACK = 4  # streams a session's replica may carry above the least loaded before we move
KV_FULL = 0.9
SHEDDABLE = common_pb2.PRIORITY_LOW
RESERVED_SHARE = 0.25  # of a replica's slots that sheddable streams leave to the others
NEAR_TIE = 0.05  # predicted TTFTs within 5 % of the fastest count as equal


@dataclass(frozen=True)
class Ask:
    """What routing knows of one request."""

    session_key: str = ""
    priority: int = common_pb2.PRIORITY_NORMAL
    exclude: Container[Identity] = frozenset()
    request_id: str = ""
    blocks: Sequence[int] = ()  # the prompt's chained block hashes (kvblocks), when hashed
    tokens: int = 0  # the prompt's tokens (0: unknown)
    block_tokens: int = 0  # the block size ``blocks`` were cut in
    model: str = ""  # whose tokenizer made them (a fallback model's index is another)
    adapter: str = ""  # the LoRA adapter asked for (its route's replicas are its base's)


@dataclass(frozen=True)
class View:
    """The router's own state that routing reads: its streams per replica (``outstanding``, by
    address) and per replica and model (``streams``), and whether a replica's breaker lets a
    request through now (``allows``, by (address, model))."""

    outstanding: Mapping[str, int]
    streams: Mapping[tuple[str, str], int]
    allows: Callable[[tuple[str, str]], bool] = lambda _key: True
    # How much of the prompt's prefix each candidate holds (by address), from the model's
    # prefix index; and a candidate's predicted TTFT in seconds (routing.ttft).
    matches: Callable[[str, Sequence[Endpoint], Ask], Mapping[str, Match]] = lambda *_: {}
    predict: Callable[[str, Sequence[Endpoint], Ask, Mapping[str, Match]], list[float]] | None = (
        None
    )
    all_allowed: Callable[[], bool] = lambda: False  # True: no breaker open (skip ``allows``)


Check = Callable[[Endpoint, str, Ask, View], str]  # "" passes; else why not
# One score per candidate, in [0, 1]; the model's name comes first.
Score = Callable[[str, Sequence[Endpoint], Ask, View], list[float]]


@dataclass(frozen=True)
class Filter:
    name: str
    check: Check
    soft: bool = False  # lifted when no replica passes it
    # False: it passes every replica for this request (not asked per replica)
    active: Callable[[Ask, View], bool] = lambda _ask, _view: True


def free_slot(e: Endpoint, model: str, ask: Ask, view: View) -> str:
    if not e.max_streams:
        return ""
    limit = e.max_streams
    if ask.priority <= SHEDDABLE and limit > 1:
        limit -= max(1, int(limit * RESERVED_SHARE))
    n = view.streams.get((e.address, model), 0)
    return "" if n < limit else f"{n} of its {limit} slots taken by this router's streams"


def not_excluded(e: Endpoint, _model: str, ask: Ask, _view: View) -> str:
    return "failed this request (left for a while)" if e.identity in ask.exclude else ""


def breaker_closed(e: Endpoint, model: str, _ask: Ask, view: View) -> str:
    return "" if view.allows((e.address, model)) else "circuit breaker open"


def rendezvous(key: str, endpoints: Sequence[Endpoint]) -> Endpoint:
    """Highest-random-weight hashing: a key keeps its replica while that replica exists."""
    return max(
        endpoints,
        key=lambda e: hashlib.blake2b(f"{key}|{e.node_id}".encode(), digest_size=8).digest(),
    )


def affinity(_model: str, cands: Sequence[Endpoint], ask: Ask, view: View) -> list[float]:
    if not ask.session_key or not cands:
        return [0.0] * len(cands)
    preferred = rendezvous(ask.session_key, cands)
    least = min(view.outstanding.get(e.address, 0) for e in cands)
    if view.outstanding.get(preferred.address, 0) - least > AFFINITY_SLACK:
        return [0.0] * len(cands)
    return [1.0 if e is preferred else 0.0 for e in cands]


def kv_room(_model: str, cands: Sequence[Endpoint], _ask: Ask, _view: View) -> list[float]:
    return [0.0 if e.kv_cache_usage >= KV_FULL else 1.0 for e in cands]


def load(_model: str, cands: Sequence[Endpoint], _ask: Ask, view: View) -> list[float]:
    return [1.0 / (1 + view.outstanding.get(e.address, 0) + e.waiting) for e in cands]


def adapter(_model: str, cands: Sequence[Endpoint], ask: Ask, _view: View) -> list[float]:
    """LoRA adapter affinity (llm-d's scores): 1 where the adapter is loaded, 0.8 where there is
    room to load it, 0.6 where another must be evicted first (or wait for a slot)."""
    if not ask.adapter:
        return [0.0] * len(cands)
    name = ask.adapter
    return [
        1.0 if name in e.adapters else 0.8 if len(e.adapters) < e.max_adapters else 0.6
        for e in cands
    ]


def prefix(model: str, cands: Sequence[Endpoint], ask: Ask, view: View) -> list[float]:
    """The share of the prompt's blocks a candidate holds as a prefix (events or recent sends):
    the approximate prefix scorer of llm-d / the Gateway API inference extension."""
    if not ask.blocks:
        return [0.0] * len(cands)
    m = view.matches(model, cands, ask)
    n = len(ask.blocks)
    return [m.get(e.address, NO_MATCH).blocks / n for e in cands]


def ttft(model: str, cands: Sequence[Endpoint], ask: Ask, view: View) -> list[float]:
    """The predicted time to first token (routing.ttft) as a score: 1 for the fastest and for
    those within NEAR_TIE of it (near-ties are spread by the other scorers and the rotation),
    fastest / own for the rest."""
    if view.predict is None or not ask.tokens or not cands:
        return [0.0] * len(cands)
    preds = view.predict(model, cands, ask, view.matches(model, cands, ask) if ask.blocks else {})
    best = max(min(preds), 1e-6)
    return [1.0 if p <= best * (1 + NEAR_TIE) else best / p for p in preds]


FILTERS: tuple[Filter, ...] = (
    Filter("slot", free_slot),
    Filter("excluded", not_excluded, active=lambda ask, _view: bool(ask.exclude)),
    Filter("breaker", breaker_closed, soft=True, active=lambda _ask, view: not view.all_allowed()),
)
SCORERS: Mapping[str, Score] = {
    "ttft": ttft,
    "prefix": prefix,
    "affinity": affinity,
    "kv": kv_room,
    "load": load,
    "adapter": adapter,
}
# ttft leads: a session's replica keeps it unless another answers over twice as fast.
DEFAULT_WEIGHTS: Mapping[str, float] = {"ttft": 8.0, "affinity": 4.0, "kv": 2.0, "load": 1.0}
# For an adapter's requests (only: others would carry a column of zeros) unless the weights name
# it: where it is loaded wins among equally busy replicas, and one stream more there sends the
# request to a replica with room (1 + 1/2 < 0.8 + 1). Loading an adapter takes milliseconds
# (meshserve_adapter_load_seconds: 5-6 ms on bench/adapters.py's base) where a stream ahead
# costs a forward pass or more: at weight 4 an adapter's requests piled onto the replica that held
# it while the other idled, and TTFT p99 with 20 adapters was 1.28x (Zipf) and 1.92x (uniform)
# the base's; at weight 1, 1.17x and 1.18x in the same benchmark (200 requests a row).
ADAPTER_WEIGHT = 1.0


def weights_for(weights: Mapping[str, float], adapter: bool) -> Mapping[str, float]:
    """The scorer weights of one request: ``weights`` (a model's, else the profile's), with
    the adapter scorer added for an adapter's request."""
    if not adapter or "adapter" in weights:
        return weights
    return {**weights, "adapter": ADAPTER_WEIGHT}


class Scored(NamedTuple):
    """One replica in one decision (a tuple: a decision makes one per replica, per request)."""

    endpoint: Endpoint
    rejected: str = ""  # "filter: why" when a filter kept it out; "" when it was a candidate
    names: tuple[str, ...] = ()  # the scorers ...
    values: tuple[float, ...] = ()  # ... and its score from each
    total: float = 0.0

    @property
    def scores(self) -> dict[str, float]:
        return dict(zip(self.names, self.values, strict=True))


@dataclass(frozen=True)
class Decision:
    model: str  # whose replicas were considered (the asked model, or a fallback when cold)
    ask: Ask
    weights: Mapping[str, float]
    chosen: Endpoint | None = None
    note: str = ""  # e.g. a soft filter lifted
    at: float = field(default_factory=time.time)
    # What `candidates` is made of, as `pick` left it: most decisions are never read (a span
    # not sampled, explain-route not asked), so the per-replica rows are built when read.
    endpoints: Sequence[Endpoint] = ()
    rejected: Mapping[int, str] = field(default_factory=dict)  # replica index → why
    passed: Sequence[int] = ()  # the candidates' replica indices
    names: tuple[str, ...] = ()  # the scorers
    columns: Sequence[Sequence[float]] = ()  # per scorer, a score per candidate
    totals: Sequence[float] = ()  # per candidate

    @cached_property
    def candidates(self) -> tuple[Scored, ...]:
        """Every replica: its scores when a candidate, else the filter that kept it out."""
        per_candidate = list(zip(*self.columns, strict=True)) if self.columns else []
        scored = {
            i: Scored(self.endpoints[i], "", self.names, per_candidate[j], self.totals[j])
            for j, i in enumerate(self.passed)
        }
        return tuple(
            scored.get(i) or Scored(e, self.rejected.get(i, ""))
            for i, e in enumerate(self.endpoints)
        )


def pick(
    model: str,
    endpoints: Sequence[Endpoint],
    ask: Ask,
    view: View,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
    tiebreak: int = 0,
    scorers: Mapping[str, Score] = SCORERS,
) -> Decision:
    """Filters, then scores, then the best: the highest weighted sum, ties rotated by
    ``tiebreak`` (equal replicas share the load)."""
    rejected: dict[int, str] = {}
    soft_only: list[int] = []
    n = len(endpoints)
    # Filter by filter over every replica (comprehensions: the common case passes them all).
    active = [f for f in FILTERS if f.active(ask, view)]
    verdicts = [[f.check(e, model, ask, view) for e in endpoints] for f in active]
    note = ""
    if not any(any(v) for v in verdicts):  # all pass: the common case, in C loops
        passed: list[int] = list(range(n))
        cands = list(endpoints)
    else:
        for i in range(n):
            for k, f in enumerate(active):
                why = verdicts[k][i]
                if why:
                    rejected[i] = f"{f.name}: {why}"
                    if f.soft and all(
                        not verdicts[g][i] for g, h in enumerate(active) if g != k and not h.soft
                    ):
                        soft_only.append(i)
                    break
        passed = [i for i in range(n) if i not in rejected]
        if not passed and soft_only:  # broken ones only when nothing else is left
            passed, note = soft_only, "soft filters lifted: no other replica left"
            for i in soft_only:
                del rejected[i]
        cands = [endpoints[i] for i in passed]
    # a weight for a scorer this router lacks (a newer spec) counts for nothing
    names = tuple(name for name, w in weights.items() if w and name in scorers)
    columns = [scorers[name](model, cands, ask, view) for name in names]
    totals = [0.0] * len(cands)
    for name, col in zip(names, columns, strict=True):
        w = weights[name]
        totals = [t + w * x for t, x in zip(totals, col, strict=True)]
    m = len(passed)
    chosen = None
    if m:  # ties rotate among the candidates left, so equal replicas share the load evenly
        top = max(totals)
        tied = [j for j, t in enumerate(totals) if t == top]
        best_j = min(tied, key=lambda j: (j - tiebreak) % m) if len(tied) > 1 else tied[0]
        chosen = endpoints[passed[best_j]]
    return Decision(
        model, ask, weights, chosen, note,
        endpoints=endpoints, rejected=rejected, passed=passed, names=names, columns=columns,
        totals=totals,
    )  # fmt: skip


def rank(
    endpoints: Sequence[Endpoint],
    outstanding: Mapping[str, int],
    ejected: Container[str] = frozenset(),
    session_key: str = "",
    tiebreak: int = 0,
    weights: Mapping[str, float] = DEFAULT_WEIGHTS,
) -> tuple[Endpoint, ...]:
    """Every replica in the order one pick prefers them (the ``ejected`` addresses, as open
    breakers, last): the picker's order made visible, for tests and tools."""
    view = View(outstanding, {}, lambda key: key[0] not in ejected)
    d = pick("", endpoints, Ask(session_key), view, weights, tiebreak)
    n = len(endpoints)
    order = sorted(
        range(n),
        key=lambda i: (bool(d.candidates[i].rejected), -d.candidates[i].total, (i - tiebreak) % n),
    )
    if any(d.candidates[i].rejected for i in order):  # rank the ejected among themselves too
        out = [endpoints[i] for i in order if not d.candidates[i].rejected]
        rest = [endpoints[i] for i in order if d.candidates[i].rejected]
        return (*out, *rank(rest, outstanding, frozenset(), "", tiebreak, weights))
    return tuple(endpoints[i] for i in order)
