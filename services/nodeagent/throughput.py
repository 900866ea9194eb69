"""Measured decode throughput (pure): per replica and per device, from the engines' own counters
of generated tokens, sampled once a second and smoothed.

- rate: an exponentially weighted moving average of tokens/s with time constant ``TAU_S`` (the
  weight of a sample of length dt is 1 - e^(-dt/tau), so uneven sampling is handled).
- capacity of a device: what it generates at full load. A sample taken while any engine on the
  device had streams queued (it could not take more) is a measurement of it; those samples get
  their own average. Until one is seen the configured figure stands (0 = unknown); a rate above
  the estimate raises it (the device did at least that).

A replica of a tensor-parallel gang splits its tokens evenly over its devices. A node without
GPUs has one device, "" (as the scheduler's NodeView has).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

TAU_S = 10.0
ZERO_BELOW = 0.05  # tokens/s: a decayed average under this reads as 0


@dataclass(frozen=True)
class Sample:
    model: str
    devices: tuple[str, ...]  # () on a CPU node
    generated_tokens: int  # the engine's counter since load
    saturated: bool  # streams were queued in the engine (or at its admission limit)


@dataclass
class Ewma:
    value: float = 0.0
    seen: bool = False

    def add(self, x: float, dt: float, tau: float = TAU_S) -> None:
        if not self.seen:
            self.value, self.seen = x, True
            return
        self.value += (1.0 - math.exp(-dt / tau)) * (x - self.value)
        if abs(self.value) < ZERO_BELOW:
            self.value = 0.0


@dataclass(frozen=True)
class DeviceRate:
    device_id: str
    tokens_per_s: float
    capacity_tokens_per_s: float
    measured: bool


@dataclass
class _Replica:
    tokens: int
    rate: Ewma = field(default_factory=Ewma)


class Throughput:
    """The agent's meter. ``configured``: each device's decode capacity as configured (0 =
    unknown), used until a saturated moment measures it."""

    def __init__(self, configured: float = 0.0) -> None:
        self.configured = configured
        self._replicas: dict[str, _Replica] = {}
        self._devices: dict[str, Ewma] = {}
        self._capacity: dict[str, Ewma] = {}
        self._last: float | None = None

    def observe(self, now: float, samples: Iterable[Sample]) -> None:
        """One sampling pass at monotonic time ``now`` over the replicas that serve."""
        dt = now - self._last if self._last is not None else 0.0
        self._last = now
        per_device: dict[str, float] = {}
        busy: set[str] = set()
        seen: set[str] = set()
        for s in samples:
            seen.add(s.model)
            r = self._replicas.get(s.model)
            if r is None or s.generated_tokens < r.tokens:  # new, or its engine was reloaded
                self._replicas[s.model] = _Replica(s.generated_tokens)
                continue
            if dt <= 0:
                continue
            inst = (s.generated_tokens - r.tokens) / dt
            r.tokens = s.generated_tokens
            r.rate.add(inst, dt)
            devices = s.devices or ("",)
            for d in devices:
                per_device[d] = per_device.get(d, 0.0) + inst / len(devices)
                if s.saturated:
                    busy.add(d)
        for gone in set(self._replicas) - seen:
            del self._replicas[gone]
        if dt <= 0:
            return
        for d in set(self._devices) | set(per_device):
            inst = per_device.get(d, 0.0)
            self._devices.setdefault(d, Ewma()).add(inst, dt)
            if d in busy and inst > 0:
                self._capacity.setdefault(d, Ewma()).add(inst, dt)

    def replica_rate(self, model: str) -> float:
        r = self._replicas.get(model)
        return r.rate.value if r is not None else 0.0

    def devices(self) -> list[DeviceRate]:
        """Every device that has held a replica since the agent started, by id."""
        out = []
        for d in sorted(self._devices):
            rate = self._devices[d].value
            cap = self._capacity.get(d)
            measured = cap is not None and cap.seen
            capacity = cap.value if cap is not None and measured else self.configured
            if measured or capacity:
                capacity = max(capacity, rate)
            out.append(DeviceRate(d, rate, capacity, measured))
        return out


def moved(old: float, new: float) -> bool:
    """A published rate is stale when it moved by a quarter (and by more than 1 token/s), or
    reached zero: at most a few writes while traffic ramps or decays, none at a steady rate."""
    if (old == 0.0) != (new == 0.0):
        return True
    return abs(new - old) > max(1.0, 0.25 * abs(old))
