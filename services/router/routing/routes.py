"""A route's decision for one request (pure; DESIGN §9 "Routes"): which model serves it and
what comes after when that one fails or is full.

- Rules first, in order: the first whose every condition holds (tenant, metadata, priority,
  prompt length in characters) picks its target.
- Else weighted targets, sticky: weighted rendezvous hashing (each target scores
  -ln(u) / weight, u the hash of (key, target) in (0, 1); the lowest wins), so a key keeps its
  target, the shares follow the weights, and moving weight moves only the keys that must move
  (10 → 20 % to the canary moves a tenth of the keys to it, none away). The key is the
  session key (else the tenant) for ``sticky: session``, the tenant for ``tenant``, and the
  request id (a fresh draw) for ``none``.
- Then the fallbacks in order, each with its queue-wait bound; the picked target's bound is the
  route's ``max_wait_s`` while a fallback is left. The last hop waits as a plain request does.
- Shadows: a copy for a share of requests (by the request id: independent of stickiness).
- A cascade (`Cascade`): its small model first, and `escalate` decides from the mean log
  probability of its first tokens whether the hops (the larger target) take the request.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from meshserve.v1 import cluster_pb2

SCALE = float(2**64)


@dataclass(frozen=True)
class Facts:
    """What a route's rules and stickiness read of one request."""

    tenant: str = ""
    session_key: str = ""
    request_id: str = ""
    priority: int = 0
    prompt_chars: int = 0
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Hop:
    model: str
    role: str  # "target", "rule" or "fallback"
    max_wait_s: float | None  # None: as long as a plain request waits (the last hop)


@dataclass(frozen=True)
class Cascade:
    model: str  # tried first
    min_mean_logprob: float
    tokens: int  # decided after this many tokens (or at the end of a shorter answer)

    def escalate(self, logprobs: list[float]) -> bool:
        """Whether the answer whose first tokens have ``logprobs`` goes to the larger model:
        their mean below the threshold (an empty answer: no confidence shown, escalated)."""
        if not logprobs:
            return True
        head = logprobs[: self.tokens]
        return sum(head) / len(head) < self.min_mean_logprob


@dataclass(frozen=True)
class Plan:
    route: str
    hops: tuple[Hop, ...]
    rule: str = ""  # the rule that matched ("" = a weighted pick)
    shadows: tuple[str, ...] = ()
    cascade: Cascade | None = None


def _unit(key: str, salt: str) -> float:
    """A hash of (key, salt) as a number in (0, 1)."""
    digest = hashlib.blake2b(f"{key}\x1f{salt}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / SCALE


def weighted_pick(key: str, targets: list[tuple[str, float]]) -> str:
    """Weighted rendezvous hashing: the target with the lowest -ln(u) / weight."""
    return min(targets, key=lambda t: -math.log(_unit(key, t[0])) / t[1])[0]


def _matches(rule: cluster_pb2.RouteRule, f: Facts) -> bool:
    if rule.tenants and f.tenant not in rule.tenants:
        return False
    if rule.min_priority and f.priority < rule.min_priority:
        return False
    if f.prompt_chars < rule.min_prompt_chars:
        return False
    if rule.max_prompt_chars and f.prompt_chars > rule.max_prompt_chars:
        return False
    if rule.metadata:
        got = f.metadata or {}
        return all(got.get(k) == v for k, v in rule.metadata.items())
    return True


class Policy:
    """One RouteSpec, ready to decide (built once per change of the document)."""

    def __init__(self, spec: cluster_pb2.RouteSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self._targets = [(t.model, t.weight) for t in spec.targets]
        self._rules = list(spec.rules)
        self._shadows = [(s.model, s.weight) for s in spec.shadows]
        self._fallbacks = [(h.model, h.max_wait_s) for h in spec.fallbacks]
        self._sticky = spec.sticky or "session"
        c = spec.cascade
        self._cascade = Cascade(c.model, c.min_mean_logprob, c.tokens or 16) if c.model else None

    def key(self, f: Facts) -> str:
        if self._sticky == "tenant":
            return f.tenant or f.request_id
        if self._sticky == "none":
            return f.request_id
        return f.session_key or f.tenant or f.request_id

    def plan(self, f: Facts) -> Plan:
        rule = next((r for r in self._rules if _matches(r, f)), None)
        if rule is not None:
            first, role, rule_name = rule.target, "rule", rule.name
        elif self._targets:
            first, role, rule_name = weighted_pick(self.key(f), self._targets), "target", ""
        else:  # rules only, none matched: the fallbacks (or nothing)
            first, role, rule_name = "", "target", ""
        chain = [(m, w) for m, w in self._fallbacks if m != first]
        hops = []
        if first:
            hops.append(Hop(first, role, self.spec.max_wait_s if chain else None))
        for i, (model, wait) in enumerate(chain):
            last = i == len(chain) - 1
            hops.append(Hop(model, "fallback", None if last else (wait or self.spec.max_wait_s)))
        shadows = tuple(
            m for m, share in self._shadows if m != first and _unit(f.request_id, m) < share
        )
        return Plan(self.name, tuple(hops), rule_name, shadows, self._cascade)
