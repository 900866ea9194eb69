"""Moves that only a full re-plan makes (nothing was placed before, so nothing running moves):
relocating single- or multi-device models to make room for a replica that fits nowhere, and
consolidating: emptying the least-used devices into the others. Functions over the round's
`Pipeline`; moves are made in its state."""

from __future__ import annotations

from meshserve.scheduler.pipeline import Choice, Pipeline
from meshserve.scheduler.views import ModelView

RELOCATE_TRIES = 16  # devices tried per replica that fits nowhere in a full re-plan
REPACK_TRIES = 16  # devices a re-pack tries to empty per round


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
    movers = _movers(pipe, d)
    if any(_stays(pipe, x) for x in movers):
        return False
    return _move_off(pipe, d, movers, other_node=False) is not None


def _movers(pipe: Pipeline, d: int) -> list[str]:
    """The models on device ``d``, largest first (the hardest to fit is tried first)."""
    st = pipe.st
    return sorted(st.dev_models[d], key=lambda x: (-st.models[x].need_bytes, x))


def _stays(pipe: Pipeline, model: str) -> bool:
    """Never moved to empty a device: gangs stay where they are; spread models were spread on
    purpose."""
    m = pipe.st.models[model]
    return m.gpus > 1 or pipe.st.strategy_of(m) == "spread"


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


def consolidation_target(
    pipe: Pipeline, m: ModelView, source: int, other_node: bool = False
) -> int | None:
    """A used device other than ``source`` with room, on a node that passes the filters (and
    is not ``source``'s, with ``other_node``); the tightest fit."""
    st = pipe.st
    share = m.per_device_bytes
    for _free, d in st.index.irange((share, -1), None):
        if d == source or not st.dev_models[d] or not st.fits(m, d):
            continue
        if other_node and st.dev_node[d] == st.dev_node[source]:
            continue
        if pipe.rejects(m, st.dev_node[d], pipe.pre_filters) is None:
            return int(d)
    return None


def fragmentation(pipe: Pipeline) -> int:
    """Devices in use beyond the fewest whose memory could hold what is placed (largest first,
    among devices in use or taking new replicas): what fragmentation costs, in GPUs."""
    st = pipe.st
    used = [d for d in range(len(st.capacity)) if st.dev_models[d]]
    held = sum(st.capacity[d] - st.free[d] for d in used)
    usable = set(used) | {d for _free, d in st.index}
    total, fewest = 0, 0
    for cap in sorted((st.capacity[d] for d in usable), reverse=True):
        if total >= held:
            break
        total, fewest = total + cap, fewest + 1
    return len(used) - fewest


Move = tuple[str, str, int, str]  # (model, old node, old device, new node)


def repack(
    pipe: Pipeline, budget: int, slack: int, settled: frozenset[tuple[str, str]]
) -> list[Move]:
    """Background re-pack of a running fleet (incremental rounds): while fragmentation costs
    more than ``slack`` GPUs, empty the least-used devices into other used devices on *other*
    nodes, at most ``budget`` replicas moved in all. Only ``settled`` replicas move (READY and
    placed before this round), each model at most once, none already moving; gangs and `spread`
    models stay. A device holding more replicas than the budget has left is emptied over several
    rounds: all of its moves must be possible now, the first ones within the budget are made, and
    the rest wait for the next minute's budget (the device, now the least used, comes first
    again). Each move is made before it breaks: the caller keeps the old replica placed until
    the new one is READY (`Placer`), so a move never takes a model below its READY replicas. At
    most REPACK_TRIES devices are tried per round (rounds stay cheap when nothing can move)."""
    st = pipe.st
    moves: list[Move] = []
    moving = {model for model, _node in st.leaving}
    tries = 0
    while budget - len(moves) > 0 and fragmentation(pipe) > slack and tries < REPACK_TRIES:
        used = [d for d in range(len(st.capacity)) if st.dev_models[d]]
        done = None
        for d in sorted(used, key=lambda d: (st.capacity[d] - st.free[d], d)):
            movers = _movers(pipe, d)
            if any(
                _stays(pipe, x) or x in moving or (x, st.dev_node[d]) not in settled for x in movers
            ):
                continue
            tries += 1
            done = _move_off(pipe, d, movers)
            if done is not None or tries >= REPACK_TRIES:
                break
        if done is None:
            break
        done = _within(pipe, d, done, budget - len(moves))
        moves += done
        moving.update(m for m, *_rest in done)
    return moves


def _within(pipe: Pipeline, d: int, done: list[Move], left: int) -> list[Move]:
    """The first ``left`` of a device's moves; the others undone (they wait on ``d``)."""
    st = pipe.st
    for model, node_id, _d, to in done[left:]:
        m = st.models[model]
        st.unbind(model, to)
        st.bind(m, node_id, (d,))
    return done[:left]


def _move_off(
    pipe: Pipeline, d: int, movers: list[str], other_node: bool = True
) -> list[Move] | None:
    """Every model on device ``d`` moved to another used device (on another node, with
    ``other_node``), or nothing moved."""
    st = pipe.st
    node_id = st.dev_node[d]
    moved: list[tuple[ModelView, int]] = []
    for x in movers:
        m = st.models[x]
        st.unbind(x, node_id)
        target = consolidation_target(pipe, m, d, other_node)
        if target is None:
            st.bind(m, node_id, (d,))
            for y, to in reversed(moved):  # undo
                st.unbind(y.name, st.dev_node[to])
                st.bind(y, node_id, (d,))
            return None
        st.bind(m, st.dev_node[target], (target,))
        moved.append((m, target))
    return [(m.name, node_id, d, st.dev_node[to]) for m, to in moved]
