"""The routing decisions a router made (routing/pipeline.py's `Decision`), kept for
`meshserve explain-route` (the last DECISIONS_KEPT per model asked for), and as attributes of
the request's ``router.pick`` span (`span_attributes`)."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator

from meshserve.router.routing.pipeline import Decision
from meshserve.v1 import router_pb2

DECISIONS_KEPT = 256


class DecisionLog:
    def __init__(self, kept: int = DECISIONS_KEPT) -> None:
        self.kept = kept
        self._by_model: dict[str, deque[tuple[str, Decision]]] = {}

    def record(self, asked: str, d: Decision) -> None:
        """``d`` was made for a request to ``asked`` (the model it named; ``d.model`` differs when
        a fallback served it)."""
        log = self._by_model.get(asked)
        if log is None:
            log = self._by_model[asked] = deque(maxlen=self.kept)
        log.append((asked, d))

    def last(self, model: str, limit: int) -> Iterator[tuple[str, Decision]]:
        log = self._by_model.get(model, deque())
        yield from list(log)[-limit:]

    def drop(self, model: str) -> None:
        """A model that no longer exists takes its decisions with it."""
        self._by_model.pop(model, None)


def row(d: Decision) -> list[str]:
    """One line per replica: ``node total=… scorer=…`` or ``node rejected (why)``."""
    out = []
    for c in d.candidates:
        mark = "*" if d.chosen is not None and c.endpoint is d.chosen else ""
        if c.rejected:
            out.append(f"{c.endpoint.node_id} rejected ({c.rejected})")
        else:
            scores = " ".join(f"{k}={v:.3g}" for k, v in c.scores.items())
            out.append(f"{mark}{c.endpoint.node_id} total={c.total:.3g} {scores}".rstrip())
    return out


def span_attributes(d: Decision) -> dict[str, str | list[str]]:
    attributes: dict[str, str | list[str]] = {
        "meshserve.pick.model": d.model,
        "meshserve.pick.candidates": row(d),
    }
    if d.note:
        attributes["meshserve.pick.note"] = d.note
    return attributes


def session_hash(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=4).hexdigest() if key else ""


def to_proto(asked: str, d: Decision) -> router_pb2.RouteDecision:
    out = router_pb2.RouteDecision(
        unix_ms=int(d.at * 1000),
        model=asked,
        served_by=d.model,
        request_id=d.ask.request_id,
        session_key_hash=session_hash(d.ask.session_key),
        priority=d.ask.priority,
        weights=dict(d.weights),
        chosen_node=d.chosen.node_id if d.chosen is not None else "",
        note=d.note,
    )
    for c in d.candidates:
        out.candidates.add(
            node_id=c.endpoint.node_id,
            address=c.endpoint.address,
            rejected=c.rejected,
            scores=dict(c.scores),
            total=c.total,
            chosen=d.chosen is not None and c.endpoint is d.chosen,
        )
    return out
