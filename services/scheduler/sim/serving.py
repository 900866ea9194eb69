"""One simulated step of serving (pure): the router spreads each model's traffic over its READY
replicas' devices, and each device's utilization gives its requests' TTFT by the scheduler's own
queue law (`scheduler/latency.py`)."""

from __future__ import annotations

from collections.abc import Mapping

from meshserve.scheduler.latency import SATURATED, QueueLaw
from meshserve.scheduler.sim.records import Gpu, SimReplica
from meshserve.scheduler.sim.report import Result
from meshserve.scheduler.sim.scenario import Scenario, SimModel

LAW = QueueLaw()
ROUTE_BY_SPARE = True  # the router's least-loaded choice (`route`); False: an even split


def serve(
    sc: Scenario,
    devices: Mapping[str, Gpu],
    rates: Mapping[str, float],
    ready: Mapping[str, list[SimReplica]],
    dt: float,
    res: Result,
    delays: list[tuple[float, float]],
    load: dict[str, float],
) -> dict[str, float]:
    """One step of serving; returns each model's TTFT p99 for the autoscaler and leaves each
    device's token load in ``load`` (the agents' decode rates for the next round)."""
    models = {m.name: m for m in sc.models}
    route(devices, models, rates, ready, load)
    served_tokens = 0.0
    p99: dict[str, float] = {}
    for m in sc.models:
        n = rates[m.name] * dt
        reps = ready.get(m.name, [])
        if not reps or n <= 0:
            continue
        u = max(load[d] / devices[d].tokens_per_s for r in reps for d in r.devices)
        res.requests += n
        if u >= SATURATED:
            served = n / u
            res.slo_misses += n - served
            res.misses_by_model[m.name] = res.misses_by_model.get(m.name, 0.0) + n - served
            delays.append((10.0, n))
            p99[m.name] = 10.0
            served_tokens += served * m.tokens_per_request
            continue
        missed = n * LAW.late(u, sc.slo_ttft_s)
        res.slo_misses += missed
        res.misses_by_model[m.name] = res.misses_by_model.get(m.name, 0.0) + missed
        delays.append((LAW.waits(u) / LAW.wait_rate(u), n))
        p99[m.name] = LAW.quantile(u, 0.99)
        served_tokens += n * m.tokens_per_request
    res.served_tokens += served_tokens
    return p99


def route(
    devices: Mapping[str, Gpu],
    models: Mapping[str, SimModel],
    rates: Mapping[str, float],
    ready: Mapping[str, list[SimReplica]],
    load: dict[str, float],
) -> None:
    """Each model's tokens/s over its READY replicas' devices, as the router sends them: to the
    least loaded replica, so a replica whose device also serves other models takes less. Modelled
    as an even split, then one re-split in proportion to each replica's spare throughput beside
    the other models' load (ROUTE_BY_SPARE; off: the even split)."""
    load.clear()
    shares: dict[str, list[float]] = {}
    for name, reps in ready.items():
        if reps:
            shares[name] = [rates[name] * models[name].tokens_per_request / len(reps)] * len(reps)
    _add(ready, shares, load)
    if not ROUTE_BY_SPARE:
        return
    for name, per in shares.items():
        reps = ready[name]
        if len(reps) < 2:
            continue
        spare = []
        for r, mine in zip(reps, per, strict=True):
            others = max(load[d] - mine / len(r.devices) for d in r.devices)
            spare.append(max(1e-9, min(devices[d].tokens_per_s for d in r.devices) - others))
        total = sum(per)
        shares[name] = [total * x / sum(spare) for x in spare]
    load.clear()
    _add(ready, shares, load)


def _add(
    ready: Mapping[str, list[SimReplica]],
    shares: Mapping[str, list[float]],
    load: dict[str, float],
) -> None:
    for name, per in shares.items():
        for r, tokens in zip(ready[name], per, strict=True):
            for d in r.devices:
                load[d] = load.get(d, 0.0) + tokens / len(r.devices)
