"""What one scheduling round leaves for on-call: span attributes and events (who was evicted,
placed or left out, and why), Prometheus metrics and a log line. One function, called once per
round; the round itself stays free of telemetry."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshserve.scheduler.autoscale import ScaleState
from meshserve.scheduler.views import ClusterSnapshot, Plan
from meshserve.scheduler.writes import Put
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2
from opentelemetry import trace

log = logging.getLogger("meshserve.scheduler.leader")


@dataclass(frozen=True)
class RoundOutcome:
    epoch: int  # the leader's fencing token
    snap: ClusterSnapshot
    plan: Plan
    puts: list[Put]
    deletes: list[bytes]
    scale: Mapping[str, ScaleState]  # the autoscaler's state after this round
    seconds: float  # wall time of the whole round, s
    fenced: bool = False  # the write was refused: this scheduler was deposed


def record_round(span: trace.Span, r: RoundOutcome) -> None:
    plan = r.plan
    unplaced = [d.model for d in plan.decisions.values() if d.unschedulable]
    span.set_attribute("meshserve.epoch", r.epoch)
    span.set_attribute("meshserve.models", len(r.snap.models))
    span.set_attribute("meshserve.nodes", len(r.snap.nodes))
    span.set_attribute("meshserve.placements_written", len(r.puts))
    span.set_attribute("meshserve.placements_deleted", len(r.deletes))
    span.set_attribute("meshserve.evictions", len(plan.evictions))
    span.set_attribute("meshserve.loads", plan.moves)
    span.set_attribute("meshserve.wanted_replicas", sum(s.replicas for s in r.scale.values()))
    span.set_attribute("meshserve.unschedulable", unplaced)
    for victim, node_id in plan.evictions:
        span.add_event("evict", {"gen_ai.request.model": victim, "meshserve.node": node_id})
    for _key, p in r.puts:
        span.add_event(
            "place",
            {
                "gen_ai.request.model": p.model,
                "meshserve.node": p.node_id,
                "meshserve.tier": cluster_pb2.Tier.Name(p.tier),
                "meshserve.reason": p.reason,
            },
        )
    for name in unplaced:
        span.add_event(
            "unschedulable",
            {
                "gen_ai.request.model": name,
                "meshserve.reason": plan.decisions[name].unschedulable[:500],
            },
        )
    if r.fenced:
        span.set_status(trace.Status(trace.StatusCode.ERROR, "fenced out: deposed"))
        metrics.SCHEDULER_ROUNDS.labels("fenced").inc()
        return
    if r.puts or r.deletes:
        metrics.SCHEDULER_WRITING_ROUNDS.inc()
        log.info(
            "round: %d placements written, %d removed, evictions %s, unschedulable %s; "
            "held %s, plan %s",
            len(r.puts),
            len(r.deletes),
            list(plan.evictions),
            unplaced,
            {n: sorted(ms) for n, ms in r.snap.current.items()},
            {n: sorted(ms) for n, ms in plan.assignments.items()},
        )
    metrics.SCHEDULER_ROUNDS.labels("ok").inc()
    metrics.SCHEDULER_LOADS.inc(plan.moves)
    for victim, _node in plan.evictions:
        metrics.SCHEDULER_EVICTIONS.labels(victim).inc()
    for name, state in r.scale.items():
        metrics.WANTED_REPLICAS.labels(name).set(state.replicas)
    for name, decision in plan.decisions.items():
        metrics.UNSCHEDULABLE.labels(name).set(1 if decision.unschedulable else 0)
    metrics.SCHEDULER_ROUND_SECONDS.observe(r.seconds)


_exported: set[tuple[str, str, str]] = set()


def export_replicas(replicas: Iterable[cluster_pb2.ReplicaStatus]) -> None:
    """``meshserve_replicas{model, state, tier}``: the leader's count of every replica, so one
    scrape shows the fleet by tier (a follower, or a deposed leader, exports none)."""
    global _exported
    counts: dict[tuple[str, str, str], int] = {}
    for r in replicas:
        key = (
            r.model,
            cluster_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_"),
            cluster_pb2.Tier.Name(r.tier).removeprefix("TIER_"),
        )
        counts[key] = counts.get(key, 0) + 1
    for gone in _exported - counts.keys():
        metrics.REPLICAS.remove(*gone)
    for key, n in counts.items():
        metrics.REPLICAS.labels(*key).set(n)
    _exported = set(counts)
