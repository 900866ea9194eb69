"""What a plan means in etcd (pure): the Placement records it wants, and the puts and deletes that
turn what etcd holds into them. Every record carries the leader's epoch (its fencing token)."""

from __future__ import annotations

from collections.abc import Mapping

from meshserve.cluster.keys import Keyspace
from meshserve.scheduler.views import Plan
from meshserve.v1 import cluster_pb2
from meshserve.weights import grant_bytes

Put = tuple[bytes, cluster_pb2.Placement]
KEPT = "kept in place"
OFFLOADED = "evicted; kept offloaded for a quick restore"


def wanted_placements(
    plan: Plan, specs: Mapping[str, cluster_pb2.ModelSpec], epoch: int, keys: Keyspace
) -> dict[bytes, cluster_pb2.Placement]:
    """Key → Placement for every replica on a device and every model offloaded on a node."""
    want: dict[bytes, cluster_pb2.Placement] = {}
    for node_id, models in plan.assignments.items():
        for model in models:
            decision = plan.decisions.get(model)
            reason = (
                next((v.reason for v in decision.verdicts if v.node_id == node_id), KEPT)
                if decision
                else ""
            )
            spec = specs[model]
            want[keys.placement(node_id, model)] = cluster_pb2.Placement(
                model=model,
                node_id=node_id,
                tier=cluster_pb2.TIER_DEVICE,
                epoch=epoch,
                memory_bytes=grant_bytes(spec.memory_bytes, spec.kv_headroom_bytes),
                reason=reason,
                devices=[d for d in plan.devices.get((model, node_id), ()) if d],
            )
    for node_id, offloads in plan.offloads.items():
        for model, tier in offloads.items():
            want[keys.placement(node_id, model)] = cluster_pb2.Placement(
                model=model,
                node_id=node_id,
                tier=tier,  # type: ignore[arg-type]
                epoch=epoch,
                memory_bytes=specs[model].memory_bytes,  # weights only: no KV cache off-device
                reason=OFFLOADED,
            )
    return want


def changes(
    want: Mapping[bytes, cluster_pb2.Placement], current: Mapping[bytes, cluster_pb2.Placement]
) -> tuple[list[Put], list[bytes]]:
    """Puts for records that are new or differ in what an agent acts on; deletes for the rest."""
    puts = []
    for key, p in want.items():
        old = current.get(key)
        if old is None or (old.tier, old.epoch, old.memory_bytes, list(old.devices)) != (
            p.tier,
            p.epoch,
            p.memory_bytes,
            list(p.devices),
        ):
            puts.append((key, p))
    deletes = [key for key in current if key not in want]
    return puts, deletes
