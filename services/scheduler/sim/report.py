"""What a simulation measures (`Result`) and its rows for tables and JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Result:
    policy: str
    gpus_peak: int = 0
    gpu_hours: float = 0.0
    hours: float = 0.0
    cost_per_month_fixed: float = 0.0  # the costliest set of GPUs in use at once, all month
    cost_per_month_elastic: float = 0.0  # GPUs paid only while they hold a model
    memory_utilization: float = 0.0  # of the GPUs in use, time-averaged
    compute_utilization: float = 0.0  # tokens served / (GPUs in use x throughput)
    requests: float = 0.0
    slo_misses: float = 0.0
    cold_starts: int = 0
    cold_start_requests: float = 0.0
    queue_delay_mean_s: float = 0.0
    queue_delay_p99_s: float = 0.0
    loads: int = 0
    bytes_moved: int = 0  # weights copied onto GPUs by loads and restores
    repack_moves: int = 0  # replicas a background re-pack moved
    # (devices the live placement uses, devices a full re-plan of the same snapshot would use),
    # sampled every simulated 15 minutes: fragmentation's cost
    replan_samples: list[tuple[int, int]] = field(default_factory=list)
    evictions: int = 0
    max_evictions_per_round: int = 0
    unplaced_rounds: int = 0
    served_tokens: float = 0.0
    misses_by_model: dict[str, float] = field(default_factory=dict)
    cold_start_misses: float = 0.0  # of slo_misses: requests that waited for a replica to load
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (hour, GPUs in use)

    @property
    def slo_miss_rate(self) -> float:
        return self.slo_misses / self.requests if self.requests else 0.0

    @property
    def fragmentation_gpus(self) -> float:
        """Mean devices the live placement uses beyond a full re-plan's."""
        gaps = [live - replan for live, replan in self.replan_samples]
        return sum(gaps) / len(gaps) if gaps else 0.0

    @property
    def gpus_mean(self) -> float:
        return self.gpu_hours / self.hours if self.hours else 0.0


def nine_models_summary(results: Mapping[str, Result]) -> list[dict[str, Any]]:
    """Rows for a table / JSON, one per policy."""
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "policy": name,
                "gpus_peak": r.gpus_peak,
                "gpus_mean": round(r.gpus_mean, 2),
                "cost_per_month_fixed": round(r.cost_per_month_fixed),
                "cost_per_month_elastic": round(r.cost_per_month_elastic),
                "memory_utilization": round(r.memory_utilization, 3),
                "compute_utilization": round(r.compute_utilization, 3),
                "requests": round(r.requests),
                "slo_misses": round(r.slo_misses),
                "slo_miss_rate": round(r.slo_miss_rate, 5),
                "slo_misses_in_cold_starts": round(r.cold_start_misses),
                "slo_misses_by_model": {k: round(v) for k, v in sorted(r.misses_by_model.items())},
                "cold_starts": r.cold_starts,
                "queue_delay_mean_s": round(r.queue_delay_mean_s, 4),
                "queue_delay_p99_s": round(r.queue_delay_p99_s, 3),
                "loads": r.loads,
                "evictions": r.evictions,
                "max_evictions_per_round": r.max_evictions_per_round,
                "unplaced_rounds": r.unplaced_rounds,
            }
        )
    return rows
