"""What a model's busiest device carries, from the agents' records (pure): the model's own decode
rate (the rates its placed replicas report; one without a status counts 0), the other models'
rate on that device and its capacity, in tokens/s. The SLO-aware autoscaler predicts from it
what TTFT k replicas would give (`autoscale.slo_replicas`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.v1 import cluster_pb2


@dataclass(frozen=True)
class Pressure:
    tokens_per_s: float  # the model's decode rate, over all its replicas
    others_tokens_per_s: float  # other models' decode rate on its busiest device
    capacity_tokens_per_s: float  # that device's decode capacity
    devices_per_replica: int = 1


Device = tuple[str, str]  # (node, device id)


def throughputs(nodes: Iterable[cluster_pb2.NodeStatus]) -> dict[Device, tuple[float, float]]:
    """Each device whose agent reports a decode capacity: (decode rate, capacity), tokens/s."""
    out: dict[Device, tuple[float, float]] = {}
    for n in nodes:
        for t in n.throughput:
            if t.capacity_tokens_per_s > 0:
                rate, capacity = float(t.decode_tokens_per_s), float(t.capacity_tokens_per_s)
                key = (n.node_id, t.device_id)
                if key not in out or rate / capacity > out[key][0] / out[key][1]:
                    out[key] = (rate, capacity)
    return out


def pressures(
    nodes: Iterable[cluster_pb2.NodeStatus],
    placements: Iterable[cluster_pb2.Placement],
    replicas: Iterable[cluster_pb2.ReplicaStatus],
) -> dict[str, Pressure]:
    """Per model whose devices report a capacity: its `Pressure`. A replica's rate is split evenly
    over its devices (a gang's tensor-parallel shards decode together)."""
    device = throughputs(nodes)
    rate = {(r.model, r.node_id): float(r.decode_tokens_per_s) for r in replicas}
    own: dict[str, float] = defaultdict(float)
    mine: dict[tuple[str, Device], float] = {}
    spans: dict[str, list[tuple[Device, int]]] = defaultdict(list)
    for p in placements:
        if p.tier in (cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK) or not p.devices:
            continue
        r = rate.get((p.model, p.node_id), 0.0)
        own[p.model] += r
        for d in p.devices:
            key = (p.node_id, d)
            mine[(p.model, key)] = r / len(p.devices)
            spans[p.model].append((key, len(p.devices)))
    out = {}
    for model, keys in spans.items():
        measured = [(k, g) for k, g in keys if k in device]
        if not measured:
            continue
        key, gang = max(measured, key=lambda kg: device[kg[0]][0] / device[kg[0]][1])
        total, capacity = device[key]
        others = max(0.0, total - mine[(model, key)])
        out[model] = Pressure(own[model], others, capacity, gang)
    return out
