"""A discrete-time simulator that runs the real scheduling code against a virtual fleet and request
traces, in virtual time (pure: no clock, no I/O; seeded). Each round the fleet is written as the
records a scheduler reads from etcd (sim/records.py) and decided by the leader's own
`snapshot.round_snapshot` (memory rule, autoscaler, device saturation) and `placement.place`.

Model of the world, kept deliberately simple and stated here so the numbers can be judged:
- Traffic: each model's rate is its peak x a daily shape (SHAPES) x (1 +/- 10 %) noise, per step
  (60 s); where fewer than SPARSE requests are expected in a step, whole requests are drawn
  (Poisson), so a rarely used model sees none in most steps and its router reports no rate then.
- Capacity: a GPU generates `throughput_tokens_per_s` tokens/s shared by the replicas on it; a
  request costs `tokens_per_request` tokens; the router's least-loaded choice gives a replica
  whose device also serves other models a smaller share of its model's traffic (serving.py).
- Latency: `scheduler/latency.py`'s queue law (the one the SLO-aware autoscaler predicts with)
  at the utilization u of the busiest device of the model's ready replicas; a request misses
  when its TTFT exceeds the SLO. u >= 1 serves 1/u of the demand and the rest misses.
- Loads: a replica becomes ready after its weights arrive from where they wait (CPU RAM at
  PCIe speed, local disk, or the source) plus warm-up; requests for a model with no ready replica
  wait for the first one (a cold start) and miss when that wait exceeds the SLO.
- Failures: a node vanishes at its time (its replicas with it) and comes back `recover_h` later.
- Warm-up: the shared fleet's rounds start `warmup_h` (2 h) before the day and are not counted,
  so the day starts from a placed and loaded fleet, as the dedicated one does (counting the
  first loads from the source made the market day's SLO miss 0.094 % where it is 0.015 %).
The same traces run against a dedicated fleet (each replica on its own GPUs, never moved).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from meshserve.scheduler.autoscale import ScaleState
from meshserve.scheduler.placement import place
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.repack import Repacks
from meshserve.scheduler.sim.records import (
    Gpu,
    SimReplica,
    cluster_records,
    gpus_for,
    model_specs,
    node_statuses,
    router_demand,
)
from meshserve.scheduler.sim.report import Result
from meshserve.scheduler.sim.scenario import Scenario, SimModel
from meshserve.scheduler.sim.serving import serve
from meshserve.scheduler.snapshot import round_snapshot
from meshserve.scheduler.views import DISK, HOST, Plan
from meshserve.v1 import cluster_pb2
from meshserve.weights import OVERHEAD_FRACTION

WARMUP_S = 0.5  # warm-up requests before READY (a few short generations)


class _Fleet:
    def __init__(self, sc: Scenario) -> None:
        self.devices: dict[str, Gpu] = {}
        self.nodes: dict[str, list[str]] = {}
        i = 0
        for g in sc.groups:
            for _ in range(g.nodes):
                node = f"n{i}"
                i += 1
                ids = [f"{node}-g{j}" for j in range(g.gpus_per_node)]
                self.nodes[node] = ids
                for d in ids:
                    self.devices[d] = Gpu(
                        node, g.memory_bytes, g.gpu_type, g.cost_per_hour, g.throughput_tokens_per_s
                    )

    def grow(self, gpus: int) -> None:
        """Dedicated serving buys what it needs: nodes like the first group's are added until
        the fleet has ``gpus`` GPUs (a shared fleet is the scenario's, fixed)."""
        node0 = next(iter(self.nodes))
        per = len(self.nodes[node0])
        while len(self.devices) < gpus:
            node = f"n{len(self.nodes)}"
            self.nodes[node] = [f"{node}-g{j}" for j in range(per)]
            for d in self.nodes[node]:
                self.devices[d] = replace(self.devices[f"{node0}-g0"], node=node)


DEDICATED_UTILIZATION = 0.9  # the busiest a dedicated team runs a GPU at its peak


SPARSE = 5.0  # fewer requests than this expected in a step: drawn one by one (Poisson)


def arrivals(rate: float, step_s: float, rng: random.Random) -> float:
    """The requests/s a step actually sees: its expected rate when many arrive; for a rarely
    used model, a Poisson draw of whole requests, so a model asked once an hour has no requests
    (and no rate for the autoscaler) most steps, and idles out as a router would see it."""
    n = rate * step_s
    if n >= SPARSE or n <= 0:
        return rate
    limit, k, p = math.exp(-n), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k / step_s


def dedicated_replicas(m: SimModel, sc: Scenario, device_bytes: int) -> int:
    """Replicas a team serving ``m`` on GPUs of its own keeps all day: its minimum, and enough
    for its peak hour (bursts included) at DEDICATED_UTILIZATION of the GPUs' throughput."""
    throughput = min(g.throughput_tokens_per_s for g in sc.groups) * gpus_for(m, device_bytes)
    peak = max(m.rate(h / 4) for h in range(96)) * m.tokens_per_request
    return max(1, m.min_replicas, math.ceil(peak / (throughput * DEDICATED_UTILIZATION)))


def simulate(
    sc: Scenario,
    policy: str = "meshserve",
    hours: float = 24.0,
    step_s: float = 60.0,
    seed: int = 0,
    profile: Profile | None = None,
    warmup_h: float = 2.0,
) -> Result:
    """``policy``: "meshserve" (the scheduler's round: records → `round_snapshot` → `place`)
    or "dedicated"."""
    if sc.overhead_fraction != OVERHEAD_FRACTION:
        raise ValueError(
            f"scenario {sc.name}: overhead_fraction {sc.overhead_fraction}; the simulator places "
            f"by the scheduler's memory rule, whose overhead is {OVERHEAD_FRACTION}"
        )
    rng = random.Random(seed)
    fleet = _Fleet(sc)
    device_bytes = min(g.memory_bytes for g in fleet.devices.values())
    models = {m.name: m for m in sc.models}
    res = Result(policy)
    w = _World(
        specs=model_specs(
            sc,
            device_bytes,
            max(g.tokens_per_s for g in fleet.devices.values()),
            len(fleet.nodes),
        ),
        replicas={m: [] for m in models},
        repacks=Repacks((profile or Profile()).repack_moves_per_minute),
    )
    delays: list[tuple[float, float]] = []
    mem_util_sum = 0.0
    if policy == "dedicated":
        # Each replica of each model on GPUs of its own, all day; failures are not simulated
        # here (the dedicated fleet has no spare to move to anyway).
        counts = {m.name: dedicated_replicas(m, sc, device_bytes) for m in sc.models}
        fleet.grow(sum(counts[m.name] * gpus_for(m, device_bytes) for m in sc.models))
        ids = list(fleet.devices)
        k = 0
        for m in sc.models:
            for _ in range(counts[m.name]):
                g = gpus_for(m, device_bytes)
                devs = tuple(ids[k : k + g])
                k += g
                w.replicas[m.name].append(SimReplica(fleet.devices[devs[0]].node, devs, 0.0))
    steps = int(hours * 3600 / step_s)
    # The shared fleet starts from the hours before (placed and loaded as the day before left
    # it), as the dedicated one starts loaded: the warm-up's rounds run and are not counted.
    warm = int(warmup_h * 3600 / step_s) if policy == "meshserve" else 0
    scratch, warm_rng = Result(policy), random.Random(seed + 1)
    for i in range(-warm, steps):
        day_s = i * step_s  # the time of day the traffic and failures follow (< 0: warm-up)
        t = day_s + warm * step_s  # the simulated clock (>= 0: "never" is 0 to the autoscaler)
        out, out_delays = (res, delays) if i >= 0 else (scratch, [])
        h = (day_s / 3600) % 24
        down = {n for n, at in sc.failures if at * 3600 <= day_s < (at + sc.recover_h) * 3600}
        noise = rng if i >= 0 else warm_rng  # the day's draws are the same for every policy
        rates = {name: m.rate(h) * (0.9 + 0.2 * noise.random()) for name, m in models.items()}
        rates = {name: arrivals(rate, step_s, noise) for name, rate in rates.items()}
        for name, rate in rates.items():
            if rate > 0:
                w.last_request[name] = t
        if policy == "meshserve":
            for name in models:  # replicas on a failed node are gone
                w.replicas[name] = [r for r in w.replicas[name] if r.node not in down]
            _round(fleet, models, rates, w, down, t, out, profile or Profile())
        ready = {n: [r for r in rs if r.ready_at <= t] for n, rs in w.replicas.items()}
        serving = dict(rates)
        # Cold starts: requests arriving before a model's first replica is up wait for it (a
        # load, or a restore from CPU RAM); those that arrive more than the SLO before it miss.
        # The request that set off this step's cold start waits for all of it. What arrives
        # after it is served by it, for the rest of the step.
        for name in models:
            if ready[name] or rates[name] <= 0:
                continue
            loading = [r.ready_at for r in w.replicas[name]]
            wait = (min(loading) - t) if loading else math.inf
            early = min(wait, step_s)
            first = min(1.0, rates[name] * step_s) if w.cold_at.get(name) == t else 0.0
            cold = max(first, rates[name] * early)
            late = rates[name] * min(max(0.0, wait - sc.slo_ttft_s), step_s)
            missed = max(first, late) if wait > sc.slo_ttft_s else 0.0
            out.requests += cold
            out.cold_start_requests += cold
            out.slo_misses += missed
            out.cold_start_misses += missed
            if missed:
                out.misses_by_model[name] = out.misses_by_model.get(name, 0.0) + missed
            out_delays.append((min(wait - early / 2, 600.0), cold))
            serving[name] = rates[name] * (step_s - early) / step_s
            ready[name] = [r for r in w.replicas[name] if r.ready_at < t + step_s]
        w.p99 = serve(sc, fleet.devices, serving, ready, step_s, out, out_delays, w.device_load)
        used_devices: dict[str, int] = {}
        for name, reps in w.replicas.items():
            share = models[name].memory_bytes
            for rep in reps:
                for d in rep.devices:
                    used_devices[d] = used_devices.get(d, 0) + share // len(rep.devices)
        gpus = len(used_devices)
        out.gpus_peak = max(out.gpus_peak, gpus)
        hourly = sum(fleet.devices[d].cost_per_hour for d in used_devices)
        out.cost_per_month_fixed = max(out.cost_per_month_fixed, hourly * 730)
        out.gpu_hours += gpus * step_s / 3600
        out.cost_per_month_elastic += hourly * step_s / 3600
        if used_devices and i >= 0:
            mem_util_sum += sum(used_devices.values()) / sum(
                fleet.devices[d].memory_bytes for d in used_devices
            )
        if i % max(1, int(900 / step_s)) == 0:
            out.timeline.append((round(day_s / 3600, 2), gpus))
    res.hours = hours
    days = hours / 24
    res.cost_per_month_elastic = res.cost_per_month_elastic / days * 730 / 24
    res.memory_utilization = mem_util_sum / steps if steps else 0.0
    served = res.served_tokens
    throughput = max((g.tokens_per_s for g in fleet.devices.values()), default=1.0)
    res.compute_utilization = served / (res.gpu_hours * 3600 * throughput) if res.gpu_hours else 0.0
    total = sum(n for _d, n in delays)
    if total:
        res.queue_delay_mean_s = sum(d * n for d, n in delays) / total
        acc = 0.0
        for delay, weight in sorted(delays):
            acc += weight
            if acc >= 0.99 * total:
                res.queue_delay_p99_s = delay
                break
    return res


REPLAN_EVERY_S = 900  # the live placement is compared with a full re-plan this often


def _devices(plan: Plan) -> int:
    return len({(node, d) for (_m, node), ds in plan.devices.items() for d in ds})


@dataclass
class _World:
    """What persists between simulated rounds: the specs applied, replicas on devices, copies
    offloaded per node, the autoscaler's state, and what the routers and agents last saw."""

    specs: list[cluster_pb2.ModelSpec]
    replicas: dict[str, list[SimReplica]]
    offloaded: dict[str, dict[str, int]] = field(default_factory=dict)
    scale: dict[str, ScaleState] = field(default_factory=dict)
    p99: dict[str, float] = field(default_factory=dict)
    last_request: dict[str, float] = field(default_factory=dict)
    device_load: dict[str, float] = field(default_factory=dict)  # tokens/s per device
    cold_at: dict[str, float] = field(default_factory=dict)  # model → its last cold start's t
    repacks: Repacks = field(default_factory=lambda: Repacks(0))  # as the leader keeps them


def _round(
    fleet: _Fleet,
    models: Mapping[str, SimModel],
    rates: Mapping[str, float],
    w: _World,
    down: set[str],
    t: float,
    res: Result,
    profile: Profile,
) -> None:
    """One scheduler round over the fleet's records, as the leader decides one, then its
    effects (loads take their time from where the weights wait)."""
    demand = {n: rate * models[n].tokens_per_request for n, rate in rates.items()}
    placements, statuses = cluster_records(w.replicas, w.offloaded, down, t, demand)
    ready = {n: sum(1 for r in rs if r.ready_at <= t) for n, rs in w.replicas.items()}
    moving = w.repacks.in_flight((n, r.node) for n, rs in w.replicas.items() for r in rs)
    snap, w.scale, _placed = round_snapshot(
        w.specs,
        node_statuses(fleet.nodes, fleet.devices, down, w.device_load),
        statuses,
        placements,
        router_demand(rates, ready, w.last_request, w.p99),
        w.scale,
        t,
        moving=moving,
        repack_budget=w.repacks.budget(t),
        slo_quantile=profile.slo_quantile,
        law=profile.latency,
    )
    plan = place(snap, profile)
    if t % REPLAN_EVERY_S == 0:  # what a full re-plan of the same demand would use
        fresh = replace(snap, current={}, current_devices={}, offloaded={}, moving=frozenset())
        replan = place(replace(fresh, ready=frozenset(), repack_budget=0), profile)
        res.replan_samples.append((_devices(plan), _devices(replan)))
    w.repacks.begun(plan.repacked, t)
    res.repack_moves += len(plan.repacked)
    res.evictions += len(plan.evictions)
    res.max_evictions_per_round = max(res.max_evictions_per_round, len(plan.evictions))
    if any(d.unschedulable for d in plan.decisions.values()):
        res.unplaced_rounds += 1
    new: dict[str, list[SimReplica]] = {name: [] for name in models}
    for (name, node), devs in plan.devices.items():
        old = next((r for r in w.replicas[name] if r.node == node), None)
        if old is not None and old.devices == devs:
            new[name].append(old)
            continue
        tier = w.offloaded.get(node, {}).pop(name, 0)
        m = models[name]
        where = tier if tier in (HOST, DISK) else 0
        seconds = profile.reload.seconds(m.memory_bytes, where) + WARMUP_S
        had_ready = any(r.ready_at <= t for r in w.replicas[name])
        if not had_ready and not new[name] and rates[name] > 0:
            res.cold_starts += 1
            w.cold_at[name] = t
        res.loads += 1
        res.bytes_moved += m.memory_bytes
        new[name].append(SimReplica(node, devs, t + seconds))
    for node, waiting in plan.offloads.items():
        w.offloaded.setdefault(node, {}).update(waiting)
    # Offloaded copies of models that went away entirely are dropped.
    for node in list(w.offloaded):
        for name in list(w.offloaded[node]):
            placed_here = (name, node) in plan.devices
            gone = w.scale[name].replicas == 0 and name not in plan.offloads.get(node, {})
            if placed_here or gone:
                w.offloaded[node].pop(name)
    w.replicas.clear()
    w.replicas.update(new)
