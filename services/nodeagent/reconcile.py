"""The agent's control loop: make the models on this node match ``placements/<node>/``, and
publish what is actually here (``nodes/<node>``, ``replicas/<model>/<node>``) under the lease.

Level-triggered (DESIGN §1): every pass compares desired with actual, so a missed event, a restart
of this process or of etcd converges again. Loads are serialized per node so a device's memory is
measured by one load at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import DeviceProbe, capacity_bytes
from meshserve.nodeagent.engines import make_engine
from meshserve.nodeagent.engines.base import Engine, EngineConfig
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import cluster_pb2
from meshserve.validation import GenerationParams
from meshserve.weights import predict_weight_bytes

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 1.0  # engine stats → ReplicaStatus (only when they moved)
NODE_INTERVAL_S = 2.0  # node status refresh check
_tracer = tracer(__name__)

S = cluster_pb2
WARMUP = GenerationParams(4, 0.0, 1.0, 0, None, (), True)
NODE_REFRESH_S = 10.0  # publish nodes/<node> at least this often
PASS_S = 2.0  # reconcile at least this often


@dataclass
class Replica:
    spec: cluster_pb2.ModelSpec
    status: cluster_pb2.ReplicaStatus
    engine: Engine | None = None
    manual: bool = False  # loaded by an operator's LoadModel: placements do not unload it
    failed_at: float = 0.0
    busy: asyncio.Task[None] | None = None  # load or unload in progress
    generated_tokens: int = 0
    unloading: bool = False
    budget_bytes: int = 0  # memory the placement granted (0: an operator's LoadModel)
    devices: tuple[str, ...] = ()  # GPU uuids the placement names (the first is used)
    # The tier last asked of the engine. An engine may settle elsewhere (vLLM's CPU build cannot
    # keep weights in CPU RAM): status.tier says where it is, this keeps us from asking again.
    asked_tier: int = S.TIER_DEVICE
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status.state == S.REPLICA_STATE_READY and self.engine is not None


class Reconciler:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        session: Session,
        probe: DeviceProbe,
        address: str,
    ) -> None:
        self.config = config
        self.store = store
        self.keys: Keyspace = store.keys
        self.session = session
        self.probe = probe
        self.address = address
        self.replicas: dict[str, Replica] = {}
        self.models = Mirror(store.client, self.keys.models(), S.ModelSpec)
        self.placements = Mirror(store.client, self.keys.placements(config.node_id), S.Placement)
        self.draining = False
        self.max_epoch = 0
        self._wake = asyncio.Event()
        self._load_lock = asyncio.Lock()
        self._dirty: set[str] = set()  # replicas whose last publish failed
        self._tasks: list[asyncio.Task[None]] = []
        self._engine_config = EngineConfig(
            device="cuda:0" if probe.kind == "cuda" else "cpu",
            threads=config.threads,
            cache_dir=config.tier_cache_dir,
        )
        self._last_node: cluster_pb2.NodeStatus | None = None
        self._last_node_at = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.session.on_new_lease(self._republish)
        for mirror in (self.models, self.placements):
            mirror.subscribe(lambda _snap: self._wake.set())
            mirror.start()
        await asyncio.wait_for(self.placements.synced.wait(), 30)
        await asyncio.wait_for(self.models.synced.wait(), 30)
        await self.publish_node(force=True)
        self._tasks = [
            asyncio.create_task(self._loop(), name="reconcile"),
            asyncio.create_task(self._node_loop(), name="node-status"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for mirror in (self.models, self.placements):
            await mirror.stop()
        for r in list(self.replicas.values()):
            if r.busy is not None:
                r.busy.cancel()
            if r.engine is not None:
                with contextlib.suppress(Exception):
                    await r.engine.unload()

    # --- lookups for the servicer ------------------------------------------------------------

    def spec(self, name: str) -> cluster_pb2.ModelSpec | None:
        """The spec for a model name or alias: from etcd, or from a direct load."""
        for s in self.models.snapshot.values():
            if s.name == name or name in s.aliases:
                return s
        for r in self.replicas.values():
            if r.spec.name == name or name in r.spec.aliases:
                return r.spec
        return None

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PASS_S)
            self._wake.clear()
            try:
                self.reconcile()
                for model in list(self._dirty):
                    if (r := self.replicas.get(model)) is not None:
                        await self._publish(r)
                    else:
                        self._dirty.discard(model)
            except Exception:
                log.exception("reconcile pass failed")

    def reconcile(self) -> None:
        """One pass: start loads and unloads; never waits for them."""
        placements = list(self.placements.snapshot.values())
        self.max_epoch = max([self.max_epoch, *(p.epoch for p in placements)])
        # A placement from an older epoch was written by a deposed leader: keep whatever is
        # there for it (neither load nor unload) until the current leader rewrites it.
        current = {p.model: p for p in placements if p.epoch >= self.max_epoch}
        stale = {p.model for p in placements if p.epoch < self.max_epoch}
        specs = {s.name: s for s in self.models.snapshot.values()}
        now = time.monotonic()
        for model, placement in current.items():
            spec = specs.get(model)
            if spec is None:
                continue
            r = self.replicas.get(model)
            if r is None or (
                r.status.state == S.REPLICA_STATE_FAILED
                and r.busy is None
                and now - r.failed_at > self.config.load_retry_s
            ):
                self._start_load(
                    spec,
                    placement.epoch,
                    manual=False,
                    tier=placement.tier,
                    budget=placement.memory_bytes,
                    devices=tuple(placement.devices),
                )
            else:
                if r.status.epoch != placement.epoch and not r.unloading:
                    r.status.epoch = placement.epoch
                    self._dirty.add(model)
                settled = r.status.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_OFFLOADED)
                want_tier = placement.tier or S.TIER_DEVICE
                if settled and r.busy is None and not r.unloading and r.asked_tier != want_tier:
                    r.asked_tier = want_tier
                    r.busy = asyncio.create_task(
                        self._change_tier(r, want_tier), name=f"tier {model}"
                    )
        for model, r in list(self.replicas.items()):
            wanted = model in current or model in stale or r.manual
            if not wanted and not r.unloading and r.busy is None:
                r.unloading = True
                r.busy = asyncio.create_task(self._unload(r), name=f"unload {model}")

    def _start_load(
        self,
        spec: cluster_pb2.ModelSpec,
        epoch: int,
        manual: bool,
        tier: int = 0,
        budget: int = 0,
        devices: tuple[str, ...] = (),
    ) -> Replica:
        status = S.ReplicaStatus(
            model=spec.name,
            node_id=self.config.node_id,
            address=self.address,
            state=S.REPLICA_STATE_LOADING,
            tier=S.TIER_DEVICE,
            epoch=epoch,
        )
        r = Replica(
            spec=spec,
            status=status,
            manual=manual,
            budget_bytes=budget,
            devices=devices,
            asked_tier=tier or S.TIER_DEVICE,
        )
        self.replicas[spec.name] = r
        r.busy = asyncio.create_task(self._load(r, tier or S.TIER_DEVICE), name=f"load {spec.name}")
        return r

    async def load_direct(self, spec: cluster_pb2.ModelSpec) -> Replica:
        """Operator's LoadModel: load now, pinned until UnloadModel."""
        r = self.replicas.get(spec.name)
        if r is None or r.status.state == S.REPLICA_STATE_FAILED:
            r = self._start_load(spec, epoch=0, manual=True)
        r.manual = True
        if r.busy is not None:
            await asyncio.shield(r.busy)
        return r

    async def unload_direct(self, model: str) -> bool:
        r = self.replicas.get(model)
        if r is None:
            return False
        r.manual = False
        if r.busy is not None:
            await asyncio.shield(r.busy)
        if not r.unloading and model in self.replicas:
            r.unloading = True
            r.busy = asyncio.create_task(self._unload(r))
            await asyncio.shield(r.busy)
        return True

    async def _load(self, r: Replica, tier: int) -> None:
        model = r.spec.name
        started = time.monotonic()
        try:
            async with self._load_lock:
                r.status.predicted_bytes = await asyncio.to_thread(
                    predict_weight_bytes, Path(r.spec.source), r.spec.engine_args.get("dtype")
                )
                await self._set(r, S.REPLICA_STATE_LOADING)
                with _tracer.start_as_current_span(
                    "model.load",
                    attributes={
                        "gen_ai.request.model": model,
                        "meshserve.node": self.config.node_id,
                    },
                ) as span:
                    report = await asyncio.to_thread(self.probe.read)
                    # The GPU the placement names, else the first one; host RAM without GPUs.
                    named = next((g for g in report.gpus if g.uuid in r.devices[:1]), None)
                    gpu = named or (report.gpus[0] if report.gpus else None)
                    config = replace(
                        self._engine_config,
                        device=f"cuda:{named.index}" if named else self._engine_config.device,
                        memory_budget_bytes=r.budget_bytes,
                        device_total_bytes=gpu.memory_total_bytes
                        if gpu
                        else report.host_total_bytes,
                    )
                    engine = await asyncio.to_thread(make_engine, r.spec, config)
                    r.engine = engine
                    await engine.load(r.spec)
                    r.status.memory_bytes = engine.memory_bytes()
                    r.status.tier_note = engine.tier_note
                    await self._set(r, S.REPLICA_STATE_WARMING)
                    await self._warm_up(r)
                    r.status.load_seconds = time.monotonic() - started
                    span.set_attribute("meshserve.load_seconds", r.status.load_seconds)
                    span.set_attribute("meshserve.memory_bytes", r.status.memory_bytes)
            metrics.LOAD_SECONDS.labels(model).observe(r.status.load_seconds)
            log.info(
                "%s READY in %.2f s (%d bytes)", model, r.status.load_seconds, r.status.memory_bytes
            )
            await self._set(r, S.REPLICA_STATE_READY)
            if tier != S.TIER_DEVICE:  # placed straight into a lower tier (prefetch)
                await self._change_tier(r, tier, own_task=False)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("loading %s failed", model)
            r.failed_at = time.monotonic()
            if r.engine is not None:
                with contextlib.suppress(Exception):
                    await r.engine.unload()
                r.engine = None
            r.status.error = f"{type(e).__name__}: {e}"[:2000]
            await self._set(r, S.REPLICA_STATE_FAILED)
        finally:
            r.busy = None
            self._wake.set()

    async def _warm_up(self, r: Replica) -> None:
        """Warm-up requests must pass before a replica is READY (after a load or a restore)."""
        assert r.engine is not None
        if r.spec.engine_args.get("task") == "embed":
            await r.engine.embed(r.spec.warmup_prompts or ["Hello"])
            return
        for prompt in r.spec.warmup_prompts or ["Hello"]:
            async for _chunk in r.engine.generate(prompt, [], WARMUP):
                pass

    async def _drain(self, r: Replica) -> None:
        """DRAINING: routers stop sending; wait (up to the grace period) for streams to end."""
        await self._set(r, S.REPLICA_STATE_DRAINING)
        deadline = time.monotonic() + self.config.drain_grace_s
        # Engines expose a count, not an event: poll it until the grace period ends.
        while r.engine is not None and r.engine.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _change_tier(self, r: Replica, tier: int, own_task: bool = True) -> None:
        """Offload to CPU RAM / disk, or restore to the device (then warm up before READY)."""
        model = r.spec.name
        started = time.monotonic()
        name = "model.restore" if tier == S.TIER_DEVICE else "model.offload"
        attributes = {
            "gen_ai.request.model": model,
            "meshserve.node": self.config.node_id,
            "meshserve.tier.from": S.Tier.Name(r.status.tier),
            "meshserve.tier.to": S.Tier.Name(tier),  # type: ignore[arg-type]
        }
        try:
            assert r.engine is not None
            with _tracer.start_as_current_span(name, attributes=attributes) as span:
                if tier == S.TIER_DEVICE:
                    await self._set(r, S.REPLICA_STATE_LOADING)
                    async with self._load_lock:  # one load or restore at a time per device
                        await r.engine.restore()
                    r.status.tier = S.TIER_DEVICE
                    r.status.memory_bytes = r.engine.memory_bytes()
                    await self._set(r, S.REPLICA_STATE_WARMING)
                    await self._warm_up(r)
                    state = S.REPLICA_STATE_READY
                else:
                    await self._drain(r)
                    await r.engine.offload(tier)
                    r.status.tier = r.engine.tier  # type: ignore[assignment]  # where it settled
                    r.status.tier_note = r.engine.tier_note
                    state = S.REPLICA_STATE_OFFLOADED
                r.status.transition_seconds = time.monotonic() - started
                span.set_attribute("meshserve.transition_seconds", r.status.transition_seconds)
            metrics.SWAP_SECONDS.labels(model, S.Tier.Name(tier)).observe(  # type: ignore[arg-type]
                r.status.transition_seconds
            )  # type: ignore[arg-type]
            log.info("%s → %s in %.3f s", model, S.Tier.Name(tier), r.status.transition_seconds)  # type: ignore[arg-type]
            await self._set(r, state)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("moving %s to %s failed", model, tier)
            r.failed_at = time.monotonic()
            r.status.error = f"tier change failed: {type(e).__name__}: {e}"[:2000]
            await self._set(r, S.REPLICA_STATE_FAILED)
        finally:
            if own_task:
                r.busy = None
                self._wake.set()

    async def _unload(self, r: Replica) -> None:
        model = r.spec.name
        try:
            await self._drain(r)
            if r.engine is not None:
                await r.engine.unload()
            log.info("%s unloaded", model)
        finally:
            if self.replicas.get(model) is r:
                del self.replicas[model]
            self._dirty.discard(model)
            with contextlib.suppress(Exception):
                await self.store.delete(self.keys.replica(model, self.config.node_id))
            r.busy = None
            await self.publish_node(force=True)

    # --- publishing --------------------------------------------------------------------------

    async def _set(self, r: Replica, state: int) -> None:
        r.status.state = state  # type: ignore[assignment]
        if state != S.REPLICA_STATE_FAILED:
            r.status.error = ""
        await self._publish(r)
        await self.publish_node(force=True)

    async def _publish(self, r: Replica) -> None:
        if self.replicas.get(r.spec.name) is not r:
            return
        try:
            await self.store.put(
                self.keys.replica(r.spec.name, self.config.node_id),
                r.status,
                lease=self.session.lease_id,
            )
            self._dirty.discard(r.spec.name)
        except Exception as e:
            log.info("publishing %s failed (%s); will retry", r.spec.name, type(e).__name__)
            self._dirty.add(r.spec.name)

    def node_status(self) -> cluster_pb2.NodeStatus:
        report = self.probe.read()
        engines = [r.engine for r in self.replicas.values() if r.engine is not None]
        return S.NodeStatus(
            node_id=self.config.node_id,
            address=self.address,
            gpus=report.gpus,
            host_memory_total_bytes=report.host_total_bytes,
            host_memory_available_bytes=report.host_available_bytes,
            labels=dict(self.config.labels),
            capacity_bytes=capacity_bytes(report, self.config.memory_limit_bytes),
            used_bytes=sum(e.memory_bytes() for e in engines),
            host_capacity_bytes=self.config.host_memory_limit_bytes or report.host_total_bytes // 2,
            host_used_bytes=sum(e.host_bytes() for e in engines),
            disk_used_bytes=sum(e.disk_bytes() for e in engines),
            draining=self.draining,
            device_kind=report.kind,
        )

    def _changed(self, new: cluster_pb2.NodeStatus) -> bool:
        """Hysteresis: memory and utilization jitter alone does not rewrite the key."""
        old = self._last_node
        if old is None:
            return True
        stable = (
            "address",
            "capacity_bytes",
            "used_bytes",
            "draining",
            "device_kind",
            "host_capacity_bytes",
            "host_used_bytes",
            "disk_used_bytes",
        )
        if any(getattr(old, f) != getattr(new, f) for f in stable) or dict(old.labels) != dict(
            new.labels
        ):
            return True
        if len(old.gpus) != len(new.gpus):
            return True
        for a, b in zip(old.gpus, new.gpus, strict=True):
            if abs(int(a.memory_used_bytes) - int(b.memory_used_bytes)) > 0.05 * max(
                1, b.memory_total_bytes
            ):
                return True
            if abs(a.utilization - b.utilization) > 0.10 or a.name != b.name:
                return True
        return False

    async def publish_node(self, force: bool = False) -> None:
        status = self.node_status()
        for g in status.gpus:
            metrics.GPU_MEMORY_USED.labels(g.uuid or str(g.index)).set(g.memory_used_bytes)
            metrics.GPU_UTILIZATION.labels(g.uuid or str(g.index)).set(g.utilization)
        due = time.monotonic() - self._last_node_at > NODE_REFRESH_S
        if not (force or due or self._changed(status)):
            return
        try:
            await self.store.put(
                self.keys.node(self.config.node_id), status, lease=self.session.lease_id
            )
            self._last_node, self._last_node_at = status, time.monotonic()
        except Exception as e:
            log.info("publishing node status failed (%s); will retry", type(e).__name__)

    async def _node_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            tick += 1
            if tick % round(NODE_INTERVAL_S / STATS_INTERVAL_S) == 0:
                await self.publish_node()
            await self._publish_stats()

    async def _publish_stats(self) -> None:
        """Engine load into ReplicaStatus, at most every STATS_INTERVAL_S and only when it moved:
        at most one write/s per replica, so etcd sees O(replicas) small writes, not one per
        request."""
        for r in list(self.replicas.values()):
            if r.engine is None or not r.ready:
                continue
            st = r.engine.stats()
            s = r.status
            moved = (st.running, st.waiting) != (s.running, s.waiting)
            if moved or abs(st.kv_cache_usage - s.kv_cache_usage) > 0.1:
                s.running, s.waiting, s.kv_cache_usage = st.running, st.waiting, st.kv_cache_usage
                await self._publish(r)

    async def _republish(self, _lease: int) -> None:
        """After a lost lease: our keys are gone; write them again under the new lease."""
        log.warning("lease replaced; re-registering node and replicas")
        await self.publish_node(force=True)
        for r in list(self.replicas.values()):
            await self._publish(r)
