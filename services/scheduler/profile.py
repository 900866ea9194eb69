"""The scheduling profile: which plugins run, their weights, the default strategy and the eviction
policy. Built from configuration (YAML or flags) and checked at start-up: a misspelt plugin stops
the scheduler with a message naming the valid ones (STYLE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshserve.scheduler.latency import QueueLaw
from meshserve.scheduler.plugins import FILTERS, SCORERS, VICTIM_ORDERS, ReloadCosts

STRATEGIES = ("binpack", "spread")


@dataclass(frozen=True)
class Profile:
    filters: tuple[str, ...] = (
        "node_draining",
        "node_selector",
        "anti_affinity",
        "failed_here",
        "gpu_unhealthy",
        "fits_memory",
    )
    scorers: Mapping[str, float] = field(
        default_factory=lambda: {"fit": 1.0, "locality": 2.0, "priority": 0.25, "gpu_health": 1.0}
    )
    strategy: str = "binpack"  # a model's spec may override it
    eviction: str = "cost_aware"  # or "lru"
    # Feasible nodes scored per replica before choosing (kube-scheduler's numFeasibleNodesToFind):
    # placement stays O(log devices) per replica on large fleets.
    candidates: int = 4
    # Up to this many nodes every node gets a verdict for Explain; above it, Explain shows the
    # nodes the last replica's search looked at (rejections met on the way, scored candidates).
    explain_nodes: int = 32
    reload: ReloadCosts = field(default_factory=ReloadCosts)
    # Full re-plans (nothing placed yet) then try to empty the least-used devices by moving their
    # models elsewhere; incremental rounds never move a placed model for packing alone.
    consolidate: bool = True
    # A device takes a replica only while its expected token load stays under this share of its
    # throughput (devices and models that report no throughput/demand are not limited).
    compute_target: float = 0.8
    # Background re-pack of a running fleet: when fragmentation costs more than
    # `repack_slack_gpus` GPUs, incremental rounds empty the least-used devices, moving at most
    # `repack_moves_per_minute` replicas a minute (the disruption budget), each make-before-
    # break. 0: off (full re-plans still consolidate). On by default: bench/economics.py.
    # A slack of 0 (any GPU the memory could spare) beat 1 on every day there: a small fleet's
    # one spare GPU is a quarter of it (nine-model day 111.6 → 105.1 GPU-hours, bursty 156.5 →
    # 145.1), and the budget, not the slack, bounds the disruption.
    repack_moves_per_minute: int = 2
    repack_slack_gpus: int = 0
    # SLO-aware autoscaling: a model with an SLO whose devices report their throughput gets the
    # fewest replicas at which the queue law `latency` predicts this TTFT quantile within its SLO
    # (instead of its rate threshold). 0: rate thresholds only, the default: on the simulated
    # days (bench/economics.py, rows slo_aware vs default) it cut SLO misses on some days and
    # seeds, not on others, for 1-2 % more GPU-hours on the nine-model day and 0.5 % fewer on
    # the market day; no clear win at the 0.1 % miss bound, so an operator's choice (0.99: p99).
    slo_quantile: float = 0.0
    latency: QueueLaw = field(default_factory=QueueLaw)


def load_profile(doc: Mapping[str, Any] | None) -> Profile:
    """A Profile from a mapping (e.g. YAML); raises ValueError naming what is wrong."""
    doc = dict(doc or {})
    base = Profile()
    unknown = set(doc) - {
        "filters",
        "scorers",
        "strategy",
        "eviction",
        "candidates",
        "explain_nodes",
        "consolidate",
        "reload",
        "compute_target",
        "repack_moves_per_minute",
        "repack_slack_gpus",
        "slo_quantile",
        "latency",
    }
    if unknown:
        raise ValueError(f"unknown profile keys {sorted(unknown)}")
    filters = tuple(doc.get("filters", base.filters))
    for f in filters:
        if f not in FILTERS:
            raise ValueError(f"unknown filter {f!r}; known: {', '.join(FILTERS)}")
    if "fits_memory" not in filters:
        raise ValueError("filter fits_memory cannot be left out: plans must never over-commit")
    scorers = {str(k): float(v) for k, v in dict(doc.get("scorers", base.scorers)).items()}
    for s, w in scorers.items():
        if s not in SCORERS:
            raise ValueError(f"unknown scorer {s!r}; known: {', '.join(SCORERS)}")
        if w < 0:
            raise ValueError(f"scorer {s} has a negative weight {w}")
    strategy = str(doc.get("strategy", base.strategy))
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    eviction = str(doc.get("eviction", base.eviction))
    if eviction not in VICTIM_ORDERS:
        raise ValueError(f"eviction must be one of {tuple(VICTIM_ORDERS)}, got {eviction!r}")
    candidates = int(doc.get("candidates", base.candidates))
    if candidates < 1:
        raise ValueError("candidates must be >= 1")
    reload = ReloadCosts(**{k: float(v) for k, v in dict(doc.get("reload", {})).items()})
    quantile = float(doc.get("slo_quantile", base.slo_quantile))
    if not 0 <= quantile < 1:
        raise ValueError(f"slo_quantile must be in [0, 1) (0.99: the p99), got {quantile}")
    law = dict(doc.get("latency") or {})
    if set(law) - {"slots", "base_ttft_s"}:
        raise ValueError(f"unknown latency keys {sorted(set(law) - {'slots', 'base_ttft_s'})}")
    latency = QueueLaw(
        int(law.get("slots", base.latency.slots)),
        float(law.get("base_ttft_s", base.latency.base_ttft_s)),
    )
    if latency.slots < 1 or latency.base_ttft_s <= 0:
        raise ValueError("latency.slots must be >= 1 and latency.base_ttft_s > 0")
    return Profile(
        filters=filters,
        scorers=scorers,
        strategy=strategy,
        eviction=eviction,
        candidates=candidates,
        explain_nodes=int(doc.get("explain_nodes", base.explain_nodes)),
        reload=reload,
        consolidate=bool(doc.get("consolidate", base.consolidate)),
        compute_target=float(doc.get("compute_target", base.compute_target)),
        repack_moves_per_minute=_count(doc, "repack_moves_per_minute", base),
        repack_slack_gpus=_count(doc, "repack_slack_gpus", base),
        slo_quantile=quantile,
        latency=latency,
    )


def _count(doc: Mapping[str, Any], key: str, base: Profile) -> int:
    value = int(doc.get(key, getattr(base, key)))
    if value < 0:
        raise ValueError(f"{key} must be >= 0, got {value}")
    return value
