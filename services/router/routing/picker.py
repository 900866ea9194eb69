"""Ranks the READY replicas of a model for one request (pure).

Order: healthy replicas before ejected ones; replicas whose KV cache is below KV_FULL before nearly
full ones (a new stream there waits for blocks or preempts one); then by load = streams this router
has open on the replica + streams its engine reports queued (what other routers sent). With a
session key, the replica that rendezvous hashing assigns to the key goes first unless it carries
more than AFFINITY_SLACK streams above the least loaded one. The servicer tries them in order,
moving on only when a replica fails before the first token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from meshserve.router.routing.endpoints import Endpoint

AFFINITY_SLACK = 4  # streams a session's replica may carry above the least loaded before we move
KV_FULL = 0.9


def rendezvous(key: str, endpoints: Sequence[Endpoint]) -> Endpoint:
    """Highest-random-weight hashing: a key keeps its replica while that replica exists."""
    return max(
        endpoints,
        key=lambda e: hashlib.blake2b(f"{key}|{e.node_id}".encode(), digest_size=8).digest(),
    )


def rank(
    endpoints: Sequence[Endpoint],
    outstanding: Mapping[str, int],
    ejected: AbstractSet[str] = frozenset(),
    session_key: str = "",
    tiebreak: int = 0,
) -> tuple[Endpoint, ...]:
    """``outstanding`` and ``ejected`` are keyed by address; ``tiebreak`` rotates equal loads."""
    if not endpoints:
        return ()
    n = len(endpoints)
    order = sorted(
        range(n),
        key=lambda i: (
            endpoints[i].address in ejected,
            endpoints[i].kv_cache_usage >= KV_FULL,
            outstanding.get(endpoints[i].address, 0) + endpoints[i].waiting,
            (i - tiebreak) % n,
        ),
    )
    ranked = [endpoints[i] for i in order]
    if session_key:
        healthy = [e for e in endpoints if e.address not in ejected] or list(endpoints)
        preferred = rendezvous(session_key, healthy)
        least = min(outstanding.get(e.address, 0) for e in healthy)
        if outstanding.get(preferred.address, 0) - least <= AFFINITY_SLACK:
            ranked.remove(preferred)
            ranked.insert(0, preferred)
    return tuple(ranked)
