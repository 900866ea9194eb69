"""The scheduler's control loop: campaign, and while leading, turn snapshots into placements.

Rounds run on watch events (debounced) and every ``resync_s``. Each round's writes go in one
transaction fenced by the leader key's create revision, which is also every placement's epoch; a
failed fence means this process was deposed, so it stops leading and campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from meshserve.cluster.election import Election, Leadership
from meshserve.cluster.mirror import Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.scheduler.autoscale import ScaleState
from meshserve.scheduler.config import SchedulerConfig
from meshserve.scheduler.placement import ModelDecision, Plan, place
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.snapshot import (
    autoscale,
    build_snapshot,
    gpu_busy,
    loads,
    placed_replicas,
)
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import cluster_pb2
from opentelemetry import trace

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128


class SchedulerLoop:
    def __init__(self, config: SchedulerConfig, store: Store, session: Session) -> None:
        self.config = config
        self.store = store
        self.keys = store.keys
        self.session = session
        c = store.client
        self.models = Mirror(c, self.keys.models(), cluster_pb2.ModelSpec)
        self.nodes = Mirror(c, self.keys.nodes(), cluster_pb2.NodeStatus)
        self.replicas = Mirror(c, self.keys.replicas(), cluster_pb2.ReplicaStatus)
        self.placements = Mirror(c, self.keys.placements(), cluster_pb2.Placement)
        self.demand = Mirror(c, self.keys.demands(), cluster_pb2.RouterDemand)
        self.mirrors: tuple[Mirror, ...] = (  # type: ignore[type-arg]
            self.models,
            self.nodes,
            self.replicas,
            self.placements,
            self.demand,
        )
        self.election = Election(c, session, self.keys.election())
        self.ensured: dict[str, float] = {}
        self.scale: dict[str, ScaleState] = {}  # the autoscaler's memory between rounds
        self.profile: Profile = config.profile
        self.leadership: Leadership | None = None
        self.last_plan: Plan | None = None
        self.explained: dict[str, tuple[ModelDecision, float]] = {}  # model → decision, when
        self.decided_at = 0.0
        self.address = ""
        self._dirty = asyncio.Event()
        self._round_done = asyncio.Event()
        self._links: list[trace.Link] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for m in self.mirrors:
            m.subscribe(lambda _s: self._dirty.set())
            m.start()
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.election.resign()
        for m in self.mirrors:
            await m.stop()

    def spec(self, name: str) -> cluster_pb2.ModelSpec | None:
        for s in self.models.snapshot.values():
            if s.name == name or name in s.aliases:
                return s
        return None

    async def ensure(self, model: str) -> None:
        """Marks ``model`` as demanded now and waits (up to 2 s) for the round that places it."""
        self.ensured[model] = time.time()
        span = trace.get_current_span()
        if span.get_span_context().is_valid:
            self._links.append(trace.Link(span.get_span_context()))
        done = self._round_done
        self._dirty.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 2.0)

    async def _run(self) -> None:
        for m in self.mirrors:
            await m.synced.wait()
        candidate = cluster_pb2.SchedulerCandidate(
            scheduler_id=self.config.scheduler_id, address=self.address
        ).SerializeToString()
        while True:
            try:
                lead = await self.election.campaign(candidate)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("campaign failed (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            log.info("%s leads (epoch %d)", self.config.scheduler_id, lead.token)
            self.leadership = lead
            try:
                await self._lead(lead)
            finally:
                self.leadership = None
                await self.election.resign()
            log.warning("%s lost leadership", self.config.scheduler_id)

    async def _lead(self, lead: Leadership) -> None:
        self._dirty.set()
        while not self.session.lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.config.resync_s)
            await asyncio.sleep(self.config.debounce_s)
            self._dirty.clear()
            try:
                if not await self.round(lead):
                    return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduling round failed")
                metrics.SCHEDULER_ROUNDS.labels("error").inc()
                await asyncio.sleep(0.5)

    async def round(self, lead: Leadership) -> bool:
        """One decision and its fenced write. False when the fence failed (deposed)."""
        started = time.perf_counter()
        links, self._links = self._links, []
        with _tracer.start_as_current_span("scheduler.round", links=links) as span:
            now = time.time()
            specs = list(self.models.snapshot.values())
            nodes = list(self.nodes.snapshot.values())
            placements = list(self.placements.snapshot.values())
            busy = gpu_busy(nodes, placements)
            load = loads(self.demand.snapshot.values(), self.ensured, busy)
            placed = placed_replicas(placements)
            self.scale = autoscale(specs, load, self.scale, placed, now)
            snap = build_snapshot(
                specs, nodes, self.replicas.snapshot.values(), placements, load, self.scale
            )
            plan = place(snap, self.profile)
            puts, deletes = self._diff(plan, lead.token)
            span.set_attribute("meshserve.epoch", lead.token)
            span.set_attribute("meshserve.models", len(snap.models))
            span.set_attribute("meshserve.nodes", len(snap.nodes))
            span.set_attribute("meshserve.placements_written", len(puts))
            span.set_attribute("meshserve.placements_deleted", len(deletes))
            span.set_attribute("meshserve.evictions", len(plan.evictions))
            span.set_attribute("meshserve.loads", plan.moves)
            span.set_attribute(
                "meshserve.wanted_replicas", sum(s.replicas for s in self.scale.values())
            )
            unplaced = [d.model for d in plan.decisions.values() if d.unschedulable]
            span.set_attribute("meshserve.unschedulable", unplaced)
            # What on-call asks of a round: who was evicted, placed, or left out, and why.
            for victim, node_id in plan.evictions:
                span.add_event("evict", {"gen_ai.request.model": victim, "meshserve.node": node_id})
            for _key, p in puts:
                span.add_event(
                    "place",
                    {
                        "gen_ai.request.model": p.model,
                        "meshserve.node": p.node_id,
                        "meshserve.tier": cluster_pb2.Tier.Name(p.tier),
                        "meshserve.reason": p.reason,
                    },
                )
            for name in unplaced:
                span.add_event(
                    "unschedulable",
                    {
                        "gen_ai.request.model": name,
                        "meshserve.reason": plan.decisions[name].unschedulable[:500],
                    },
                )
            ops = [*((k, v) for k, v in puts), *((k, None) for k in deletes)]
            for i in range(0, max(len(ops), 1), MAX_TXN_OPS):
                batch = ops[i : i + MAX_TXN_OPS]
                if not batch:
                    break
                ok = await self.store.txn_if_created_at(
                    lead.key,
                    lead.token,
                    [(k, v) for k, v in batch if v is not None],
                    [k for k, v in batch if v is None],
                )
                if not ok:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, "fenced out: deposed"))
                    metrics.SCHEDULER_ROUNDS.labels("fenced").inc()
                    return False
            if puts or deletes:
                log.info(
                    "round: %d placements written, %d removed, evictions %s, unschedulable %s; "
                    "held %s, plan %s",
                    len(puts),
                    len(deletes),
                    list(plan.evictions),
                    unplaced,
                    {n: sorted(ms) for n, ms in snap.current.items()},
                    {n: sorted(ms) for n, ms in plan.assignments.items()},
                )
        self.last_plan, self.decided_at = plan, time.time()
        for name, decision in plan.decisions.items():
            # Explain shows the round that last searched for this model (kept models are not
            # searched again), or this round when it says why a replica could not be placed.
            if decision.verdicts or decision.unschedulable or not decision.placed_on:
                self.explained[name] = (decision, self.decided_at)
        metrics.SCHEDULER_ROUNDS.labels("ok").inc()
        metrics.SCHEDULER_LOADS.inc(plan.moves)
        for victim, _node in plan.evictions:
            metrics.SCHEDULER_EVICTIONS.labels(victim).inc()
        for name, state in self.scale.items():
            metrics.WANTED_REPLICAS.labels(name).set(state.replicas)
        for name, decision in plan.decisions.items():
            metrics.UNSCHEDULABLE.labels(name).set(1 if decision.unschedulable else 0)
        metrics.SCHEDULER_ROUND_SECONDS.observe(time.perf_counter() - started)
        done, self._round_done = self._round_done, asyncio.Event()
        done.set()
        return True

    def _diff(
        self, plan: Plan, epoch: int
    ) -> tuple[list[tuple[bytes, cluster_pb2.Placement]], list[bytes]]:
        current: Mapping[bytes, cluster_pb2.Placement] = self.placements.snapshot
        specs = {s.name: s for s in self.models.snapshot.values()}
        want: dict[bytes, cluster_pb2.Placement] = {}
        for node_id, models in plan.assignments.items():
            for model in models:
                decision = plan.decisions.get(model)
                reason = (
                    next(
                        (v.reason for v in decision.verdicts if v.node_id == node_id),
                        "kept in place",
                    )
                    if decision
                    else ""
                )
                spec = specs[model]
                want[self.keys.placement(node_id, model)] = cluster_pb2.Placement(
                    model=model,
                    node_id=node_id,
                    tier=cluster_pb2.TIER_DEVICE,
                    epoch=epoch,
                    memory_bytes=int(spec.memory_bytes + spec.kv_headroom_bytes),
                    reason=reason,
                    devices=[d for d in plan.devices.get((model, node_id), ()) if d],
                )
        for node_id, offloads in plan.offloads.items():
            for model, tier in offloads.items():
                spec = specs[model]
                want[self.keys.placement(node_id, model)] = cluster_pb2.Placement(
                    model=model,
                    node_id=node_id,
                    tier=tier,  # type: ignore[arg-type]
                    epoch=epoch,
                    memory_bytes=int(spec.memory_bytes),
                    reason="evicted; kept offloaded for a quick restore",
                )
        puts = []
        for key, p in want.items():
            old = current.get(key)
            if old is None or (old.tier, old.epoch, old.memory_bytes, list(old.devices)) != (
                p.tier,
                p.epoch,
                p.memory_bytes,
                list(p.devices),
            ):
                puts.append((key, p))
        deletes = [key for key in current if key not in want]
        return puts, deletes
