"""Eviction, Kubernetes' post-filter/preemption step: when no node fits a replica, the node
where the cheapest victims make room (profile.eviction: `cost_aware` or `lru`). Functions over
the round's `Pipeline`; victims are unbound in its state and recorded there."""

from __future__ import annotations

from meshserve.scheduler.pipeline import Choice, Pipeline
from meshserve.scheduler.plugins import VICTIM_ORDERS, may_evict
from meshserve.scheduler.views import DISK, HOST, ModelView, NodeView


def evict_for(pipe: Pipeline, m: ModelView) -> Choice | None:
    """The node where evicting the cheapest victims makes room for one replica of ``m``; the
    victims are evicted. None when no node can be cleared (higher priorities are never evicted
    for lower ones)."""
    st = pipe.st
    order = VICTIM_ORDERS[pipe.profile.eviction]
    share = m.per_device_bytes
    best_key: tuple[object, ...] | None = None
    best: tuple[str, tuple[int, ...], list[str]] | None = None
    for node_id, node in st.nodes.items():
        if node.closed or pipe.rejects(m, node_id, pipe.pre_filters) is not None:
            continue
        options: list[tuple[tuple[float, ...], list[str], int]] = []
        for d in st.node_devices[node_id]:
            if not st.allowed(m, d) or st.capacity[d] < share:
                continue
            room, chosen = st.free[d], []
            load = st.load[d]
            cap = st.throughput[d] * pipe.profile.compute_target
            victims = sorted(
                (
                    st.models[x]
                    for x in st.dev_models[d]
                    if may_evict(st.models[x], m, st.replicas(x))
                ),
                key=lambda v: (
                    *order(v, wait_tier(v, node), pipe.profile.reload),
                    v.name,
                ),
            )
            for v in victims:
                if room >= share and (not cap or load + m.per_device_load <= cap):
                    break
                chosen.append(v.name)
                room += v.per_device_bytes
                load -= v.per_device_load
            if room >= share and (not cap or load + m.per_device_load <= cap):
                options.append((victims_cost(pipe, chosen, node), chosen, d))
        if len(options) < m.gpus:
            continue
        options.sort(key=lambda o: (o[0], o[2]))
        take = options[: m.gpus]
        victims_all = sorted({v for o in take for v in o[1]})
        if not victims_all:
            continue  # it fits without eviction: _choose handles that
        tier = st.offloaded.get(node_id, {}).get(m.name, 0)
        key = (victims_cost(pipe, victims_all, node, m, tier), tier == 0, node_id)
        if best_key is None or key < best_key:
            best_key, best = key, (node_id, tuple(sorted(o[2] for o in take)), victims_all)
    if best is None:
        return None
    node_id, devices, victims_all = best
    for name in victims_all:
        st.evict(name, node_id)
    # A victim's other devices freed room too; re-pick the best devices on the node.
    devices = st.best_devices(m, node_id) or devices
    return node_id, devices, 0.0


def wait_tier(v: ModelView, node: NodeView) -> int:
    """Where an evicted replica waits on ``node``: CPU RAM when the host budget could hold it."""
    return HOST if node.host_capacity_bytes >= v.need_bytes else DISK


def victims_cost(
    pipe: Pipeline,
    victims: list[str],
    node: NodeView,
    asker: ModelView | None = None,
    asker_tier: int = 0,
) -> tuple[float, ...]:
    """lru: (victims, their priorities). cost_aware: (highest victim priority, expected
    reload cost = reload seconds from where each victim will wait x its request rate, plus
    the asker's own load time on this node (a restore from CPU RAM beats a load from the
    source) as if one request/s waited for it, victims)."""
    ms = [pipe.st.models[v] for v in victims]
    if pipe.profile.eviction == "lru":
        return (float(len(ms)), float(sum(v.priority for v in ms)))
    reload = pipe.profile.reload
    cost = sum(reload.seconds(v.need_bytes, wait_tier(v, node)) * v.request_rate for v in ms)
    if asker is not None:
        cost += reload.seconds(asker.need_bytes, asker_tier) * max(asker.request_rate, 1.0)
    return (float(max((v.priority for v in ms), default=0)), cost, float(len(ms)))
