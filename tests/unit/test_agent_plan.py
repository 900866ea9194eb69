"""The node agent's planner (pure): placements + specs + replicas held + epoch → actions."""

from __future__ import annotations

import pytest
from meshserve.nodeagent.plan import (
    Action,
    ChangeTier,
    Held,
    Load,
    SetEpoch,
    Unload,
    plan,
)
from meshserve.v1 import cluster_pb2 as S

RETRY_S = 30.0
NOW = 1000.0
SPECS = {n: S.ModelSpec(name=n, source=f"/m/{n}") for n in ("a", "b")}


def placed(model: str, epoch: int = 7, tier: int = 0, grant: int = 0, gpus: int = 0) -> S.Placement:
    devices = [f"GPU-{i}" for i in range(gpus)]
    p = S.Placement(model=model, node_id="n", epoch=epoch, memory_bytes=grant, devices=devices)
    p.tier = tier  # type: ignore[assignment]
    return p


def held(state: int = S.REPLICA_STATE_READY, epoch: int = 7, **kw: object) -> Held:
    return Held(state=state, epoch=epoch, asked_tier=kw.pop("asked_tier", S.TIER_DEVICE), **kw)  # type: ignore[arg-type]


CASES: list[tuple[str, list[S.Placement], dict[str, Held], int, list[Action]]] = [
    # A new placement loads, with the grant, tier and GPUs it names.
    (
        "load what is placed",
        [placed("a", grant=5, gpus=2)],
        {},
        0,
        [Load(SPECS["a"], 7, S.TIER_DEVICE, 5, ("GPU-0", "GPU-1"))],
    ),
    # Placed straight into CPU RAM: the load settles there (a prefetch).
    ("prefetch into a lower tier", [placed("a", tier=S.TIER_HOST)], {}, 0,
     [Load(SPECS["a"], 7, S.TIER_HOST, 0, ())]),
    # Already READY at the same epoch: nothing to do.
    ("steady", [placed("a")], {"a": held()}, 7, []),
    # A newer leader rewrote the placement: publish its epoch, nothing reloads.
    ("new epoch", [placed("a", epoch=9)], {"a": held(epoch=7)}, 7, [SetEpoch("a", 9)]),
    # Placement moved to CPU RAM: offload the settled replica.
    ("offload", [placed("a", tier=S.TIER_HOST)], {"a": held()}, 7,
     [ChangeTier("a", S.TIER_HOST)]),
    # Back to the device from OFFLOADED: restore.
    ("restore", [placed("a")],
     {"a": held(S.REPLICA_STATE_OFFLOADED, asked_tier=S.TIER_HOST)}, 7,
     [ChangeTier("a", S.TIER_DEVICE)]),
    # A replica in the middle of something is never asked for more.
    ("busy waits", [placed("a", tier=S.TIER_HOST)], {"a": held(busy=True)}, 7, []),
    # Still loading (not settled): no tier change yet.
    ("loading waits", [placed("a", tier=S.TIER_HOST)],
     {"a": held(S.REPLICA_STATE_LOADING)}, 7, []),
    # Engine settled elsewhere than asked (vLLM CPU → disk): not asked again.
    ("asked already", [placed("a", tier=S.TIER_HOST)],
     {"a": held(S.REPLICA_STATE_OFFLOADED, asked_tier=S.TIER_HOST)}, 7, []),
    # No placement wants it: unload.
    ("unplaced unloads", [], {"a": held()}, 7, [Unload("a")]),
    # Loaded by an operator: placements do not unload it.
    ("manual stays", [], {"a": held(manual=True)}, 7, []),
    # Already unloading: not started twice.
    ("unloading once", [], {"a": held(unloading=True, busy=True)}, 7, []),
    # A placement from a deposed leader (older epoch than seen): neither load nor unload.
    ("stale epoch keeps", [placed("a", epoch=3), placed("b", epoch=9)], {"a": held(epoch=3)},
     9, [Load(SPECS["b"], 9, S.TIER_DEVICE, 0, ())]),
    ("stale epoch does not load", [placed("a", epoch=3)], {}, 9, []),
    # FAILED long enough ago: load again; too recent: wait.
    ("retry after failure", [placed("a")],
     {"a": held(S.REPLICA_STATE_FAILED, failed_at=NOW - RETRY_S - 1)}, 7,
     [Load(SPECS["a"], 7, S.TIER_DEVICE, 0, ())]),
    ("failure too recent", [placed("a")],
     {"a": held(S.REPLICA_STATE_FAILED, failed_at=NOW - 1)}, 7, []),
    # A placement for a model whose spec is gone: nothing (the next round removes it).
    ("unknown model", [placed("zzz")], {}, 0, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("placements", "holding", "max_epoch", "expected"),
    [pytest.param(p, h, e, x, id=name) for name, p, h, e, x in CASES],
)
def test_plan(
    placements: list[S.Placement], holding: dict[str, Held], max_epoch: int, expected: list[Action]
) -> None:
    out = plan(placements, SPECS, holding, max_epoch, NOW, RETRY_S)
    assert list(out.actions) == expected


def test_highest_epoch_is_remembered() -> None:
    assert plan([placed("a", epoch=4)], SPECS, {}, 9, NOW, RETRY_S).max_epoch == 9
    assert plan([placed("a", epoch=12)], SPECS, {}, 9, NOW, RETRY_S).max_epoch == 12
