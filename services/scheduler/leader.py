"""The scheduler's control loop: campaign, and while leading, turn snapshots into placements.

Rounds run on watch events (debounced) and every ``resync_s``. Each round's writes go in one
transaction fenced by the leader key's create revision, which is also every placement's epoch; a
failed fence means this process was deposed, so it stops leading and campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from meshserve.cluster.election import Election, Leadership
from meshserve.cluster.mirror import Change, Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.modelspec import find_model
from meshserve.scheduler.autoscale import ScaleState
from meshserve.scheduler.config import SchedulerConfig
from meshserve.scheduler.eta import ready_in_s
from meshserve.scheduler.placement import place
from meshserve.scheduler.profile import Profile
from meshserve.scheduler.record import RoundOutcome, export_replicas, record_round
from meshserve.scheduler.repack import Repacks
from meshserve.scheduler.snapshot import on_device, placed_replicas, round_snapshot
from meshserve.scheduler.views import ClusterSnapshot, ModelDecision, Plan
from meshserve.scheduler.writes import Put, changes, wanted_placements
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import traceparent, tracer
from meshserve.v1 import cluster_pb2
from opentelemetry import trace

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
MAX_TXN_OPS = 100  # etcd's default --max-txn-ops is 128
WAKE_S = 10.0  # a router's wake holds this long (then the autoscaler's down window keeps it)
# A burst of lease expiries is over once no node was lost for this long (etcd revokes expired
# leases in batches, every 0.5 s: a shorter quiet split one burst into a round per batch)
LOSS_QUIET_S = 1.0
LOSS_WAIT_MAX_S = 3.0  # ... and a round waits for one at most this long


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
        self.cordons = Mirror(c, self.keys.cordons(), cluster_pb2.NodeCordon)
        self.mirrors: tuple[Mirror, ...] = (  # type: ignore[type-arg]
            self.models,
            self.nodes,
            self.replicas,
            self.placements,
            self.demand,
            self.cordons,
        )
        self.election = Election(c, session, self.keys.election())
        self.ensured: dict[str, float] = {}
        self.wakes: dict[str, tuple[int, float]] = {}  # model → (replicas asked, when: epoch s)
        self.measured_load_s: dict[str, float] = {}  # model → its last load + warm-up, s
        self.scale: dict[str, ScaleState] = {}  # the autoscaler's memory between rounds
        # The last snapshot's models to place: bases carry their adapters' room (with_adapters)
        self.placed_specs: dict[str, cluster_pb2.ModelSpec] = {}
        self.profile: Profile = config.profile
        self.repacks = Repacks(self.profile.repack_moves_per_minute)  # moves and their budget
        self.leadership: Leadership | None = None
        self.last_plan: Plan | None = None
        self.explained: dict[str, tuple[ModelDecision, float]] = {}  # model → decision, when
        self.decided_at = 0.0
        self.address = ""
        self._dirty = asyncio.Event()
        self._round_done = asyncio.Event()
        self._links: list[trace.Link] = []
        self._task: asyncio.Task[None] | None = None
        self._lost_at = -math.inf  # monotonic s of the last node lost (a lease that expired)

    def start(self) -> None:
        self.nodes.subscribe_changes(self._on_nodes)
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
        return find_model(self.models.snapshot.values(), name)

    def ready_in_s(self, spec: cluster_pb2.ModelSpec) -> float:
        """Seconds until ``spec`` can serve, as far as this scheduler knows (eta.py)."""
        return ready_in_s(
            spec,
            self.replicas.snapshot.values(),
            self.measured_load_s,
            self.profile.reload,
            self.nodes.snapshot.values(),
        )

    async def ensure(self, model: str, wake: bool = False) -> None:
        """Marks ``model`` as demanded now and waits (up to 2 s) for the round that places it.
        ``wake``: a router asks for one more replica than is placed now (autoscale.Load
        ``wake_to``), which the demotion rule keeps asleep in CPU RAM where it can."""
        self.ensured[model] = time.time()
        if wake:
            placed = placed_replicas(self.placements.snapshot.values()).get(model, 0)
            self.wakes[model] = (max(placed + 1, self.wakes.get(model, (0, 0.0))[0]), time.time())
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
                export_replicas(())
                await self.election.resign()
            log.warning("%s lost leadership", self.config.scheduler_id)

    async def _lead(self, lead: Leadership) -> None:
        self._dirty.set()
        self.repacks = Repacks(self.profile.repack_moves_per_minute)  # a previous term's go
        while not self.session.lost.is_set():
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see Reconciler._loop
                async with asyncio.timeout(self.config.resync_s):
                    await self._dirty.wait()
            await asyncio.sleep(self.config.debounce_s)
            await self._settle_losses()
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

    def _on_nodes(self, changes: list[Change[cluster_pb2.NodeStatus]]) -> None:
        if _count_lost_nodes(changes):
            self._lost_at = time.monotonic()

    async def _settle_losses(self) -> None:
        """Leases that expire over a few seconds (a rack losing power, a zone) are re-placed in
        one round rather than one round each: while nodes are being lost, the round waits until
        none was for LOSS_QUIET_S, at most LOSS_WAIT_MAX_S."""
        began = time.monotonic()
        while (quiet := time.monotonic() - self._lost_at) < LOSS_QUIET_S:
            if time.monotonic() - began >= LOSS_WAIT_MAX_S:
                return
            await asyncio.sleep(LOSS_QUIET_S - quiet)

    async def round(self, lead: Leadership) -> bool:
        """One decision and its fenced write: read → snapshot → place → diff → write → record.
        False when the fence failed (deposed)."""
        started = time.perf_counter()
        started_ns = time.time_ns()
        links, self._links = self._links, []
        snap = self._snapshot(time.time())
        export_replicas(self.replicas.snapshot.values())
        plan = place(snap, self.profile)
        # Bases with their adapters' room (as `_snapshot` planned them): placements grant it
        want = wanted_placements(plan, self.placed_specs, lead.token, self.keys)
        puts, deletes = changes(want, self.placements.snapshot)
        # A span only for a round that decides something (or that a request waited on): idle
        # rounds — every resync — are counted in metrics, not exported as traces. It starts
        # before the write so that each placement written names it (an agent's load links it).
        span: trace.Span = trace.INVALID_SPAN
        if puts or deletes or links:
            span = _tracer.start_span("scheduler.round", links=links, start_time=started_ns)
            parent = traceparent(span)
            for _key, p in puts:
                p.trace_parent = parent
        written = await self._write(lead, puts, deletes)
        outcome = RoundOutcome(
            lead.token,
            snap,
            plan,
            puts,
            deletes,
            self.scale,
            time.perf_counter() - started,
            fenced=not written,
        )
        record_round(span, outcome)
        span.end()
        if span is trace.INVALID_SPAN:
            metrics.SCHEDULER_IDLE_ROUNDS.inc()
        if not written:
            return False
        self._remember(plan)
        self.repacks.begun(plan.repacked, time.time())
        done, self._round_done = self._round_done, asyncio.Event()
        done.set()
        return True

    def _snapshot(self, now: float) -> ClusterSnapshot:
        """The cluster as etcd says it is, with the autoscaler's wanted replicas (advances
        the autoscaler's state)."""
        specs = list(self.models.snapshot.values())
        for r in self.replicas.snapshot.values():
            if r.load_seconds > 0:
                self.measured_load_s[r.model] = r.load_seconds
        nodes = list(self.nodes.snapshot.values())
        placements = list(self.placements.snapshot.values())
        wall = time.time()
        for model in [m for m, (_n, at) in self.wakes.items() if wall - at > WAKE_S]:
            del self.wakes[model]
        wakes = {m: n for m, (n, _at) in self.wakes.items()}
        cordons = {c.node_id: c for c in self.cordons.snapshot.values()}
        moving = self.repacks.in_flight((p.model, p.node_id) for p in placements if on_device(p))
        snap, self.scale, placed = round_snapshot(
            specs,
            nodes,
            self.replicas.snapshot.values(),
            placements,
            list(self.demand.snapshot.values()),
            self.scale,
            now,
            self.ensured,
            wakes,
            cordons,
            moving,
            self.repacks.budget(now),
            self.profile.slo_quantile,
            self.profile.latency,
        )
        self.placed_specs = {s.name: s for s in placed}  # the round's placements grant these
        return snap

    async def _write(self, lead: Leadership, puts: list[Put], deletes: list[bytes]) -> bool:
        """In transactions of at most MAX_TXN_OPS, each fenced by the leader key's revision.
        False when a fence failed (deposed)."""
        ops: list[tuple[bytes, cluster_pb2.Placement | None]] = [*puts]
        ops += [(k, None) for k in deletes]
        for i in range(0, len(ops), MAX_TXN_OPS):
            batch = ops[i : i + MAX_TXN_OPS]
            ok = await self.store.txn_if_created_at(
                lead.key,
                lead.token,
                [(k, v) for k, v in batch if v is not None],
                [k for k, v in batch if v is None],
            )
            if not ok:
                return False
        return True

    def _remember(self, plan: Plan) -> None:
        """Explain shows the round that last searched for a model (kept models are not searched
        again), or this round when it says why a replica could not be placed."""
        self.last_plan, self.decided_at = plan, time.time()
        for name, decision in plan.decisions.items():
            if decision.verdicts or decision.unschedulable or not decision.placed_on:
                self.explained[name] = (decision, self.decided_at)


def _count_lost_nodes(changes: list[Change[cluster_pb2.NodeStatus]]) -> int:
    """A node record that vanished without its agent draining first: its lease expired."""
    lost = 0
    for _key, before, now in changes:
        if before is not None and now is None and not before.draining:
            metrics.NODES_LOST.inc()
            lost += 1
    return lost
