"""Where models leave the device for: CPU RAM or local disk on their node (pure)."""

from __future__ import annotations

from collections.abc import Container, Mapping

from meshserve.scheduler.views import DISK, HOST, ClusterSnapshot, ModelView, NodeView


def demote(
    snap: ClusterSnapshot,
    models: Mapping[str, ModelView],
    assign: Mapping[str, frozenset[str]],
    evictions: list[tuple[str, str]],
    count: Mapping[str, int],
    gone: Container[tuple[str, str]] = frozenset(),
) -> dict[str, dict[str, int]]:
    """Where models off the device wait. First, warm-in-host minimums (`ModelView.warm_host`):
    the copies fewer replicas on devices leave short sleep in CPU RAM, ahead of everything else
    in the host budget. Evicted (or already offloaded) models that are still
    wanted: CPU RAM while the node's host budget allows, else disk; victims of this round first,
    then older ones. Then, with what budget is left, CPU RAM only (else nothing): models scaled
    to zero (their next request restores in well under a second instead of loading from the
    source) and spare replicas, scaled down or evicted while enough others serve (a router that
    finds the READY ones saturated wakes one: EnsureModel ``wake``) — never for a replica in
    ``gone`` (it FAILED there, or leaves a failed device or a drained node) nor on a node that
    drains."""
    alive = {n.node_id: n for n in snap.nodes}

    def keeps(node: NodeView) -> bool:
        """Keeps copies of models off its devices: not draining, not drained by an operator."""
        return not node.draining and node.cordon != "drain"

    waiting = sorted((m, n) for n, ms in snap.offloaded.items() for m in ms)
    idle = sorted(
        (m, n)
        for n, ms in snap.current.items()
        for m in ms
        if m in models and models[m].wanted == 0
    )
    spare = sorted(
        (m, n)
        for n, ms in snap.current.items()
        for m in ms
        if m in models
        and models[m].wanted > 0
        and m not in assign.get(n, frozenset())
        and (m, n) not in gone
        and n in alive
        and keeps(alive[n])
    )
    out: dict[str, dict[str, int]] = {}
    host_used: dict[str, int] = {}

    def room(node: NodeView, m: ModelView) -> bool:
        return host_used.get(node.node_id, 0) + m.need_bytes <= node.host_capacity_bytes

    def keep(model: str, node_id: str, tier: int) -> None:
        out.setdefault(node_id, {})[model] = tier
        if tier == HOST:
            host_used[node_id] = host_used.get(node_id, 0) + models[model].need_bytes

    # Warm-in-host minimums first (ModelView.warm_host): what fewer replicas on devices leave
    # short sleeps in CPU RAM, copies already there before those leaving a device now.
    asleep = sorted((m, n) for n, ms in snap.offloaded.items() for m, t in ms.items() if t == HOST)
    leaving = sorted((m, n) for m, n in spare + idle if models[m].warm_host)
    short = {m.name: m.warm_host - count.get(m.name, 0) for m in models.values() if m.warm_host}
    for model, node_id in [*asleep, *leaving]:
        node = alive.get(node_id)
        if short.get(model, 0) <= 0 or node is None or (model, node_id) in gone:
            continue
        if not keeps(node) or model in assign.get(node_id, frozenset()):
            continue  # a draining node keeps nothing; the device copy here stays
        if model not in out.get(node_id, {}) and room(node, models[model]):
            keep(model, node_id, HOST)
            short[model] -= 1
    for model, node_id in [*evictions, *waiting]:
        m = models.get(model)
        node = alive.get(node_id)
        if m is None or node is None or m.wanted == 0 or model in out.get(node_id, {}):
            continue  # gone, dead node, scaled to zero (below), or already decided
        if model in assign.get(node_id, frozenset()) or count.get(model, 0) >= m.wanted:
            continue  # on the device here, or enough replicas elsewhere
        keep(model, node_id, HOST if room(node, m) else DISK)
    for model, node_id in [*idle, *spare, *waiting]:
        m = models.get(model)
        node = alive.get(node_id)
        if m is None or node is None or model in out.get(node_id, {}):
            continue
        if model in assign.get(node_id, frozenset()) or count.get(model, 0) < m.wanted:
            continue  # on the device here, or wanted and decided above
        if snap.offloaded.get(node_id, {}).get(model, HOST) == HOST and room(node, m):
            keep(model, node_id, HOST)
    return out
