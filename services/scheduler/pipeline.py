"""Filter → score → choose for one replica (STYLE: the llm-d endpoint picker's runner; the
Kubernetes scheduling framework's filter and score extension points). Pure: reads the round's
`PlanState`, changes nothing in it.

Eviction (evict.py), Explain's verdicts (explain.py) and full-plan moves (repair.py) use this
pipeline; the round runner (placement.py) uses all of them, and none of them uses the runner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshserve.scheduler.plugins import FILTERS, SCORERS, Filter, Rejection, Scorer
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.state import PlanState
from meshserve.scheduler.views import ModelView

Choice = tuple[str, tuple[int, ...], float]  # node, device indices, weighted score


class Pipeline:
    """The profile's filters and weighted scorers over one round's state."""

    def __init__(self, st: PlanState, profile: Profile) -> None:
        self.st = st
        self.profile = profile
        self.filters: list[Filter] = [FILTERS[f]() for f in profile.filters]
        # Everything but memory: what eviction and relocation check before making room.
        self.pre_filters = [f for f in self.filters if f.name != "fits_memory"]
        self.scorers: list[tuple[Scorer, float]] = [
            (SCORERS[s](), w) for s, w in profile.scorers.items() if w > 0
        ]
        self.weight_sum = sum(w for _s, w in self.scorers) or 1.0
        # What the last `choose` met: nodes rejected on the way, and scored candidates (Explain
        # on large fleets shows these instead of every node).
        self.sweep: tuple[dict[str, Rejection], list[tuple[str, float]]] = ({}, [])

    def rejects(self, m: ModelView, node_id: str, filters: Iterable[Filter]) -> Rejection | None:
        """The first of ``filters`` that rejects ``node_id`` for ``m``; None when all pass."""
        node = self.st.nodes[node_id]
        for f in filters:
            r = f.check(m, node, self.st)
            if r is not None:
                return r
        return None

    def scores(self, m: ModelView, node_id: str, devices: tuple[int, ...]) -> dict[str, float]:
        """Each scorer's value in [0, 1] for placing ``m`` on ``devices`` of the node."""
        node = self.st.nodes[node_id]
        return {s.name: s.score(m, node, devices, self.st) for s, _w in self.scorers}

    def total(self, scores: Mapping[str, float]) -> float:
        """The weighted mean of ``scores`` (the profile's weights)."""
        return sum(scores[s.name] * w for s, w in self.scorers) / self.weight_sum

    def choose(self, m: ModelView) -> Choice | None:
        """Up to `candidates` feasible nodes from the free-memory index, scored; the best."""
        st = self.st
        share = m.per_device_bytes
        spread = st.strategy_of(m) == "spread"
        passes: dict[str, bool] = {}
        rejected: dict[str, Rejection] = {}
        found: list[tuple[str, tuple[int, ...]]] = []
        k = self.profile.candidates
        # binpack: the tightest fits (used devices), then the largest free devices (a new device
        # is best opened large); spread: the most free first.
        sweeps = [(True, k)] if spread else [(False, k), (True, max(1, k // 2))]
        # The sweep is the round's hot loop (a full re-plan of 1,000 GPUs runs it ~300,000
        # times): what it reads is bound to locals, and the compute check inlined.
        dev_node, load, throughput = st.dev_node, st.load, st.throughput
        target, need = st.compute_target, m.per_device_load
        typed, gpus = bool(m.gpu_types), m.gpus
        for reverse, limit in sweeps:
            hits: dict[str, list[int]] = {}
            got = 0
            for _free, d in st.index.irange((share, -1), None, reverse=reverse):
                node_id = dev_node[d]
                devs = hits.get(node_id)
                if devs is not None and len(devs) == gpus:
                    continue  # this node is a candidate already
                cap = throughput[d]
                if (cap and load[d] + need > cap * target) or (typed and not st.allowed(m, d)):
                    continue
                ok = passes.get(node_id)
                if ok is None:
                    why = self.rejects(m, node_id, self.pre_filters)
                    ok = passes[node_id] = why is None
                    if why is not None and len(rejected) < 4:
                        rejected[node_id] = why
                if not ok:
                    continue
                if devs is None:
                    devs = hits[node_id] = []
                devs.append(d)
                if len(devs) == gpus:
                    cand = (node_id, tuple(sorted(devs)))
                    if cand not in found:
                        found.append(cand)
                    got += 1
                    if got >= limit:
                        break
        # Locality: nodes that hold this model offloaded are always candidates.
        have = {n for n, _ in found}
        for node_id, held in st.offloaded.items():
            if (
                m.name in held
                and node_id in st.nodes
                and node_id not in have
                and self.rejects(m, node_id, self.pre_filters) is None
            ):
                devs_t = st.best_devices(m, node_id)
                if devs_t is not None and not st.nodes[node_id].closed:
                    found.append((node_id, devs_t))
        if not found:
            return None
        best: Choice | None = None
        scored: list[tuple[str, float]] = []
        self.sweep = (rejected, scored)
        nodes, varying, fixed = st.nodes, [], 0.0
        for s, w in self.scorers:
            uniform = getattr(s, "uniform", None)  # optional for a scorer from elsewhere
            same = uniform(m, st) if uniform is not None else None
            if same is None:
                varying.append((s, w))
            else:
                fixed += same * w
        for node_id, devs_t in found:
            node = nodes[node_id]
            total = (
                fixed + sum(s.score(m, node, devs_t, st) * w for s, w in varying)
            ) / self.weight_sum
            scored.append((node_id, total))
            # Ties keep index order (best fit first) for determinism.
            if best is None or total > best[2] + 1e-12:
                best = (node_id, devs_t, total)
        return best
