"""What Explain shows: each node's verdict (the filter that rejected it, or its scores) for the
replica a round placed or failed to place, and why a model stays unplaced. Functions over the
round's `Pipeline`; they change nothing."""

from __future__ import annotations

from meshserve.scheduler.pipeline import Pipeline
from meshserve.scheduler.plugins import UNRESOLVABLE
from meshserve.scheduler.views import ModelView, Verdict, mib


def verdicts_of(pipe: Pipeline, m: ModelView) -> tuple[Verdict, ...]:
    """Every node as ``m``'s next replica sees it: the rejecting filter, or the scores."""
    st = pipe.st
    out = []
    for node_id in st.nodes:
        free = st.free_on(node_id)
        r = pipe.rejects(m, node_id, pipe.filters)
        if r is not None:
            out.append(
                Verdict(
                    node_id,
                    False,
                    r.reason,
                    free_bytes=free,
                    filter=r.filter,
                    unresolvable=r.code == UNRESOLVABLE,
                )
            )
            continue
        devices = st.best_devices(m, node_id) or ()
        scores = pipe.scores(m, node_id, devices)
        out.append(
            Verdict(
                node_id,
                True,
                f"fits: {mib(free)} free",
                round(pipe.total(scores), 4),
                free,
                scores={k: round(v, 4) for k, v in scores.items()},
            )
        )
    return tuple(out)


def sweep_verdicts(pipe: Pipeline) -> tuple[Verdict, ...]:
    """Large fleets: the nodes the last search met (rejected on the way, then scored)."""
    rejected, scored = pipe.sweep
    out = [
        Verdict(n, False, r.reason, filter=r.filter, unresolvable=r.code == UNRESOLVABLE)
        for n, r in rejected.items()
    ]
    out += [Verdict(n, True, "scored candidate", round(t, 4)) for n, t in scored]
    return tuple(out)


def mark_evictions(
    pipe: Pipeline, verdicts: tuple[Verdict, ...], node_id: str
) -> tuple[Verdict, ...]:
    """The node chosen by eviction: its verdict says whom it evicts."""
    evicted = tuple(v for v, n in pipe.st.evictions if n == node_id)
    return tuple(
        Verdict(
            v.node_id,
            True,
            f"fits after evicting {', '.join(evicted)} ({pipe.profile.eviction})",
            v.score,
            v.free_bytes,
            evicted,
            scores=v.scores,
        )
        if v.node_id == node_id
        else v
        for v in verdicts
    )


def why_not(m: ModelView, verdicts: tuple[Verdict, ...]) -> tuple[str, bool]:
    """Why ``m`` stays unplaced, and whether it is unresolvable (evicting would not help)."""
    if not verdicts:
        return "no live node", True
    if all(v.unresolvable for v in verdicts if not v.feasible):
        if all(v.filter == "fits_memory" for v in verdicts):
            what = (
                f"{m.gpus} devices of {mib(m.per_device_bytes)}"
                if m.gpus > 1
                else mib(m.need_bytes)
            )
            return f"needs {what}; no node is that large (unresolvable)", True
        return "no node can take it, even after evictions (unresolvable): " + "; ".join(
            f"{v.node_id}: {v.reason}" for v in verdicts
        ), True
    return "no node has room, even after evicting: " + "; ".join(
        f"{v.node_id}: {v.reason}" for v in verdicts
    ), False
