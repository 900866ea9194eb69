"""Simulation scenarios (bench/scenarios/*.yaml): a fleet of node groups, models with a daily
demand shape, and node failures; loaded and validated here, simulated by simulator.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.modelspec import WARM_IN

GB = 10**9


def _window(h: float, start: float, end: float, ramp: float = 0.5) -> float:
    """1 inside [start, end) with linear ramps of ``ramp`` hours, else 0."""
    if h < start - ramp or h >= end + ramp:
        return 0.0
    if h < start:
        return (h - (start - ramp)) / ramp
    if h >= end:
        return 1.0 - (h - end) / ramp
    return 1.0


SHAPES: Mapping[str, Callable[[float], float]] = {
    "business": lambda h: max(0.03, _window(h, 9, 19)),
    "daytime": lambda h: max(
        0.08, math.exp(-(((h - 13) / 3.5) ** 2)), 0.45 * math.exp(-(((h - 20.5) / 1.5) ** 2))
    ),
    "support": lambda h: max(0.04, _window(h, 8, 18)),
    "bursts": lambda h: max(0.05, *(1.0 if t <= h < t + 1 / 3 else 0.0 for t in (10, 14, 17))),
    "constant": lambda h: 0.8 + 0.2 * math.sin(2 * math.pi * (h - 8) / 24),
    "office": lambda h: _window(h, 9, 17, ramp=0.25),
}


@dataclass(frozen=True)
class SimModel:
    name: str
    memory_bytes: int  # GPU memory one replica takes (weights + runtime)
    min_replicas: int
    peak_rps: float
    tokens_per_request: int
    shape: str
    priority: int = 2
    phase_h: float = 0.0  # the daily shape shifted by this many hours (another time zone)
    bursts: tuple[float, ...] = ()  # hours at which a flash crowd starts (BURST_H long)
    burst_x: float = 1.0  # the rate during a burst, times the shape's
    warm_in: str = ""  # ModelSpec.warm_in: "host" lets its minimum sleep in CPU RAM when idle

    def rate(self, h: float) -> float:
        """Requests/s at hour ``h`` of the day, before the simulator's noise."""
        rate = self.peak_rps * SHAPES[self.shape]((h - self.phase_h) % 24)
        if any(t <= h < t + BURST_H for t in self.bursts):
            rate *= self.burst_x
        return rate


BURST_H = 1 / 3  # a flash crowd lasts 20 minutes


@dataclass(frozen=True)
class NodeGroup:
    nodes: int
    gpus_per_node: int
    gpu_type: str
    memory_bytes: int
    cost_per_hour: float
    throughput_tokens_per_s: float


@dataclass(frozen=True)
class Scenario:
    name: str
    groups: tuple[NodeGroup, ...]
    models: tuple[SimModel, ...]
    overhead_fraction: float = 0.15
    slo_ttft_s: float = 1.0
    failures: tuple[tuple[str, float], ...] = ()  # (node id, hour)
    recover_h: float = 1.0
    baseline_gpus: int = 0  # what the team runs today (the seed's figure), for the table
    idle_timeout_s: float = 900.0
    scale_down_delay_s: float = 600.0


def load_scenario(doc: Mapping[str, Any], name: str = "scenario") -> Scenario:
    """From the YAML mapping (bench/scenarios/*.yaml); ValueError names what is wrong."""
    gpu = doc.get("gpu", {})
    fleet = doc.get("fleet", {"nodes": 3, "gpus_per_node": 3})
    groups_doc = fleet if isinstance(fleet, list) else [fleet]
    groups = []
    for g in groups_doc:
        groups.append(
            NodeGroup(
                int(g["nodes"]),
                int(g["gpus_per_node"]),
                str(g.get("type", gpu.get("type", "GPU"))),
                int(float(g.get("memory_gb", gpu.get("memory_gb", 40))) * GB),
                float(g.get("cost_per_hour", gpu.get("cost_per_hour", 0.0))),
                float(g.get("throughput_tokens_per_s", gpu.get("throughput_tokens_per_s", 10000))),
            )
        )
    models = []
    for m in doc["models"]:
        if str(m.get("warm_in", "")) not in WARM_IN:
            raise ValueError(f"model {m['name']}: warm_in must be device or host")
        shape = str(m.get("shape", "constant"))
        if shape not in SHAPES:
            raise ValueError(f"model {m['name']}: shape must be one of {sorted(SHAPES)}")
        models.append(
            SimModel(
                str(m["name"]),
                int(float(m["memory_gb"]) * GB),
                int(m.get("min_replicas", 0)),
                float(m["peak_rps"]),
                int(m["tokens_per_request"]),
                shape,
                int(m.get("priority", 2)),
                float(m.get("phase_h", 0.0)),
                tuple(float(t) for t in m.get("bursts", ())),
                float(m.get("burst_x", 1.0)),
                str(m.get("warm_in", "")),
            )
        )
    failures = tuple((str(f["node"]), float(f["at_h"])) for f in doc.get("failures", []))
    return Scenario(
        name,
        tuple(groups),
        tuple(models),
        float(doc.get("overhead_fraction", 0.15)),
        float(doc.get("slo_ttft_s", 1.0)),
        failures,
        float(doc.get("recover_h", 1.0)),
        int(doc.get("baseline_gpus", 0)),
    )
