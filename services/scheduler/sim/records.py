"""The simulated fleet as the records a real scheduler reads from etcd (ModelSpec, NodeStatus,
ReplicaStatus, Placement, RouterDemand), so each simulated round decides through the leader's
own `snapshot.round_snapshot`: the same memory rule (`weights.need_bytes`), autoscaler state,
device saturation and adapters' folding as a live round."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from meshserve.scheduler.latency import BASE_TTFT_S
from meshserve.scheduler.sim.scenario import Scenario, SimModel
from meshserve.v1 import cluster_pb2
from meshserve.weights import need_bytes

UTILIZATION_TARGET = 0.6  # autoscaler: requests/s per replica = capacity x this
HOST_BYTES = 256 * 10**9  # CPU RAM per node for offloaded models


@dataclass(frozen=True)
class Gpu:
    node: str
    memory_bytes: int
    kind: str
    cost_per_hour: float
    tokens_per_s: float


@dataclass
class SimReplica:
    node: str
    devices: tuple[str, ...]
    ready_at: float


def gpus_for(m: SimModel, device_bytes: int) -> int:
    """GPUs one replica of ``m`` spans (tensor parallel), by the scheduler's memory rule."""
    return max(1, math.ceil(need_bytes(m.memory_bytes, 0) / device_bytes))


def model_specs(
    sc: Scenario, device_bytes: int, tokens_per_s: float, nodes: int
) -> list[cluster_pb2.ModelSpec]:
    """What an operator would apply for each simulated model: its size (weights and runtime, no
    separate KV headroom), gang, minimum, one replica per node at most, the throughput target
    the autoscaler scales on, and the scenario's SLO and timeouts."""
    out = []
    for m in sc.models:
        g = gpus_for(m, device_bytes)
        out.append(
            cluster_pb2.ModelSpec(
                name=m.name,
                memory_bytes=m.memory_bytes,
                min_replicas=m.min_replicas,
                max_replicas=nodes,
                priority=m.priority,  # type: ignore[arg-type]
                gpus_per_replica=g,
                target_rps_per_replica=tokens_per_s * g / m.tokens_per_request * UTILIZATION_TARGET,
                slo_ttft_ms=round(sc.slo_ttft_s * 1000),
                idle_timeout_s=round(sc.idle_timeout_s),
                scale_down_delay_s=round(sc.scale_down_delay_s),
                warm_in=m.warm_in,
            )
        )
    return out


def node_statuses(
    nodes: Mapping[str, list[str]],
    gpus: Mapping[str, Gpu],
    down: set[str],
    device_load: Mapping[str, float],
) -> list[cluster_pb2.NodeStatus]:
    """Each live node as its agent reports it: GPUs, their decode capacity and current rate."""
    out = []
    for node, ids in nodes.items():
        if node in down:
            continue
        out.append(
            cluster_pb2.NodeStatus(
                node_id=node,
                capacity_bytes=sum(gpus[d].memory_bytes for d in ids),
                host_capacity_bytes=HOST_BYTES,
                gpus=[
                    cluster_pb2.GpuDevice(
                        uuid=d, name=gpus[d].kind, memory_total_bytes=gpus[d].memory_bytes
                    )
                    for d in ids
                ],
                throughput=[
                    cluster_pb2.DeviceThroughput(
                        device_id=d,
                        decode_tokens_per_s=min(device_load.get(d, 0.0), gpus[d].tokens_per_s),
                        capacity_tokens_per_s=gpus[d].tokens_per_s,
                    )
                    for d in ids
                ],
            )
        )
    return out


def cluster_records(
    replicas: Mapping[str, list[SimReplica]],
    offloaded: Mapping[str, Mapping[str, int]],
    down: set[str],
    t: float,
    tokens_per_s: Mapping[str, float],
) -> tuple[list[cluster_pb2.Placement], list[cluster_pb2.ReplicaStatus]]:
    """The placements in force (on devices, and offloaded to a node's RAM or disk) and each
    placed replica's state (READY once loaded, LOADING before) with the decode rate its agent
    measures (the model's demand in tokens/s, shared evenly by its READY replicas)."""
    placements, statuses = [], []
    for name, reps in replicas.items():
        ready = sum(1 for r in reps if r.ready_at <= t)
        for r in reps:
            placements.append(
                cluster_pb2.Placement(
                    model=name, node_id=r.node, devices=r.devices, tier=cluster_pb2.TIER_DEVICE
                )
            )
            state = (
                cluster_pb2.REPLICA_STATE_READY
                if r.ready_at <= t
                else cluster_pb2.REPLICA_STATE_LOADING
            )
            rate = tokens_per_s.get(name, 0.0) / ready if r.ready_at <= t else 0.0
            statuses.append(
                cluster_pb2.ReplicaStatus(
                    model=name, node_id=r.node, state=state, decode_tokens_per_s=rate
                )
            )
    for node, waiting in offloaded.items():
        if node not in down:
            for name, tier in waiting.items():
                placements.append(
                    cluster_pb2.Placement(model=name, node_id=node, tier=tier)  # type: ignore[arg-type]
                )
    return placements, statuses


def router_demand(
    rates: Mapping[str, float],
    ready: Mapping[str, int],
    last_request: Mapping[str, float],
    p99: Mapping[str, float],
) -> list[cluster_pb2.RouterDemand]:
    """The demand one router would publish for the step: rate, requests in flight, requests
    queued for a model with nothing READY, the last request's time, TTFT p99."""
    return [
        cluster_pb2.RouterDemand(
            router_id="sim",
            models=[
                cluster_pb2.ModelDemand(
                    model=name,
                    request_rate=rate,
                    in_flight=round(rate * BASE_TTFT_S),
                    queued=1 if rate > 0 and not ready.get(name) else 0,
                    last_request_unix_ms=round(last_request.get(name, 0.0) * 1000),
                    ttft_p99_s=p99.get(name, 0.0),
                )
                for name, rate in rates.items()
            ],
        )
    ]
