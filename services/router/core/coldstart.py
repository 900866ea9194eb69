"""A request that waited for a cold start carries why inside its own trace.

Span links alone do not do it: some trace UIs (Arize Phoenix among them) drop links, and a link
shows nothing of what it points at. So under the request's ``router.pick`` the router adds two
spans built from the replica's published status:

- ``cold_start.decision``: from when the request began waiting to when the load began — the
  scheduler's round; node, the placement's reason, and the round's trace and span ids;
- ``cold_start.load``: the agent's load (or restore from a lower tier) with its timing, where it
  came from and how many bytes it holds, and the ``model.load`` span's ids.

Each also links its remote span (OTel span links, for backends that show them: Jaeger, Tempo).
"""

from __future__ import annotations

import time

from meshserve.telemetry.tracing import hex_ids, links_to, tracer
from meshserve.v1 import cluster_pb2
from opentelemetry import trace

_tracer = tracer("meshserve.router")


def _ids(links: list[trace.Link]) -> dict[str, str]:
    """The linked span's ids as attributes (a UI that drops links still shows these)."""
    return {f"meshserve.linked.{k}": v for link in links for k, v in hex_ids(link.context).items()}


def explain(pick: trace.Span, waited_s: float, status: cluster_pb2.ReplicaStatus | None) -> None:
    """Marks ``pick`` (the current span) as a cold start and adds the two spans above under it
    (``waited_s``: how long the request waited). ``status``: the replica it got."""
    pick.set_attribute("meshserve.cold_start", True)
    if status is None:
        return
    placed, loaded = links_to(status.placed_trace), links_to(status.load_trace)
    for link in placed + loaded:
        pick.add_link(link.context, {"meshserve.link": "cold start"})
    now = time.time_ns()
    started_ns = now - int(waited_s * 1e9)
    restored = status.loaded_from not in ("", "source")
    seconds = status.transition_seconds if restored else status.load_seconds
    load_start = max(started_ns, now - int(seconds * 1e9))
    node = {"meshserve.node": status.node_id, "gen_ai.request.model": status.model}
    decision = _tracer.start_span(
        "cold_start.decision",
        start_time=started_ns,
        links=placed,
        attributes={**node, "meshserve.placement.reason": status.placed_reason, **_ids(placed)},
    )
    decision.end(end_time=load_start)
    load = _tracer.start_span(
        "cold_start.load",
        start_time=load_start,
        links=loaded,
        attributes={
            **node,
            "meshserve.load.from": status.loaded_from or "source",
            "meshserve.load.bytes": status.memory_bytes,
            "meshserve.load.seconds": seconds,
            **_ids(loaded),
        },
    )
    load.end(end_time=now)
