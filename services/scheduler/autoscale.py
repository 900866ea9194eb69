"""Replicas wanted per model from the routers' demand (pure; the leader keeps `ScaleState` between
rounds, the simulator keeps it in virtual time).

recommendation = max(⌈rate / target_rps⌉, ⌈in_flight / target_in_flight⌉, 1 while anything is
queued, in flight or was requested within the idle timeout), +1 while the TTFT p99 is above the
model's SLO or while a GPU serving it is saturated, and what a router's wake asked for (one more
than was placed when it asked); clamped to [min_replicas, max_replicas].
SLO-aware (`ScalePolicy.slo_quantile`, where the model has an SLO and its devices report their
throughput): the rate threshold gives way to a prediction — the fewest replicas at which the
queue law (`latency.py`) puts the TTFT quantile within the SLO on its busiest device, with that
device's other load as measured (`pressure.py`) — so a model scales on the latency it will give,
up before the SLO is missed and never down into a miss.
Up at once (after a short cooldown, so one burst adds one step at a time; a wake skips it);
down only after the recommendation stayed lower for `scale_down_delay_s` (Kubernetes HPA's
stabilization window), to the highest recommendation seen in that window. Zero after
`idle_timeout_s` without requests when min_replicas is 0; the router's cold-start path brings it
back on the next request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from meshserve.scheduler.latency import QueueLaw

DEFAULT_IDLE_S = 300.0
DEFAULT_DOWN_DELAY_S = 120.0
UP_COOLDOWN_S = 10.0


@dataclass(frozen=True)
class Load:
    rate: float = 0.0  # requests/s, summed over routers
    in_flight: int = 0
    queued: int = 0  # waiting for a replica (cold start)
    last_request: float = 0.0  # s since the epoch; 0 = never
    ttft_p99_s: float = 0.0
    # the busiest device among its replicas, [0, 1]: NVML utilization, or measured decode rate
    # over the device's decode capacity (snapshot.device_busy)
    gpu_utilization: float = 0.0
    # replicas a router asked for by waking an asleep one (EnsureModel wake): the count placed
    # then + 1; taken at once, without the up cooldown (a restore from CPU RAM takes well under
    # a second, and the router judged it faster than queueing)
    wake_to: int = 0
    # the model's decode rate, and its busiest device's other load and capacity (pressure.py)
    tokens_per_s: float = 0.0
    others_tokens_per_s: float = 0.0
    capacity_tokens_per_s: float = 0.0
    devices_per_replica: int = 1


@dataclass(frozen=True)
class ScalePolicy:
    min_replicas: int = 0
    max_replicas: int = 0  # 0: no limit
    target_rps: float = 0.0  # 0: not used
    target_in_flight: int = 0  # 0: not used
    slo_ttft_s: float = 0.0  # 0: no SLO
    busy_gpu: float = 0.95  # a replica's GPU busier than this adds a replica (0: off)
    idle_timeout_s: float = DEFAULT_IDLE_S
    scale_down_delay_s: float = DEFAULT_DOWN_DELAY_S
    slo_quantile: float = 0.0  # SLO-aware: this TTFT quantile within slo_ttft_s (0: off)
    slo_headroom: float = 0.1  # ... for this much more traffic than measured (growth, noise)
    law: QueueLaw = field(default_factory=QueueLaw)


@dataclass(frozen=True)
class ScaleState:
    replicas: int
    changed_at: float = 0.0
    window: tuple[tuple[float, int], ...] = field(default=())  # (time, recommendation) recent
    # requests/s over about the last hour (an exponential average of the routers' rate): what
    # cost-aware eviction weighs a model by, where the routers' 10 s rate is 0 between the
    # requests of a rarely used one
    demand: float = 0.0
    demand_at: float = -math.inf


def recommend(policy: ScalePolicy, load: Load, current: int, now: float) -> int:
    """What the load asks for now, before hysteresis."""
    active = load.queued > 0 or load.in_flight > 0
    recent = load.last_request > 0 and now - load.last_request < policy.idle_timeout_s
    want = 1 if active or recent else 0
    predicted = slo_replicas(policy, load, current)
    if predicted is not None:
        want = max(want, predicted)
    elif policy.target_rps > 0:
        want = max(want, math.ceil(load.rate / policy.target_rps - 1e-9))
    if policy.target_in_flight > 0:
        want = max(want, math.ceil(load.in_flight / policy.target_in_flight))
    if policy.slo_ttft_s > 0 and current > 0 and load.ttft_p99_s > policy.slo_ttft_s:
        want = max(want, current + 1)
    if policy.busy_gpu > 0 and current > 0 and active and load.gpu_utilization > policy.busy_gpu:
        want = max(want, current + 1)  # saturated GPUs queue requests before latency shows it
    return clamp(policy, max(want, load.wake_to))


SLO_SEARCH = 16  # replicas beyond the current ones a prediction looks at


def slo_replicas(policy: ScalePolicy, load: Load, current: int) -> int | None:
    """The fewest replicas whose busiest device keeps the TTFT ``slo_quantile`` within the SLO
    by the queue law, the model's rate split evenly over them beside the device's other load;
    None where no prediction can be made (off, no SLO, nothing measured, or no replica now),
    and where the device's other load alone misses the SLO, which more replicas of this model
    would not cure (the models making it would scale, or be moved). A model needing more than
    SLO_SEARCH replicas beyond its current ones gets that many (the up-step adds one a cooldown)."""
    if not (policy.slo_quantile and policy.slo_ttft_s and current):
        return None
    if load.capacity_tokens_per_s <= 0 or load.tokens_per_s <= 0:
        return None
    grow = 1 + policy.slo_headroom
    per_device = grow * load.tokens_per_s / max(1, load.devices_per_replica)
    others = grow * load.others_tokens_per_s
    cap, q = load.capacity_tokens_per_s, policy.slo_quantile
    if policy.law.quantile(others / cap, q) > policy.slo_ttft_s:
        return None
    for k in range(1, current + SLO_SEARCH + 1):
        if policy.law.quantile((others + per_device / k) / cap, q) <= policy.slo_ttft_s:
            return k
    return current + SLO_SEARCH  # far more than now: as many as one prediction looks at


def clamp(policy: ScalePolicy, n: int) -> int:
    n = max(n, policy.min_replicas)
    return min(n, policy.max_replicas) if policy.max_replicas else n


DEMAND_HORIZON_S = 3600.0  # ScaleState.demand's time constant


def step(policy: ScalePolicy, load: Load, prev: ScaleState | None, now: float) -> ScaleState:
    """The next ScaleState: up at once (cooldown), down after the stabilization window. Without
    ``prev`` the model starts from min_replicas with no history; a new leader seeds ``prev`` from
    the replicas actually placed (changed_at = now) so a failover never scales down at once."""
    out = _step(policy, load, prev, now)
    before, at = (prev.demand, prev.demand_at) if prev is not None else (0.0, -math.inf)
    keep = math.exp(-(now - at) / DEMAND_HORIZON_S) if now > at else 1.0  # -inf: exp(-inf) = 0
    return replace(out, demand=keep * before + (1 - keep) * load.rate, demand_at=now)


def _step(policy: ScalePolicy, load: Load, prev: ScaleState | None, now: float) -> ScaleState:
    current = prev.replicas if prev is not None else clamp(policy, 0)
    changed_at = prev.changed_at if prev is not None else -math.inf
    rec = recommend(policy, load, current, now)
    recent = [
        (t, r) for t, r in (prev.window if prev else ()) if now - t < policy.scale_down_delay_s
    ]
    # Only the window's maximum matters: an entry no larger than a later one never will be (it
    # leaves the window first). Dropping them keeps the window a few entries long however often
    # rounds run (5,000 models x a round every 0.1 s made it 10 % of a round).
    while recent and recent[-1][1] <= rec:
        recent.pop()
    window = (*recent, (now, rec))
    if rec > current:
        if current == 0 or now - changed_at >= UP_COOLDOWN_S or load.wake_to > current:
            # From zero straight to what is asked (a cold start); otherwise one step per cooldown.
            target = rec if current == 0 else current + 1
            return ScaleState(target, now, window)
        return ScaleState(current, changed_at, window)
    if rec < current:
        idle = load.last_request > 0 and now - load.last_request >= policy.idle_timeout_s
        if rec == clamp(policy, 0) and idle and not (load.in_flight or load.queued):
            return ScaleState(rec, now, window)  # the idle timeout is its own stabilization
        target = max(r for _t, r in window)
        if target < current and now - changed_at >= policy.scale_down_delay_s:
            return ScaleState(target, now, window)
    return ScaleState(current, changed_at, window)


def merge(loads: Iterable[Load]) -> Load:
    """Routers' views of one model summed (rates, streams) or maxed (times, latency)."""
    out = Load()
    for x in loads:
        out = Load(
            out.rate + x.rate,
            out.in_flight + x.in_flight,
            out.queued + x.queued,
            max(out.last_request, x.last_request),
            max(out.ttft_p99_s, x.ttft_p99_s),
            max(out.gpu_utilization, x.gpu_utilization),
            max(out.wake_to, x.wake_to),
            max(out.tokens_per_s, x.tokens_per_s),
            max(out.others_tokens_per_s, x.others_tokens_per_s),
            max(out.capacity_tokens_per_s, x.capacity_tokens_per_s),
            max(out.devices_per_replica, x.devices_per_replica),
        )
    return out
