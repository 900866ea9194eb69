"""Moves that only a full re-plan makes (nothing was placed before, so nothing running moves):
relocating single- or multi-device models to make room for a replica that fits nowhere, and
consolidating: emptying the least-used devices into the others. Functions over the round's
`Pipeline`; moves are made in its state."""

from __future__ import annotations

from meshserve.scheduler.pipeline import Choice, Pipeline
from meshserve.scheduler.views import ModelView

RELOCATE_TRIES = 16  # devices tried per replica that fits nowhere in a full re-plan


def consolidate(pipe: Pipeline) -> None:
    """Empty the least-used devices when everything on them fits on the other used devices."""
    st = pipe.st
    for _ in range(len(st.capacity)):
        used = [d for d in range(len(st.capacity)) if st.dev_models[d]]
        progress = False
        for d in sorted(used, key=lambda d: (st.capacity[d] - st.free[d], d)):
            if try_empty(pipe, d):
                progress = True
                break
        if not progress:
            return


def try_empty(pipe: Pipeline, d: int) -> bool:
    """Moves every model off device ``d`` into other used devices, or changes nothing."""
    st = pipe.st
    node_id = st.dev_node[d]
    movers = sorted(st.dev_models[d], key=lambda x: (-st.models[x].need_bytes, x))
    if any(st.models[x].gpus > 1 or st.strategy_of(st.models[x]) == "spread" for x in movers):
        return False  # gangs stay where they are; spread models were spread on purpose
    moved: list[tuple[ModelView, int]] = []
    for x in movers:
        m = st.models[x]
        st.unbind(x, node_id)
        target = consolidation_target(pipe, m, d)
        if target is None:
            st.bind(m, node_id, (d,))
            for y, to in reversed(moved):  # undo
                st.unbind(y.name, st.dev_node[to])
                st.bind(y, node_id, (d,))
            return False
        st.bind(m, st.dev_node[target], (target,))
        moved.append((m, target))
    return True


def relocate_for(pipe: Pipeline, m: ModelView) -> Choice | None:
    """Full re-plans: room for a single-device ``m`` on one device by moving the models there
    (gangs included) to wherever `Pipeline.choose` would put them without that device; never
    evicting. The devices missing the fewest bytes are tried first, RELOCATE_TRIES of them."""
    st = pipe.st
    share = m.per_device_bytes
    if m.gpus > 1:
        return None
    options = []
    for node_id, node in st.nodes.items():
        if node.draining or pipe.rejects(m, node_id, pipe.pre_filters) is not None:
            continue
        for d in st.node_devices[node_id]:
            if st.allowed(m, d) and st.capacity[d] >= share:
                options.append((share - st.free[d], d))
    options.sort()
    for _missing, d in options[:RELOCATE_TRIES]:
        node_id = st.dev_node[d]
        moved: list[tuple[ModelView, tuple[int, ...], str, tuple[int, ...]]] = []
        movers = sorted(
            (st.models[x] for x in st.dev_models[d]), key=lambda x: (x.need_bytes, x.name)
        )
        for x in movers:
            if st.free[d] >= share:
                break
            old = st.placed[(x.name, node_id)]
            st.unbind(x.name, node_id)
            target = elsewhere(pipe, x, d)
            if target is None:
                st.bind(x, node_id, old)
                continue
            st.bind(x, target[0], target[1])
            moved.append((x, old, target[0], target[1]))
        if st.free[d] >= share:
            return node_id, (d,), 0.0
        for x, old, new_node, _new in reversed(moved):  # undo
            st.unbind(x.name, new_node)
            st.bind(x, node_id, old)
    return None


def elsewhere(pipe: Pipeline, x: ModelView, hidden: int) -> tuple[str, tuple[int, ...]] | None:
    """Where ``x`` would go now if device ``hidden`` were not there."""
    st = pipe.st
    saved = st.free[hidden]
    st.set_free(hidden, -1)
    try:
        chosen = pipe.choose(x)
    finally:
        st.set_free(hidden, saved)
    return (chosen[0], chosen[1]) if chosen is not None else None


def consolidation_target(pipe: Pipeline, m: ModelView, source: int) -> int | None:
    """A used device other than ``source`` with room, on a node that passes the filters; the
    tightest fit."""
    st = pipe.st
    share = m.per_device_bytes
    for _free, d in st.index.irange((share, -1), None):
        if d == source or not st.dev_models[d] or not st.fits(m, d):
            continue
        if pipe.rejects(m, st.dev_node[d], pipe.pre_filters) is None:
            return int(d)
    return None
