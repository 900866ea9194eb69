"""Whether this node takes a stream for a known model now, and if not, the status that tells
the caller (or the router) what to do: UNAVAILABLE (not ready here, node draining; the router
tries another replica) or RESOURCE_EXHAUSTED (at its stream limit; retry shortly). An unknown
model is NOT_FOUND before this."""

from __future__ import annotations

import grpc
from meshserve.nodeagent.replica import Replica
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2


def admit(
    spec: cluster_pb2.ModelSpec,
    r: Replica | None,
    node_id: str,
    draining: bool,
    max_in_flight: int,
) -> Replica:
    """``r`` when it may take one more stream; else raises ServiceError."""
    if r is None or not r.ready or r.unloading:
        state = "not placed" if r is None else cluster_pb2.ReplicaState.Name(r.status.state)
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"model {spec.name!r} is {state} on node {node_id}; call the router, which "
            "sends requests to a READY replica",
            "REPLICA_NOT_READY",
            retry_after_s=1.0,
        )
    if draining:
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"node {node_id} is draining",
            "NODE_DRAINING",
            retry_after_s=1.0,
        )
    assert r.engine is not None
    if r.engine.in_flight >= max_in_flight:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"model {spec.name!r} on node {node_id} is serving its limit of "
            f"{max_in_flight} streams",
            "REPLICA_BUSY",
            retry_after_s=0.2,
        )
    return r
