"""The agent's control loop: make the models on this node match ``placements/<node>/``.

Wiring only: watches (models, placements) wake the loop; each pass asks the pure planner
(plan.py) what to do and starts it through the lifecycle (lifecycle.py), which publishes through
the status publisher (publisher.py). Level-triggered (DESIGN §1): every pass compares desired
with actual, so a missed event or a restart of this process or of etcd converges again.

The servicers see this node through `Replicas` below: look up a serving replica (admission
included), list them, drain, and an operator's direct load/unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

import grpc
from meshserve.cluster.fence import Fence
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Change, Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.modelspec import find_model
from meshserve.nodeagent.admission import admit
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import DeviceProbe
from meshserve.nodeagent.lifecycle import Lifecycle
from meshserve.nodeagent.plan import ChangeTier, Load, SetEpoch, Unload, plan
from meshserve.nodeagent.publisher import StatusPublisher
from meshserve.nodeagent.replica import Replica
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.v1 import cluster_pb2

log = logging.getLogger(__name__)
S = cluster_pb2
PASS_S = 2.0  # reconcile at least this often
HEALTH_S = 0.5  # how often each serving replica's engine is asked whether it is alive
OOM_LIMIT = 3  # requests failed by device OOM before the replica is given up here


class Reconciler:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        session: Session,
        probe: DeviceProbe,
        models: Mirror[cluster_pb2.ModelSpec] | None = None,
        fence: Fence | None = None,
    ) -> None:
        """``models``: a mirror of the model specs shared by the agents of one process (a
        simulated fleet, nodeagent/fleet.py), started and stopped by its owner. ``fence``: no
        new streams while cut off from etcd (cluster/fence.py)."""
        self.config = config
        self.fence = fence
        self.session = session
        self.replicas: dict[str, Replica] = {}
        keys = self._keys = store.keys
        self._own_models = models is None
        self.models = models or Mirror(store.client, keys.models(), S.ModelSpec)
        self.placements = Mirror(store.client, keys.placements(config.node_id), S.Placement)
        self._clear_key = keys.health_clear(config.node_id)  # an operator's device clears
        self.clears = Mirror(store.client, self._clear_key, S.DeviceHealthClear)
        self._cleared: dict[str, int] = {}  # device uuid → the clear already applied (unix ms)
        self._probe = probe
        self.publisher = StatusPublisher(config, store, session, probe, self.replicas)
        self.lifecycle = Lifecycle(config, probe, self.publisher, self.replicas, self._wake_up)
        self.publisher.artifacts = self.lifecycle.artifacts
        self.max_epoch = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Publishes the node as reachable at ``address`` and starts reconciling."""
        self.publisher.address = address
        self.session.on_new_lease(self.publisher.republish)
        self.placements.subscribe(lambda _snap: self._wake.set())
        self.clears.subscribe(lambda view: self._apply_clears(view.get(self._clear_key)))
        # A model's spec matters here only while it is placed or held here: a fleet's agents
        # share one models mirror, and 5,000 specs applied must not wake 1,000 agents each time.
        self.models.subscribe_changes(self._models_changed)
        self.placements.start()
        self.clears.start()
        if self._own_models:
            self.models.start()
        await asyncio.wait_for(self.placements.synced.wait(), 30)
        await asyncio.wait_for(self.models.synced.wait(), 30)
        await self.publisher.publish_node(force=True)
        self._tasks = [
            asyncio.create_task(self._loop(), name="reconcile"),
            asyncio.create_task(self.publisher.run(), name="node-status"),
            asyncio.create_task(self._watch_engines(), name="engine-health"),
        ]
        if self.fence is not None:
            self._tasks.append(asyncio.create_task(self.fence.run(), name="fence"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.placements.stop()
        await self.clears.stop()
        if self._own_models:
            await self.models.stop()
        await self.lifecycle.stop()

    def _wake_up(self) -> None:
        self._wake.set()

    def _apply_clears(self, record: cluster_pb2.DeviceHealthClear | None) -> None:
        """An operator cleared devices (`meshserve node uncordon NODE --device UUID`): each is
        judged afresh from now; the node's status follows at once."""
        if record is None:
            return
        fresh = {u: t for u, t in record.cleared_unix_ms.items() if t > self._cleared.get(u, 0)}
        for uuid, when in fresh.items():
            log.info("device %s cleared by an operator", uuid)
            self._probe.clear(uuid)
            self._cleared[uuid] = when
        if fresh:
            self._tasks.append(asyncio.create_task(self.publisher.publish_node(force=True)))

    def _models_changed(self, changes: list[Change[cluster_pb2.ModelSpec]]) -> None:
        here = {p.model for p in self.placements.view.values()} | set(self.replicas)
        for _key, before, now in changes:
            spec = now or before
            if spec is not None and spec.name in here:
                self._wake.set()
                return

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as
            # the event is set (many agents woken at once), and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PASS_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self.reconcile()
                await self.publisher.retry_dirty()
            except Exception:
                log.exception("reconcile pass failed")

    async def _watch_engines(self) -> None:
        """Engine liveness: a serving replica whose engine died (its worker thread or
        engine-core process is gone, a step hangs) is FAILED within HEALTH_S, its in-flight
        requests fail at once (routers continue them elsewhere), and the engine is cleaned up;
        the scheduler places the model elsewhere, or this agent reloads it after
        `load_retry_s`."""
        while True:
            await asyncio.sleep(HEALTH_S)
            for r in list(self.replicas.values()):
                if r.engine is None or r.busy is not None:
                    continue  # nothing to watch, or a step (load, offload …) owns it now
                try:
                    why = r.engine.health()
                except Exception as e:  # a health check that raises says the same
                    why = f"health check failed: {type(e).__name__}: {e}"
                if why:
                    self.lifecycle.start_failure(r, f"engine died: {why}", dead=True)

    def reconcile(self) -> None:
        """One pass: start loads, tier changes and unloads; never waits for them."""
        for r in self.replicas.values():  # a replica that keeps running out of memory moves
            ooms = r.engine.stats().out_of_memory if r.engine is not None and r.ready else 0
            if ooms >= OOM_LIMIT and r.busy is None:
                self.lifecycle.start_failure(r, f"out of device memory {ooms} times")
        actions = plan(
            self.placements.snapshot.values(),
            SpecsByName(self.models.snapshot, self._keys),
            {model: r.held() for model, r in self.replicas.items()},
            self.max_epoch,
            time.monotonic(),
            self.config.load_retry_s,
        )
        self.max_epoch = actions.max_epoch
        for a in actions.actions:
            match a:
                case Load():
                    self.lifecycle.start_load(a)
                case SetEpoch(model, epoch):
                    self.replicas[model].status.epoch = epoch
                    self.publisher.mark_dirty(model)
                case ChangeTier(model, tier, parent, reason):
                    self.lifecycle.start_tier_change(self.replicas[model], tier, parent, reason)
                case Unload(model):
                    self.lifecycle.start_unload(self.replicas[model])

    # --- what the servicers use (Replicas) ---------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def serving(self, name: str) -> Replica:
        """The READY replica for a model name or alias that may take one more stream; raises
        ServiceError (NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED) saying why not."""
        held = self.replicas.get(name)
        if held is not None:  # the common case: a model's own name, held here
            spec: cluster_pb2.ModelSpec | None = held.spec
        else:  # an alias, or a model not here: look through every spec
            specs = [*self.models.snapshot.values(), *(r.spec for r in self.replicas.values())]
            spec = find_model(specs, name)
        if spec is None:  # the list of known models is built only for the error
            raise not_found_model(name, [s.name for s in self.models.snapshot.values()])
        if spec.base:  # an adapter: served by a replica of its base (a model, not an adapter)
            base = find_model(self.models.snapshot.values(), spec.base)
            if base is not None and base.base:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter {spec.name!r}: its base {spec.base!r} is an adapter itself",
                    "BAD_ADAPTER",
                )
            return self.serving(spec.base)
        if self.fence is not None and self.fence.fenced:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"node {self.node_id} takes no new streams: {self.fence.why}; its placements "
                "may have moved (call the router, which knows where)",
                "AGENT_FENCED",
                retry_after_s=1.0,
            )
        return admit(
            spec,
            self.replicas.get(spec.name),
            self.node_id,
            self.publisher.draining,
            self.config.max_in_flight,
        )

    def adapter(self, name: str) -> cluster_pb2.ModelSpec | None:
        """The adapter's spec when ``name`` names one (its own name or an alias), else None."""
        if name in self.replicas:
            return None
        spec = find_model(self.models.snapshot.values(), name)
        return spec if spec is not None and spec.base else None

    def all(self) -> list[Replica]:
        """Every replica here, by model name."""
        return sorted(self.replicas.values(), key=lambda r: r.spec.name)

    def node_status(self) -> cluster_pb2.NodeStatus:
        return self.publisher.node_status()

    async def drain(self, on: bool) -> cluster_pb2.NodeStatus:
        """Draining nodes take no new streams and no new placements (published at once)."""
        self.publisher.draining = on
        await self.publisher.publish_node(force=True)
        return self.publisher.node_status()

    async def drain_all(self) -> None:
        """The agent is shutting down: the node and every READY replica DRAINING, published."""
        self.publisher.draining = True
        for r in list(self.replicas.values()):
            if r.ready:
                await self.publisher.set_state(r, S.REPLICA_STATE_DRAINING)
        await self.publisher.publish_node(force=True)

    async def load(self, spec: cluster_pb2.ModelSpec) -> Replica:
        """Operator's LoadModel: load now, pinned until UnloadModel."""
        r = self.replicas.get(spec.name)
        if r is None or r.status.state == S.REPLICA_STATE_FAILED:
            r = self.lifecycle.start_load(Load(spec, 0, S.TIER_DEVICE, 0, ()), manual=True)
        r.manual = True
        if r.busy is not None:
            await asyncio.shield(r.busy)
        return r

    async def unload(self, model: str) -> bool:
        """Operator's UnloadModel; False when the model is not here."""
        r = self.replicas.get(model)
        if r is None:
            return False
        r.manual = False
        if r.busy is not None:
            await asyncio.shield(r.busy)
        if not r.unloading and model in self.replicas:
            self.lifecycle.start_unload(r)
            assert r.busy is not None
            await asyncio.shield(r.busy)
        return True


class SpecsByName(Mapping[str, cluster_pb2.ModelSpec]):
    """The mirrored specs by model name without copying them (each spec's key is its name's):
    a pass of the plan looks up the few models placed or held here, not all of them."""

    def __init__(self, held: Mapping[bytes, cluster_pb2.ModelSpec], keys: Keyspace) -> None:
        self._held = held
        self._keys = keys

    def __getitem__(self, name: str) -> cluster_pb2.ModelSpec:
        try:
            return self._held[self._keys.model(name)]
        except ValueError:  # not a valid model name: not a model
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return (spec.name for spec in self._held.values())

    def __len__(self) -> int:
        return len(self._held)
