"""Builders that make test data read like a specification (STYLE)."""

from __future__ import annotations

import meshserve.v1.cluster_pb2 as cluster_pb2
from meshserve.scheduler.views import ClusterSnapshot, ModelView, NodeView

GiB = 2**30
MiB = 2**20


def node(node_id: str, gib: float, draining: bool = False) -> NodeView:
    return NodeView(node_id, int(gib * GiB), draining)


def model(
    name: str,
    gib: float,
    wanted: int = 1,
    min_replicas: int = 0,
    priority: int = 2,
    last_used: float = 0.0,
) -> ModelView:
    """``gib`` is the need already including headroom and overhead."""
    return ModelView(name, int(gib * GiB), wanted, min_replicas, priority, last_used)


def snapshot(
    nodes: list[NodeView],
    models: list[ModelView],
    current: dict[str, set[str]] | None = None,
    failed: set[tuple[str, str]] | None = None,
) -> ClusterSnapshot:
    return ClusterSnapshot(
        tuple(nodes),
        tuple(models),
        {k: frozenset(v) for k, v in (current or {}).items()},
        frozenset(failed or ()),
    )


def spec(name: str, source: str = "/nonexistent", **kw: object) -> cluster_pb2.ModelSpec:
    return cluster_pb2.ModelSpec(name=name, source=source, **kw)  # type: ignore[arg-type]
