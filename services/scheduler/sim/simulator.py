"""A discrete-time simulator that runs the real scheduling code (autoscale.step, placement.place)
against a virtual fleet and request traces, in virtual time (pure: no clock, no I/O; seeded).

Model of the world, kept deliberately simple and stated here so the numbers can be judged:
- Traffic: each model's rate is its peak x a daily shape (SHAPES) x (1 +/- 10 %) noise, per step
  (60 s).
- Capacity: a GPU generates `throughput_tokens_per_s` tokens/s shared by the replicas on it; a
  request costs `tokens_per_request` tokens; a replica's share of the model's traffic is even.
- Latency: continuous batching makes a GPU an M/M/c queue with c = BATCH_SLOTS sequences and a
  prefill time BASE_TTFT_S; load = utilization u of the busiest device of the model's ready
  replicas. Waiting probability u^sqrt(2(c+1)) (Sakasegawa), waits exponential with rate
  c(1 - u)/BASE_TTFT_S; a request misses when BASE_TTFT_S + wait exceeds the SLO. u >= 1 serves
  1/u of the demand and the rest misses.
- Loads: a replica becomes ready after its weights arrive from where they wait (CPU RAM at
  PCIe speed, local disk, or the source) plus warm-up; requests for a model with no ready replica
  wait for the first one (a cold start) and miss when that wait exceeds the SLO.
- Failures: a node vanishes at its time (its replicas with it) and comes back `recover_h` later.
The same traces run against a dedicated fleet (each replica on its own GPUs, never moved).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from meshserve.scheduler.autoscale import Load, ScalePolicy, ScaleState, step
from meshserve.scheduler.placement import place
from meshserve.scheduler.plugins import ReloadCosts
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.sim.report import Result
from meshserve.scheduler.sim.scenario import GB, SHAPES, Scenario, SimModel
from meshserve.scheduler.views import DISK, HOST, ClusterSnapshot, Device, ModelView, NodeView

BASE_TTFT_S = 0.15  # prefill + scheduling at no load
BATCH_SLOTS = 16  # sequences a GPU decodes together
WARMUP_S = 0.5  # warm-up requests before READY (a few short generations)
UTILIZATION_TARGET = 0.6  # autoscaler: requests/s per replica = capacity x this


@dataclass
class _Replica:
    node: str
    devices: tuple[str, ...]
    ready_at: float


class _Fleet:
    def __init__(self, sc: Scenario) -> None:
        self.devices: dict[str, tuple[str, int, str, float, float]] = {}  # id → node, cap, type…
        self.nodes: dict[str, list[str]] = {}
        i = 0
        for g in sc.groups:
            usable = int(g.memory_bytes * (1 - sc.overhead_fraction))
            for _ in range(g.nodes):
                node = f"n{i}"
                i += 1
                ids = [f"{node}-g{j}" for j in range(g.gpus_per_node)]
                self.nodes[node] = ids
                for d in ids:
                    self.devices[d] = (
                        node,
                        usable,
                        g.gpu_type,
                        g.cost_per_hour,
                        g.throughput_tokens_per_s,
                    )

    def view(self, down: set[str], host_bytes: int) -> tuple[NodeView, ...]:
        out = []
        for node, ids in self.nodes.items():
            if node in down:
                continue
            devs = tuple(
                Device(d, self.devices[d][1], self.devices[d][2], False, self.devices[d][4])
                for d in ids
            )
            out.append(NodeView(node, sum(x.capacity_bytes for x in devs), False, host_bytes, devs))
        return tuple(out)


def gpus_for(m: SimModel, usable: int) -> int:
    return max(1, math.ceil(m.memory_bytes / usable))


def _serve(
    sc: Scenario,
    fleet: _Fleet,
    rates: Mapping[str, float],
    ready: Mapping[str, list[_Replica]],
    dt: float,
    res: Result,
    delays: list[tuple[float, float]],
) -> dict[str, float]:
    """One step of serving; returns each model's TTFT p99 for the autoscaler."""
    models = {m.name: m for m in sc.models}
    load: dict[str, float] = {}
    for name, reps in ready.items():
        if not reps:
            continue
        per = rates[name] / len(reps) * models[name].tokens_per_request
        for r in reps:
            for d in r.devices:
                load[d] = load.get(d, 0.0) + per / len(r.devices)
    served_tokens = 0.0
    p99: dict[str, float] = {}
    for m in sc.models:
        n = rates[m.name] * dt
        reps = ready.get(m.name, [])
        if not reps or n <= 0:
            continue
        u = max(load[d] / fleet.devices[d][4] for r in reps for d in r.devices)
        res.requests += n
        if u >= 0.999:
            served = n / u
            res.slo_misses += n - served
            res.misses_by_model[m.name] = res.misses_by_model.get(m.name, 0.0) + n - served
            delays.append((10.0, n))
            p99[m.name] = 10.0
            served_tokens += served * m.tokens_per_request
            continue
        waits = u ** math.sqrt(2 * (BATCH_SLOTS + 1))  # probability a request waits at all
        rate = BATCH_SLOTS * (1 - u) / BASE_TTFT_S  # of the exponential wait
        slack = max(0.0, sc.slo_ttft_s - BASE_TTFT_S)
        missed = n * waits * math.exp(-rate * slack)
        res.slo_misses += missed
        res.misses_by_model[m.name] = res.misses_by_model.get(m.name, 0.0) + missed
        delays.append((waits / rate, n))
        p99[m.name] = BASE_TTFT_S + (math.log(100 * waits) / rate if 100 * waits > 1 else 0.0)
        served_tokens += n * m.tokens_per_request
    res.served_tokens += served_tokens
    return p99


def simulate(
    sc: Scenario,
    policy: str = "meshserve",
    hours: float = 24.0,
    step_s: float = 60.0,
    seed: int = 0,
    profile: Profile | None = None,
) -> Result:
    """``policy``: "meshserve" (autoscaler + placement pipeline) or "dedicated"."""
    rng = random.Random(seed)
    fleet = _Fleet(sc)
    usable = min(v[1] for v in fleet.devices.values())
    models = {m.name: m for m in sc.models}
    reload = ReloadCosts()
    res = Result(policy)
    replicas: dict[str, list[_Replica]] = {m: [] for m in models}
    offloaded: dict[str, dict[str, int]] = {}
    scale: dict[str, ScaleState] = {}
    p99: dict[str, float] = {}
    last_request: dict[str, float] = {}
    delays: list[tuple[float, float]] = []
    mem_util_sum = 0.0
    if policy == "dedicated":
        # Each replica of each model on GPUs of its own, all day; failures are not simulated
        # here (the dedicated fleet has no spare to move to anyway).
        ids = list(fleet.devices)
        k = 0
        for m in sc.models:
            for _ in range(max(1, m.min_replicas)):
                g = gpus_for(m, usable)
                devs = tuple(ids[k : k + g])
                k += g
                replicas[m.name].append(_Replica(fleet.devices[devs[0]][0], devs, 0.0))
        if k > len(ids):
            raise ValueError(f"the fleet has {len(ids)} GPUs; dedicated serving needs {k}")
    steps = int(hours * 3600 / step_s)
    for i in range(steps):
        t = i * step_s
        h = (t / 3600) % 24
        down = {n for n, at in sc.failures if at * 3600 <= t < (at + sc.recover_h) * 3600}
        rates = {
            name: m.peak_rps * SHAPES[m.shape](h) * (0.9 + 0.2 * rng.random())
            for name, m in models.items()
        }
        for name, rate in rates.items():
            if rate * step_s >= 0.5:
                last_request[name] = t
        if policy == "meshserve":
            for name in models:  # replicas on a failed node are gone
                replicas[name] = [r for r in replicas[name] if r.node not in down]
            _round(
                sc,
                fleet,
                models,
                rates,
                replicas,
                offloaded,
                scale,
                p99,
                last_request,
                down,
                t,
                usable,
                reload,
                res,
                profile or Profile(),
            )
        ready = {n: [r for r in rs if r.ready_at <= t] for n, rs in replicas.items()}
        # Cold starts: demand with nothing ready waits for the first replica to come up.
        for name in models:
            n = rates[name] * step_s
            if ready[name] or n <= 0:
                continue
            loading = [r.ready_at for r in replicas[name]]
            wait = (min(loading) - t) if loading else math.inf
            res.requests += n
            res.cold_start_requests += n
            if wait > sc.slo_ttft_s:
                res.slo_misses += n
                res.cold_start_misses += n
                res.misses_by_model[name] = res.misses_by_model.get(name, 0.0) + n
            delays.append((min(wait, 600.0), n))
        p99 = _serve(sc, fleet, rates, ready, step_s, res, delays)
        used_devices: dict[str, int] = {}
        for name, reps in replicas.items():
            share = models[name].memory_bytes
            for rep in reps:
                for d in rep.devices:
                    used_devices[d] = used_devices.get(d, 0) + share // len(rep.devices)
        gpus = len(used_devices)
        res.gpus_peak = max(res.gpus_peak, gpus)
        hourly = sum(fleet.devices[d][3] for d in used_devices)
        res.cost_per_month_fixed = max(res.cost_per_month_fixed, hourly * 730)
        res.gpu_hours += gpus * step_s / 3600
        res.cost_per_month_elastic += sum(fleet.devices[d][3] for d in used_devices) * step_s / 3600
        if used_devices:
            mem_util_sum += sum(used_devices.values()) / sum(
                fleet.devices[d][1] / (1 - sc.overhead_fraction) for d in used_devices
            )
        if i % max(1, int(900 / step_s)) == 0:
            res.timeline.append((round(t / 3600, 2), gpus))
    res.hours = hours
    days = hours / 24
    res.cost_per_month_elastic = res.cost_per_month_elastic / days * 730 / 24
    res.memory_utilization = mem_util_sum / steps if steps else 0.0
    served = res.served_tokens
    throughput = max((v[4] for v in fleet.devices.values()), default=1.0)
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


def _round(
    sc: Scenario,
    fleet: _Fleet,
    models: Mapping[str, SimModel],
    rates: Mapping[str, float],
    replicas: dict[str, list[_Replica]],
    offloaded: dict[str, dict[str, int]],
    scale: dict[str, ScaleState],
    p99: Mapping[str, float],
    last_request: Mapping[str, float],
    down: set[str],
    t: float,
    usable: int,
    reload: ReloadCosts,
    res: Result,
    profile: Profile,
) -> None:
    """One scheduler round: the real autoscaler and the real placement, then their effects."""
    throughput = max(v[4] for v in fleet.devices.values())
    views = []
    for name, m in models.items():
        g = gpus_for(m, usable)
        capacity = throughput * g / m.tokens_per_request  # requests/s one replica serves
        policy = ScalePolicy(
            min_replicas=m.min_replicas,
            max_replicas=len(fleet.nodes),  # anti-affinity: one per node
            target_rps=capacity * UTILIZATION_TARGET,
            slo_ttft_s=sc.slo_ttft_s,
            idle_timeout_s=sc.idle_timeout_s,
            scale_down_delay_s=sc.scale_down_delay_s,
        )
        ready_n = sum(1 for r in replicas[name] if r.ready_at <= t)
        load = Load(
            rate=rates[name],
            in_flight=round(rates[name] * BASE_TTFT_S),
            queued=1 if rates[name] * 60 >= 0.5 and ready_n == 0 else 0,
            last_request=last_request.get(name, 0.0),
            ttft_p99_s=p99.get(name, 0.0),
        )
        scale[name] = step(policy, load, scale.get(name), t)
        views.append(
            ModelView(
                name,
                m.memory_bytes,
                scale[name].replicas,
                m.min_replicas,
                m.priority,
                last_request.get(name, 0.0),
                gpus=g,
                request_rate=rates[name],
                tokens_per_s=rates[name] * m.tokens_per_request,
            )
        )
    current: dict[str, set[str]] = {}
    devices: dict[tuple[str, str], tuple[str, ...]] = {}
    for name, rs in replicas.items():
        for r in rs:
            current.setdefault(r.node, set()).add(name)
            devices[(name, r.node)] = r.devices
    host = 256 * GB  # CPU RAM per node for offloaded models
    snap = ClusterSnapshot(
        fleet.view(down, host),
        tuple(views),
        {n: frozenset(ms) for n, ms in current.items()},
        frozenset(),
        {n: dict(ms) for n, ms in offloaded.items() if n not in down},
        devices,
    )
    plan = place(snap, profile)
    res.evictions += len(plan.evictions)
    res.max_evictions_per_round = max(res.max_evictions_per_round, len(plan.evictions))
    if any(d.unschedulable for d in plan.decisions.values()):
        res.unplaced_rounds += 1
    new: dict[str, list[_Replica]] = {name: [] for name in models}
    for (name, node), devs in plan.devices.items():
        old = next((r for r in replicas[name] if r.node == node), None)
        if old is not None and old.devices == devs:
            new[name].append(old)
            continue
        tier = offloaded.get(node, {}).pop(name, 0)
        m = models[name]
        seconds = reload.seconds(m.memory_bytes, tier if tier in (HOST, DISK) else 0) + WARMUP_S
        had_ready = any(r.ready_at <= t for r in replicas[name])
        if not had_ready and not new[name] and rates[name] * 60 >= 0.5:
            res.cold_starts += 1
        res.loads += 1
        new[name].append(_Replica(node, devs, t + seconds))
    for node, waiting in plan.offloads.items():
        offloaded.setdefault(node, {}).update(waiting)
    # Offloaded copies of models that went away entirely are dropped.
    for node in list(offloaded):
        for name in list(offloaded[node]):
            placed_here = (name, node) in plan.devices
            gone = scale[name].replicas == 0 and name not in plan.offloads.get(node, {})
            if placed_here or gone:
                offloaded[node].pop(name)
    replicas.clear()
    replicas.update(new)
