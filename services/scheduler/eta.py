"""How long until a model can serve (pure): what EnsureModel tells a waiting router, so a request
whose deadline cannot be met fails at once instead of waiting it out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshserve.scheduler.plugins import ReloadCosts
from meshserve.scheduler.views import DISK, HOST
from meshserve.v1 import cluster_pb2
from meshserve.weights import need_bytes

S = cluster_pb2


def ready_in_s(
    spec: cluster_pb2.ModelSpec,
    replicas: Iterable[cluster_pb2.ReplicaStatus],
    measured_s: Mapping[str, float],
    reload: ReloadCosts,
    nodes: Iterable[cluster_pb2.NodeStatus] = (),
) -> float:
    """0 when a replica is READY; else the model's last measured load + warm-up when there is
    one, or its size over the bandwidth of the fastest tier it waits in (CPU RAM, local disk,
    else its source); a registry model no node has cached adds its download at the registry
    bandwidth the agents measured (else the source's seed figure)."""
    mine = [r for r in replicas if r.model == spec.name]
    if any(r.state == S.REPLICA_STATE_READY for r in mine):
        return 0.0
    if measured_s.get(spec.name):
        return measured_s[spec.name]
    tiers = {r.tier for r in mine if r.state == S.REPLICA_STATE_OFFLOADED}
    tier = HOST if S.TIER_HOST in tiers else DISK if S.TIER_DISK in tiers else 0
    seconds = reload.seconds(need_bytes(spec.memory_bytes, spec.kv_headroom_bytes), tier)
    nodes = list(nodes)
    if spec.revision and not tier and not any(spec.revision in n.cached_revisions for n in nodes):
        measured = max((n.registry_bytes_per_s for n in nodes), default=0.0)
        seconds += spec.memory_bytes / (measured or reload.source_bytes_per_s)
    return seconds
