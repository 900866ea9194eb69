"""Turns etcd records into the frozen `ClusterSnapshot` that `place` reads (pure), running the
autoscaler on the routers' demand on the way."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace

from meshserve.scheduler.autoscale import (
    DEFAULT_DOWN_DELAY_S,
    DEFAULT_IDLE_S,
    Load,
    ScalePolicy,
    ScaleState,
    merge,
    step,
)
from meshserve.scheduler.latency import QueueLaw
from meshserve.scheduler.pressure import Pressure, pressures, throughputs
from meshserve.scheduler.views import ClusterSnapshot, Device, ModelView, NodeView
from meshserve.v1 import cluster_pb2, common_pb2
from meshserve.weights import need_bytes


def warm_host(spec: cluster_pb2.ModelSpec) -> bool:
    """Its minimum may wait asleep in CPU RAM (``warm_in: host``): on devices it has none."""
    return spec.warm_in == "host"


def scale_policy(
    spec: cluster_pb2.ModelSpec, slo_quantile: float = 0.0, law: QueueLaw | None = None
) -> ScalePolicy:
    return ScalePolicy(
        slo_quantile=slo_quantile,
        law=law or QueueLaw(),
        min_replicas=0 if warm_host(spec) else spec.min_replicas,
        max_replicas=spec.max_replicas,
        target_rps=spec.target_rps_per_replica,
        target_in_flight=spec.target_in_flight_per_replica,
        slo_ttft_s=spec.slo_ttft_ms / 1000,
        idle_timeout_s=float(spec.idle_timeout_s or DEFAULT_IDLE_S),
        scale_down_delay_s=float(spec.scale_down_delay_s or DEFAULT_DOWN_DELAY_S),
    )


def device_busy(
    nodes: Iterable[cluster_pb2.NodeStatus], placements: Iterable[cluster_pb2.Placement]
) -> dict[str, float]:
    """Per model, how busy the busiest device its placements name is, in [0, 1]: NVML's
    utilization sample, or the measured decode rate over the device's capacity where the agent
    reports one (a CPU node's one device has no NVML sample: only the latter)."""
    nodes = list(nodes)
    busy = {(n.node_id, g.uuid): float(g.utilization) for n in nodes for g in n.gpus}
    for key, (rate, capacity) in throughputs(nodes).items():
        busy[key] = max(busy.get(key, 0.0), min(1.0, rate / capacity))
    out: dict[str, float] = {}
    for p in placements:
        for d in p.devices or [""]:
            if (p.node_id, d) in busy:
                out[p.model] = max(out.get(p.model, 0.0), busy[(p.node_id, d)])
    return out


def loads(
    demand: Iterable[cluster_pb2.RouterDemand],
    ensured: Mapping[str, float],
    busy: Mapping[str, float] | None = None,
    wakes: Mapping[str, int] | None = None,
    pressure: Mapping[str, Pressure] | None = None,
) -> dict[str, Load]:
    """Per model, every router's demand merged; an EnsureModel counts as a request at its time;
    ``busy`` (from `device_busy`) adds device saturation, ``wakes`` the replicas routers' wakes
    asked for."""
    per: dict[str, list[Load]] = defaultdict(list)
    for router in demand:
        for d in router.models:
            per[d.model].append(
                Load(
                    d.request_rate,
                    d.in_flight,
                    d.queued,
                    d.last_request_unix_ms / 1000,
                    d.ttft_p99_s,
                )
            )
    for model, at in ensured.items():
        per[model].append(Load(last_request=at))
    for model, u in (busy or {}).items():
        per[model].append(Load(gpu_utilization=u))
    for model, n in (wakes or {}).items():
        per[model].append(Load(wake_to=n))
    for model, p in (pressure or {}).items():
        per[model].append(
            Load(
                tokens_per_s=p.tokens_per_s,
                others_tokens_per_s=p.others_tokens_per_s,
                capacity_tokens_per_s=p.capacity_tokens_per_s,
                devices_per_replica=p.devices_per_replica,
            )
        )
    return {m: merge(xs) for m, xs in per.items()}


def autoscale(
    models: Iterable[cluster_pb2.ModelSpec],
    load: Mapping[str, Load],
    states: Mapping[str, ScaleState],
    placed: Mapping[str, int],
    now: float,
    slo_quantile: float = 0.0,
    law: QueueLaw | None = None,
) -> dict[str, ScaleState]:
    """The next ScaleState of every model. A model with no state yet (a new leader) starts from
    the replicas placed now, as if just changed, so a failover never scales down at once."""
    out = {}
    for spec in models:
        prev = states.get(spec.name)
        if prev is None and placed.get(spec.name):
            prev = ScaleState(placed[spec.name], now)
        demand = load.get(spec.name, Load())
        if spec.unloaded_unix_ms and demand.last_request * 1000 <= spec.unloaded_unix_ms:
            out[spec.name] = ScaleState(0, now)  # unloaded, and nothing asked for it since
            continue
        out[spec.name] = step(scale_policy(spec, slo_quantile, law), demand, prev, now)
    return out


def with_adapters(
    specs: list[cluster_pb2.ModelSpec], load: Mapping[str, Load]
) -> tuple[list[cluster_pb2.ModelSpec], dict[str, Load]]:
    """Adapters (ModelSpec.base) have no replicas of their own: agents load them into their
    base's at run time (DESIGN §9). Their demand counts as their base's, and every replica of a
    base is granted room for ``max_adapters`` of its largest adapter. Returns the models to
    place (adapters left out, bases' memory raised by that room) and the merged load."""
    adapters = [s for s in specs if s.base]
    if not adapters:
        return specs, dict(load)
    bases = {s.name for s in specs if not s.base}
    largest: dict[str, int] = defaultdict(int)
    asked: dict[str, list[Load]] = defaultdict(list)
    for a in adapters:
        if a.base in bases:
            largest[a.base] = max(largest[a.base], int(a.memory_bytes))
            if a.name in load:
                asked[a.base].append(load[a.name])
    merged = {m: x for m, x in load.items() if m not in {a.name for a in adapters}}
    for base, xs in asked.items():
        merged[base] = merge([*xs, *([load[base]] if base in load else [])])
    out = []
    for spec in specs:
        if spec.base:
            continue
        if spec.max_adapters and largest.get(spec.name):
            roomy = cluster_pb2.ModelSpec()
            roomy.CopyFrom(spec)
            roomy.memory_bytes += spec.max_adapters * largest[spec.name]
            spec = roomy
        out.append(spec)
    return out, merged


def round_snapshot(
    specs: Iterable[cluster_pb2.ModelSpec],
    nodes: list[cluster_pb2.NodeStatus],
    replicas: Iterable[cluster_pb2.ReplicaStatus],
    placements: list[cluster_pb2.Placement],
    demands: list[cluster_pb2.RouterDemand],
    scale: Mapping[str, ScaleState],
    now: float,
    ensured: Mapping[str, float] | None = None,
    wakes: Mapping[str, int] | None = None,
    cordons: Mapping[str, cluster_pb2.NodeCordon] | None = None,
    moving: frozenset[tuple[str, str]] = frozenset(),
    repack_budget: int = 0,
    slo_quantile: float = 0.0,
    law: QueueLaw | None = None,
) -> tuple[ClusterSnapshot, dict[str, ScaleState], list[cluster_pb2.ModelSpec]]:
    """One round's input to `place` from the cluster's records: the routers' demand merged with
    device saturation (`device_busy`), EnsureModel calls and wakes; adapters folded into their
    bases; the autoscaler stepped from ``scale``. Returns the snapshot, the autoscaler's new
    state and the specs placed (bases with their adapters' room). The leader and the simulator
    (scheduler/sim) both decide through this, so the simulator judges the scheduler's code.
    ``moving`` and ``repack_budget``: the background re-pack's moves in flight and how many more
    it may start (the caller's disruption budget); ``slo_quantile`` and ``law``: SLO-aware
    scaling (Profile.slo_quantile, Profile.latency)."""
    replicas = list(replicas)
    busy = device_busy(nodes, placements)
    pressure = pressures(nodes, placements, replicas) if slo_quantile else None
    load = loads(demands, ensured or {}, busy, wakes, pressure)
    # External models (engine external) are endpoints outside the mesh: nothing to place.
    served = [s for s in specs if s.engine != cluster_pb2.ENGINE_KIND_EXTERNAL]
    placed, load = with_adapters(served, load)
    state = autoscale(placed, load, scale, placed_replicas(placements), now, slo_quantile, law)
    snap = build_snapshot(placed, nodes, replicas, placements, load, state, cordons, demands)
    return replace(snap, moving=moving, repack_budget=repack_budget), state, placed


def on_device(p: cluster_pb2.Placement) -> bool:
    """A placement of a replica on a device (not offloaded to CPU RAM or disk)."""
    return p.tier in (cluster_pb2.TIER_UNSPECIFIED, cluster_pb2.TIER_DEVICE)


def warm_copies(placements: Iterable[cluster_pb2.Placement], alive: set[str]) -> dict[str, int]:
    """Per model, its copies on live nodes that can keep a warm-in-host minimum: asleep in CPU
    RAM, or on a device (from where a scale-down demotes it to CPU RAM first of all)."""
    out: dict[str, int] = defaultdict(int)
    for p in placements:
        if p.node_id in alive and (on_device(p) or p.tier == cluster_pb2.TIER_HOST):
            out[p.model] += 1
    return dict(out)


def placed_replicas(placements: Iterable[cluster_pb2.Placement]) -> dict[str, int]:
    """Per model, the replicas placed on a device (offloaded ones do not count)."""
    placed: dict[str, int] = defaultdict(int)
    for p in placements:
        if on_device(p):
            placed[p.model] += 1
    return dict(placed)


def footprint(spec: cluster_pb2.ModelSpec, measured: int) -> int:
    """What one replica needs on its devices: the spec's estimate (weights + runtime, KV
    headroom, overhead), or more when a replica measured more. A replica's measured memory is
    what its engine holds on the device — weights alone for torch (KV grows later; an OOM adds
    what it asked for), the whole grant for vLLM on a GPU and for the sim engine — so it is
    compared with the whole need, never added to the KV headroom (which counted KV twice: full
    nodes shed replicas every round and a fleet never settled)."""
    estimate = need_bytes(int(spec.memory_bytes), int(spec.kv_headroom_bytes))
    return max(estimate, need_bytes(measured, 0)) if measured else estimate


def unreachable(
    demands: Iterable[cluster_pb2.RouterDemand], replicas: Iterable[cluster_pb2.ReplicaStatus]
) -> dict[str, int]:
    """READY replicas per model that some router cannot reach (its breaker for the replica is
    open, or half-open: not yet proven back — a partition between them while the agent still
    holds its lease, so etcd calls it healthy). Placing one more replica elsewhere for each
    lets waiting requests go on; once a probe closes the breaker (the link healed) the surplus
    goes. Half-open counts: dropping the surplus at the end of each cool-down would flap."""
    open_ = {(b.address, b.model) for d in demands for b in d.breakers if b.state != "closed"}
    out: dict[str, int] = defaultdict(int)
    for r in replicas:
        if r.state == cluster_pb2.REPLICA_STATE_READY and (r.address, r.model) in open_:
            out[r.model] += 1
    return dict(out)


def build_snapshot(
    models: Iterable[cluster_pb2.ModelSpec],
    nodes: Iterable[cluster_pb2.NodeStatus],
    replicas: Iterable[cluster_pb2.ReplicaStatus],
    placements: Iterable[cluster_pb2.Placement],
    load: Mapping[str, Load],
    scale: Mapping[str, ScaleState],
    cordons: Mapping[str, cluster_pb2.NodeCordon] | None = None,
    demands: Iterable[cluster_pb2.RouterDemand] = (),
) -> ClusterSnapshot:
    """``load`` is this round's merged demand (`loads`), ``scale`` the autoscaler's output for
    it (`autoscale`): the snapshot takes wanted replicas, recency and request rates from them.
    ``demands``: the routers' records, whose open breakers name replicas they cannot reach
    (`unreachable`): each such READY replica is wanted once more elsewhere while it lasts."""
    measured: dict[str, int] = defaultdict(int)
    decode: dict[str, float] = defaultdict(float)  # tokens/s its replicas generate now
    failed: set[tuple[str, str]] = set()
    ready: set[tuple[str, str]] = set()
    for r in replicas:
        if r.state == cluster_pb2.REPLICA_STATE_READY:
            ready.add((r.model, r.node_id))
        measured[r.model] = max(measured[r.model], int(r.memory_bytes))
        decode[r.model] += float(r.decode_tokens_per_s)
        if r.state == cluster_pb2.REPLICA_STATE_FAILED:
            failed.add((r.model, r.node_id))
    cut_off = unreachable(demands, replicas)
    nodes = list(nodes)
    placements = list(placements)
    copies = warm_copies(placements, {n.node_id for n in nodes})
    views = []
    for spec in models:
        state = scale.get(spec.name)
        keep = spec.min_replicas if warm_host(spec) else 0
        wanted = state.replicas if state is not None else spec.min_replicas - keep
        # A warm-in-host minimum with too few copies on live nodes (never loaded yet, or its
        # node was lost) is loaded on a device; it sleeps in CPU RAM once idle.
        wanted = max(wanted, keep - copies.get(spec.name, 0))
        views.append(
            ModelView(
                name=spec.name,
                need_bytes=footprint(spec, measured.get(spec.name, 0)),
                wanted=wanted + cut_off.get(spec.name, 0) if wanted else 0,
                min_replicas=spec.min_replicas - keep,
                warm_host=keep,
                priority=spec.priority or common_pb2.PRIORITY_NORMAL,
                last_used=load[spec.name].last_request if spec.name in load else 0.0,
                gpus=max(1, spec.gpus_per_replica),
                strategy=spec.placement_strategy,
                gpu_types=frozenset(spec.gpu_types),
                node_selector=dict(spec.node_selector),
                revision=spec.revision,
                request_rate=max(
                    load[spec.name].rate if spec.name in load else 0.0,
                    state.demand if state is not None else 0.0,
                ),
                tokens_per_s=decode.get(spec.name, 0.0),
            )
        )
    current: dict[str, set[str]] = defaultdict(set)
    offloaded: dict[str, dict[str, int]] = defaultdict(dict)
    devices: dict[tuple[str, str], tuple[str, ...]] = {}
    for p in placements:
        if p.tier in (cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK):
            offloaded[p.node_id][p.model] = int(p.tier)
        else:
            current[p.node_id].add(p.model)
            if p.devices:
                devices[(p.model, p.node_id)] = tuple(p.devices)
    return ClusterSnapshot(
        nodes=tuple(node_view(n, (cordons or {}).get(n.node_id)) for n in nodes),
        models=tuple(views),
        current={k: frozenset(v) for k, v in current.items()},
        failed=frozenset(failed),
        offloaded={k: dict(v) for k, v in offloaded.items()},
        current_devices=devices,
        ready=frozenset(ready),
    )


def node_view(n: cluster_pb2.NodeStatus, cordon: cluster_pb2.NodeCordon | None = None) -> NodeView:
    """GPUs become devices, each offering its share of the node's capacity (an agent's
    --memory-limit caps the total) and the decode capacity the agent measured or was configured
    with; a node without GPUs is one device ("") of its capacity."""
    compute = {t.device_id: float(t.capacity_tokens_per_s) for t in n.throughput}
    gpus = [g for g in n.gpus if g.memory_total_bytes > 0]
    devices: tuple[Device, ...] = ()
    if gpus:
        total = sum(g.memory_total_bytes for g in gpus)
        scale = min(1.0, n.capacity_bytes / total) if n.capacity_bytes else 1.0
        devices = tuple(
            Device(
                g.uuid,
                int(g.memory_total_bytes * scale),
                g.name,
                g.mig,
                compute.get(g.uuid, 0.0),
                int(g.health),
                tuple(g.health_reasons),
            )
            for g in gpus
        )
    elif compute.get(""):
        devices = (Device("", int(n.capacity_bytes), throughput_tokens_per_s=compute[""]),)
    return NodeView(
        n.node_id,
        int(n.capacity_bytes),
        n.draining,
        int(n.host_capacity_bytes),
        devices,
        dict(n.labels),
        ("drain" if cordon.drain else "cordon") if cordon is not None else "",
        frozenset(n.cached_revisions),
    )
