"""A replica's life through its Engine: load → warm-up → READY; tier changes (drain, then offload;
or restore, then warm-up → READY); drain → unload. Each step publishes the replica's new state.

Loads and restores are serialized per node, so a device's memory is measured by one load at a
time. Every step runs as the replica's one `busy` task; when it ends, the reconciler is woken to
plan again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, MutableMapping
from dataclasses import replace
from pathlib import Path

from meshserve.artifacts.cache import ArtifactError, node_cache
from meshserve.artifacts.s3 import Location, is_registry
from meshserve.nodeagent.adapters import adapters_for, pinned_revisions
from meshserve.nodeagent.binding import bind
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import DeviceProbe
from meshserve.nodeagent.engines import make_engine
from meshserve.nodeagent.engines.base import Engine, EngineConfig, TensorModel
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.kvevents import KvBlocks
from meshserve.nodeagent.plan import Load
from meshserve.nodeagent.publisher import StatusPublisher
from meshserve.nodeagent.replica import Replica
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import exemplar, links_to, traceparent, tracer
from meshserve.v1 import cluster_pb2
from meshserve.weights import predict_weight_bytes

log = logging.getLogger("meshserve.nodeagent.reconcile")
_tracer = tracer("meshserve.nodeagent.reconcile")
S = cluster_pb2
WARMUP = GenerationParams(4, 0.0, 1.0, 0, None, (), True)
STEP_CANCEL_S = 4.0  # a cancelled step's cleanup at stop (a vLLM build: 3 s); in the 5 s budget


class Lifecycle:
    def __init__(
        self,
        config: AgentConfig,
        probe: DeviceProbe,
        publisher: StatusPublisher,
        replicas: MutableMapping[str, Replica],
        on_settled: Callable[[], None],
    ) -> None:
        self.config = config
        self.probe = probe
        self.publisher = publisher
        self.replicas = replicas  # the reconciler's; a load adds, an unload removes
        self.on_settled = on_settled  # called when a step ends: plan again
        self._load_lock = asyncio.Lock()
        self._generation = itertools.count(1)  # loads by this process (ReplicaStatus.generation)
        self._engine_config = EngineConfig(
            device="cuda:0" if probe.kind == "cuda" else "cpu",
            threads=config.threads,
            cache_dir=config.tier_cache_dir,
        )
        self.artifacts = node_cache(config, lambda: pinned_revisions(replicas.values()))

    # --- starting steps (never wait for them) ------------------------------------------------

    def start_load(self, load: Load, manual: bool = False) -> Replica:
        spec = load.spec
        status = S.ReplicaStatus(
            model=spec.name,
            node_id=self.config.node_id,
            address=self.publisher.address,
            state=S.REPLICA_STATE_LOADING,
            tier=S.TIER_DEVICE,
            epoch=load.epoch,
            max_streams=self.config.max_in_flight,
            placed_trace=load.trace_parent,
            placed_reason=load.reason,
            generation=next(self._generation),
        )
        tier = load.tier or S.TIER_DEVICE
        r = Replica(
            spec=spec,
            status=status,
            manual=manual,
            budget_bytes=load.budget_bytes,
            devices=load.devices,
            asked_tier=tier,
        )
        self.replicas[spec.name] = r
        r.busy = asyncio.create_task(self._load(r, tier), name=f"load {spec.name}")
        return r

    def start_tier_change(
        self, r: Replica, tier: int, trace_parent: str = "", reason: str = ""
    ) -> None:
        r.status.placed_trace = trace_parent or r.status.placed_trace
        r.status.placed_reason = reason or r.status.placed_reason
        r.asked_tier = tier
        r.busy = asyncio.create_task(self._change_tier(r, tier), name=f"tier {r.spec.name}")

    def start_unload(self, r: Replica) -> None:
        r.unloading = True
        r.busy = asyncio.create_task(self._unload(r), name=f"unload {r.spec.name}")

    def start_failure(self, r: Replica, why: str, dead: bool = False) -> None:
        """Gives the replica up here (FAILED, engine unloaded): the scheduler places the model
        elsewhere (its `failed_here` filter), or this agent reloads it after `load_retry_s`.
        A replica that still serves (repeated OOMs) drains first; a ``dead`` engine serves
        nothing more, so FAILED is published at once (routers continue its streams elsewhere)
        and then the engine is cleaned up."""
        r.busy = asyncio.create_task(self._fail(r, why, dead), name=f"fail {r.spec.name}")

    async def _fail(self, r: Replica, why: str, dead: bool) -> None:
        try:
            log.warning("%s: %s; giving the replica up here", r.spec.name, why)
            if dead:
                await self._set_failed(r, why, "engine_died")
                for uuid in r.devices:  # an engine that died counts against its device
                    self.probe.engine_died(uuid)
            else:
                await self._drain(r)
            if r.engine is not None:
                with contextlib.suppress(Exception):
                    await r.engine.unload()  # fails what it still holds, frees its memory
                r.engine = None
                r.adapters = None
            self._close_blocks(r)
            if not dead:
                await self._set_failed(r, why, "given_up")
        finally:
            r.busy = None
            self.on_settled()

    async def _set_failed(self, r: Replica, why: str, reason: str) -> None:
        r.failed_at = time.monotonic()
        r.status.error = why
        metrics.REPLICA_FAILURES.labels(r.spec.name, reason).inc()
        await self.publisher.set_state(r, S.REPLICA_STATE_FAILED)

    async def stop(self) -> None:
        """Cancels steps under way and unloads every engine (the agent is shutting down). A
        cancelled step cleans up first (a vLLM build kills the engine core it was starting),
        within `STEP_CANCEL_S`, so no unload runs under it."""
        steps = [r.busy for r in self.replicas.values() if r.busy is not None]
        for step in steps:
            step.cancel()
        if steps:
            await asyncio.wait(steps, timeout=STEP_CANCEL_S)
        for r in list(self.replicas.values()):
            if r.engine is not None:
                with contextlib.suppress(Exception):
                    await r.engine.unload()

    # --- the steps ---------------------------------------------------------------------------

    async def _load(self, r: Replica, tier: int) -> None:
        model = r.spec.name
        started = time.monotonic()
        try:
            spec = await self._artifacts(r) if is_registry(r.spec.source) else r.spec
            async with self._load_lock:
                r.status.predicted_bytes = await asyncio.to_thread(
                    predict_weight_bytes, Path(spec.source), spec.engine_args.get("dtype")
                )
                await self.publisher.set_state(r, S.REPLICA_STATE_LOADING)
                with _tracer.start_as_current_span(
                    "model.load",
                    attributes={
                        "gen_ai.request.model": model,
                        "meshserve.node": self.config.node_id,
                        "meshserve.tier.from": "source",
                    },
                    links=links_to(r.status.placed_trace),  # the round that placed it
                ) as span:
                    r.status.load_trace = traceparent(span)  # published with LOADING
                    r.status.loaded_from = "source"
                    config = await self._engine_config_for(r)
                    engine = await asyncio.to_thread(make_engine, spec, config)
                    r.engine = engine
                    await engine.load(spec)
                    self._report_blocks(r, engine)
                    r.adapters = adapters_for(r, engine, self.artifacts, self.publisher.mark_dirty)
                    r.status.memory_bytes = engine.memory_bytes()
                    r.status.tier_note = engine.tier_note
                    if isinstance(engine, TensorModel):  # what KServe's ModelMetadata shows
                        r.status.signature.CopyFrom(engine.signature())
                    await self.publisher.set_state(r, S.REPLICA_STATE_WARMING)
                    await self._warm_up(r)
                    r.status.load_seconds = time.monotonic() - started
                    span.set_attribute("meshserve.load_seconds", r.status.load_seconds)
                    span.set_attribute("meshserve.memory_bytes", r.status.memory_bytes)
                    metrics.LOAD_SECONDS.labels(model).observe(r.status.load_seconds, exemplar())
            log.info(
                "%s READY in %.2f s (%d bytes)", model, r.status.load_seconds, r.status.memory_bytes
            )
            await self.publisher.set_state(r, S.REPLICA_STATE_READY)
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
                r.adapters = None
            self._close_blocks(r)
            r.status.error = f"{type(e).__name__}: {e}"[:2000]
            await self.publisher.set_state(r, S.REPLICA_STATE_FAILED)
        finally:
            r.busy = None
            self.on_settled()

    @staticmethod
    def _close_blocks(r: Replica) -> None:
        """The replica's engine is gone: so are its blocks, and every watch of them ends."""
        if r.kv is not None:
            r.kv.close()
            r.kv = None

    @staticmethod
    def _report_blocks(r: Replica, engine: Engine) -> None:
        """An engine with a prefix cache says its block size; one that reports its blocks
        sends them to the replica's tracker, which routers watch (WatchKvBlocks)."""
        r.status.kv_block_tokens = engine.kv_block_tokens
        Lifecycle._close_blocks(r)
        r.status.kv_events = bool(engine.kv_reports and engine.kv_block_tokens)
        if r.status.kv_events:
            r.kv = KvBlocks(r.status.generation)
            engine.kv_sink = r.kv.publish

    async def _engine_config_for(self, r: Replica) -> EngineConfig:
        """The devices the placement names, by uuid (binding.py); raises UnknownDevice for one
        this node does not have. Without GPUs (or with --device cpu): the CPU."""
        report = await asyncio.to_thread(self.probe.read)
        gpus = report.gpus if self.probe.kind == "cuda" else ()
        b = bind(gpus, report.host_total_bytes, r.devices if gpus else ())
        names = {g.uuid: g.name for g in gpus}
        r.status.device_kind = (
            names.get(b.visible_devices[0], "gpu") if b.visible_devices else "cpu"
        )
        return replace(
            self._engine_config,
            device=b.torch_device,
            visible_devices=b.visible_devices,
            memory_budget_bytes=r.budget_bytes,
            device_total_bytes=b.memory_total_bytes,
        )

    async def _artifacts(self, r: Replica) -> cluster_pb2.ModelSpec:
        """A registry model's files in the node cache (fetched as needed, progress published):
        its spec with ``source`` that directory, for the engine."""
        with _tracer.start_as_current_span(
            "model.fetch", attributes={"gen_ai.request.model": r.spec.name}
        ) as span:
            loc = Location.parse(r.spec.source, r.spec.source_endpoint, r.spec.source_region)
            if not r.spec.revision:
                raise ArtifactError(
                    f"{loc.url}: no revision pinned (`meshserve model apply` records it)"
                )

            def progress(held: int, total: int) -> None:
                r.status.download_bytes, r.status.download_total_bytes = held, total
                self.publisher.mark_dirty(r.spec.name)

            local = await self.artifacts.materialize(loc, r.spec.revision, progress)
            span.set_attribute("meshserve.download_bytes", r.status.download_total_bytes)
        spec = cluster_pb2.ModelSpec()
        spec.CopyFrom(r.spec)
        spec.source = str(local)
        return spec

    async def _warm_up(self, r: Replica) -> None:
        """Warm-up requests must pass before a replica is READY (after a load or a restore)."""
        assert r.engine is not None
        if isinstance(r.engine, TensorModel):
            await r.engine.warm_up()
            return
        if r.spec.engine_args.get("task") == "embed":
            await r.engine.embed(r.spec.warmup_prompts or ["Hello"])
            return
        for prompt in r.spec.warmup_prompts or ["Hello"]:
            async for _chunk in r.engine.generate(prompt, [], WARMUP):
                pass

    async def _drain(self, r: Replica) -> None:
        """DRAINING: routers stop sending; wait (up to the grace period) for streams to end."""
        await self.publisher.set_state(r, S.REPLICA_STATE_DRAINING)
        deadline = time.monotonic() + self.config.drain_grace_s
        # Engines expose a count, not an event: poll it until the grace period ends.
        while r.engine is not None and r.engine.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _change_tier(self, r: Replica, tier: int, own_task: bool = True) -> None:
        """Offload to CPU RAM / disk, or restore to the device (then warm up before READY)."""
        model = r.spec.name
        started = time.monotonic()
        name = "model.restore" if tier == S.TIER_DEVICE else "model.offload"
        tier_name = S.Tier.Name(tier)  # type: ignore[arg-type]
        attributes = {
            "gen_ai.request.model": model,
            "meshserve.node": self.config.node_id,
            "meshserve.tier.from": S.Tier.Name(r.status.tier),
            "meshserve.tier.to": tier_name,
        }
        try:
            assert r.engine is not None
            # The round that moved it; a restore also links the offload (eviction) it undoes.
            parents = [r.status.placed_trace]
            if tier == S.TIER_DEVICE:
                parents.append(r.status.offload_trace)
            with _tracer.start_as_current_span(
                name, attributes=attributes, links=links_to(*parents)
            ) as span:
                if tier == S.TIER_DEVICE:
                    r.status.load_trace = traceparent(span)  # a cold start from a lower tier
                    r.status.loaded_from = S.Tier.Name(r.status.tier)
                    await self.publisher.set_state(r, S.REPLICA_STATE_LOADING)
                    async with self._load_lock:  # one load or restore at a time per device
                        await r.engine.restore()
                    r.status.tier = S.TIER_DEVICE
                    r.status.memory_bytes = r.engine.memory_bytes()
                    await self.publisher.set_state(r, S.REPLICA_STATE_WARMING)
                    await self._warm_up(r)
                    if r.adapters is not None:
                        r.adapters.reopen()
                    state = S.REPLICA_STATE_READY
                else:
                    r.status.offload_trace = traceparent(span)
                    if r.adapters is not None:  # loaded again on demand after the restore
                        r.adapters.close("is changing tier")
                    await self._drain(r)
                    if r.adapters is not None:
                        await r.adapters.clear()
                    await r.engine.offload(tier)
                    r.status.tier = r.engine.tier  # type: ignore[assignment]  # where it settled
                    r.status.tier_note = r.engine.tier_note
                    state = S.REPLICA_STATE_OFFLOADED
                r.status.transition_seconds = time.monotonic() - started
                if tier == S.TIER_DEVICE:
                    r.restores[S.Tier.Value(r.status.loaded_from)] = r.status.transition_seconds
                    r.status.restore_seconds = 0.0
                else:
                    r.status.restore_seconds = r.restore_estimate()
                span.set_attribute("meshserve.transition_seconds", r.status.transition_seconds)
                metrics.SWAP_SECONDS.labels(model, tier_name).observe(
                    r.status.transition_seconds, exemplar()
                )
            log.info("%s → %s in %.3f s", model, tier_name, r.status.transition_seconds)
            await self.publisher.set_state(r, state)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("moving %s to %s failed", model, tier)
            if r.engine is not None:  # half moved (e.g. a full disk): unload it cleanly
                with contextlib.suppress(Exception):
                    await r.engine.unload()
                r.engine = None
                r.adapters = None
            self._close_blocks(r)
            r.failed_at = time.monotonic()
            r.status.error = f"tier change failed: {type(e).__name__}: {e}"[:2000]
            r.status.tier = 0  # type: ignore[assignment]  # nothing held here any more
            await self.publisher.set_state(r, S.REPLICA_STATE_FAILED)
        finally:
            if own_task:
                r.busy = None
                self.on_settled()

    async def _unload(self, r: Replica) -> None:
        model = r.spec.name
        try:
            await self._drain(r)
            if r.engine is not None:
                await r.engine.unload()
            log.info("%s unloaded", model)
        finally:
            self._close_blocks(r)
            if self.replicas.get(model) is r:
                del self.replicas[model]
            r.busy = None
            await self.publisher.withdraw(model)
