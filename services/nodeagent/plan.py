"""What the agent should do next (pure): desired placements + model specs + the replicas here +
the highest epoch seen → a list of actions. No I/O, no clock (``now`` is passed in), no engine.

Level-triggered (DESIGN §1): the same inputs give the same actions, so the reconciler can run it
on every watch event and every few seconds; nothing depends on an event arriving once.

- A placement from an older epoch than the newest seen was written by a deposed leader: what is
  here for it stays (neither loaded nor unloaded) until the current leader rewrites it.
- A model placed here and not held (or FAILED long enough ago) is loaded, in the tier placed.
- A settled replica (READY or OFFLOADED) whose placement names another tier moves there.
- A replica no placement wants, and that an operator did not load by hand, is unloaded.
- Nothing is asked of a replica while a load, tier change or unload is under way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshserve.v1 import cluster_pb2

S = cluster_pb2
SETTLED = (S.REPLICA_STATE_READY, S.REPLICA_STATE_OFFLOADED)


@dataclass(frozen=True)
class Held:
    """A replica on this node, as the planner sees it."""

    state: int  # meshserve.v1.ReplicaState
    epoch: int  # the placement epoch it last reported
    asked_tier: int  # the tier last asked of its engine (meshserve.v1.Tier)
    busy: bool = False  # a load, tier change or unload is under way
    unloading: bool = False
    manual: bool = False  # loaded by an operator's LoadModel: placements do not unload it
    failed_at: float = 0.0  # monotonic s of its last failure


@dataclass(frozen=True)
class Load:
    spec: cluster_pb2.ModelSpec
    epoch: int
    tier: int  # where it should settle (TIER_DEVICE, or a lower tier: a prefetch)
    budget_bytes: int  # memory the placement grants
    devices: tuple[str, ...]  # GPU uuids the placement names
    trace_parent: str = ""  # the placing round's W3C traceparent (links the load to it)
    reason: str = ""  # the placement's reason (published for requests that wait on the load)


@dataclass(frozen=True)
class SetEpoch:
    """The replica now serves a newer placement: publish the new epoch."""

    model: str
    epoch: int


@dataclass(frozen=True)
class ChangeTier:
    model: str
    tier: int
    trace_parent: str = ""  # the round that asked for the move (links the offload or restore)
    reason: str = ""  # the placement's reason


@dataclass(frozen=True)
class Unload:
    model: str


Action = Load | SetEpoch | ChangeTier | Unload


@dataclass(frozen=True)
class Actions:
    max_epoch: int  # the highest placement epoch seen so far
    actions: tuple[Action, ...]


def plan(
    placements: Iterable[cluster_pb2.Placement],
    specs: Mapping[str, cluster_pb2.ModelSpec],
    held: Mapping[str, Held],
    max_epoch: int,
    now: float,
    load_retry_s: float,
) -> Actions:
    """The actions that move this node towards its placements (see the module docstring)."""
    placements = list(placements)
    max_epoch = max([max_epoch, *(p.epoch for p in placements)])
    current = {p.model: p for p in placements if p.epoch >= max_epoch}
    stale = {p.model for p in placements if p.epoch < max_epoch}
    out: list[Action] = []
    for model, p in current.items():
        spec = specs.get(model)
        if spec is None:
            continue  # the model was deleted; its placement goes with the next round
        h = held.get(model)
        retry = (
            h is not None
            and h.state == S.REPLICA_STATE_FAILED
            and not h.busy
            and now - h.failed_at > load_retry_s
        )
        if h is None or retry:
            tier = p.tier or S.TIER_DEVICE
            devices = tuple(p.devices)
            out.append(Load(spec, p.epoch, tier, p.memory_bytes, devices, p.trace_parent, p.reason))
            continue
        if h.epoch != p.epoch and not h.unloading:
            out.append(SetEpoch(model, p.epoch))
        want_tier = p.tier or S.TIER_DEVICE
        if h.state in SETTLED and not h.busy and not h.unloading and h.asked_tier != want_tier:
            out.append(ChangeTier(model, want_tier, p.trace_parent, p.reason))
    for model, h in held.items():
        wanted = model in current or model in stale or h.manual
        if not wanted and not h.unloading and not h.busy:
            out.append(Unload(model))
    return Actions(max_epoch, tuple(out))
