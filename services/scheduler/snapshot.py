"""Turns etcd records into the frozen `ClusterSnapshot` that `place` reads (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from meshserve.scheduler.placement import (
    ClusterSnapshot,
    ModelView,
    NodeView,
    need_bytes,
    wanted_replicas,
)
from meshserve.v1 import cluster_pb2, common_pb2

DEFAULT_IDLE_S = 300.0  # scale a min_replicas=0 model to zero after this long without requests


def build_snapshot(
    models: Iterable[cluster_pb2.ModelSpec],
    nodes: Iterable[cluster_pb2.NodeStatus],
    replicas: Iterable[cluster_pb2.ReplicaStatus],
    placements: Iterable[cluster_pb2.Placement],
    demand: Iterable[cluster_pb2.RouterDemand],
    ensured: Mapping[str, float],
    now: float,
) -> ClusterSnapshot:
    """``now`` and ``ensured`` (model → time of its last EnsureModel) are in s since the epoch."""
    last_used: dict[str, float] = dict(ensured)
    pressing: set[str] = set()  # requests in flight or queued right now
    for router in demand:
        for d in router.models:
            last_used[d.model] = max(last_used.get(d.model, 0.0), d.last_request_unix_ms / 1000)
            if d.in_flight or d.queued:
                pressing.add(d.model)
    measured: dict[str, int] = defaultdict(int)
    failed: set[tuple[str, str]] = set()
    for r in replicas:
        measured[r.model] = max(measured[r.model], int(r.memory_bytes))
        if r.state == cluster_pb2.REPLICA_STATE_FAILED:
            failed.add((r.model, r.node_id))
    views = []
    for spec in models:
        used = last_used.get(spec.name, 0.0)
        idle = spec.idle_timeout_s or DEFAULT_IDLE_S
        in_demand = spec.name in pressing or (used > 0 and now - used < idle)
        memory = measured.get(spec.name) or int(spec.memory_bytes)  # measured beats estimated
        views.append(
            ModelView(
                name=spec.name,
                need_bytes=need_bytes(memory, int(spec.kv_headroom_bytes)),
                wanted=wanted_replicas(spec.min_replicas, spec.max_replicas, in_demand),
                min_replicas=spec.min_replicas,
                priority=spec.priority or common_pb2.PRIORITY_NORMAL,
                last_used=used,
            )
        )
    current: dict[str, set[str]] = defaultdict(set)
    offloaded: dict[str, dict[str, int]] = defaultdict(dict)
    for p in placements:
        if p.tier in (cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK):
            offloaded[p.node_id][p.model] = int(p.tier)
        else:
            current[p.node_id].add(p.model)
    return ClusterSnapshot(
        nodes=tuple(
            NodeView(n.node_id, int(n.capacity_bytes), n.draining, int(n.host_capacity_bytes))
            for n in nodes
        ),
        models=tuple(views),
        current={k: frozenset(v) for k, v in current.items()},
        failed=frozenset(failed),
        offloaded={k: dict(v) for k, v in offloaded.items()},
    )
