"""What this node says about itself in etcd, under the agent's lease: ``nodes/<node>`` (with
hysteresis: memory and utilization jitter alone does not rewrite it) and
``replicas/<model>/<node>`` (on every state change, and engine load at most once a second when it
moves). A failed write is retried on the next pass; a new lease gets every key written again."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Mapping

from meshserve.artifacts.cache import NodeCache
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import DeviceProbe, capacity_bytes
from meshserve.nodeagent.engines.base import Engine
from meshserve.nodeagent.replica import Replica
from meshserve.nodeagent.throughput import Sample, Throughput, moved
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2

log = logging.getLogger("meshserve.nodeagent.reconcile")
S = cluster_pb2
STATS_INTERVAL_S = 1.0  # engine stats → ReplicaStatus (only when they moved)
NODE_INTERVAL_S = 2.0  # node status refresh check
NODE_REFRESH_S = 10.0  # publish nodes/<node> at least this often
STABLE_FIELDS = (
    "address",
    "capacity_bytes",
    "used_bytes",
    "draining",
    "device_kind",
    "host_capacity_bytes",
    "host_used_bytes",
    "disk_used_bytes",
    "cached_revisions",  # a model's bytes arrived (or left): locality changes at once
)


def node_changed(old: cluster_pb2.NodeStatus | None, new: cluster_pb2.NodeStatus) -> bool:
    """Hysteresis: a write is due when anything but GPU memory/utilization changed, or those
    moved by more than 5 % of the GPU's memory / 10 points of utilization."""
    if old is None:
        return True
    if any(getattr(old, f) != getattr(new, f) for f in STABLE_FIELDS):
        return True
    if dict(old.labels) != dict(new.labels) or len(old.gpus) != len(new.gpus):
        return True
    for a, b in zip(old.gpus, new.gpus, strict=True):
        if abs(int(a.memory_used_bytes) - int(b.memory_used_bytes)) > 0.05 * max(
            1, b.memory_total_bytes
        ):
            return True
        if abs(a.utilization - b.utilization) > 0.10 or a.name != b.name:
            return True
        if a.health != b.health or list(a.health_reasons) != list(b.health_reasons):
            return True  # a device turned sick (or well): schedulers must know at once
    if [t.device_id for t in old.throughput] != [t.device_id for t in new.throughput]:
        return True
    return any(
        moved(a.decode_tokens_per_s, b.decode_tokens_per_s)
        or moved(a.capacity_tokens_per_s, b.capacity_tokens_per_s)
        or a.measured != b.measured
        for a, b in zip(old.throughput, new.throughput, strict=True)
    )


class StatusPublisher:
    def __init__(
        self,
        config: AgentConfig,
        store: Store,
        session: Session,
        probe: DeviceProbe,
        replicas: Mapping[str, Replica],
    ) -> None:
        self.config = config
        self.store = store
        self.keys = store.keys
        self.session = session
        self.probe = probe
        self.replicas = replicas  # the reconciler's; read only here
        self.address = ""  # host:port others dial; set once the server is bound
        self.draining = False
        self._dirty: set[str] = set()  # replicas whose last publish failed
        self._last_node: cluster_pb2.NodeStatus | None = None
        self._last_node_at = 0.0
        self.throughput = Throughput(config.decode_tokens_per_s)
        # engine → its preemptions already counted (gone with the engine)
        self._preempted: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
        self.artifacts: NodeCache | None = None  # the node's registry cache (published)

    # --- replicas ----------------------------------------------------------------------------

    async def set_state(self, r: Replica, state: int) -> None:
        r.status.state = state  # type: ignore[assignment]
        if state != S.REPLICA_STATE_FAILED:
            r.status.error = ""
        await self.publish(r)
        await self.publish_node(force=True)

    async def publish(self, r: Replica) -> None:
        if self.replicas.get(r.spec.name) is not r:
            return  # replaced or unloaded meanwhile
        r.status.incarnation = self.session.lease_id  # a restarted agent is a new incarnation
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

    def mark_dirty(self, model: str) -> None:
        """The replica's status changed outside a state change: write it on the next pass."""
        self._dirty.add(model)

    async def retry_dirty(self) -> None:
        for model in list(self._dirty):
            if (r := self.replicas.get(model)) is not None:
                await self.publish(r)
            else:
                self._dirty.discard(model)

    async def withdraw(self, model: str) -> None:
        """The replica is gone: delete its key (best effort; the lease ends it otherwise)."""
        self._dirty.discard(model)
        try:
            await self.store.delete(self.keys.replica(model, self.config.node_id))
        except Exception as e:
            log.info("deleting %s's key failed (%s)", model, type(e).__name__)
        await self.publish_node(force=True)

    # --- the node ----------------------------------------------------------------------------

    def node_status(self) -> cluster_pb2.NodeStatus:
        report = self.probe.read()
        engines = [r.engine for r in self.replicas.values() if r.engine is not None]
        cache = self.artifacts
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
            cached_revisions=cache.revisions() if cache else (),
            cache_used_bytes=cache.used_bytes() if cache else 0,
            cache_capacity_bytes=cache.capacity_bytes if cache else 0,
            registry_bytes_per_s=cache.bytes_per_s if cache else 0.0,
            throughput=[
                S.DeviceThroughput(
                    device_id=t.device_id,
                    decode_tokens_per_s=round(t.tokens_per_s, 1),
                    capacity_tokens_per_s=round(t.capacity_tokens_per_s, 1),
                    measured=t.measured,
                )
                for t in self.throughput.devices()
            ],
        )

    async def publish_node(self, force: bool = False) -> None:
        status = self.node_status()
        for g in status.gpus:
            metrics.GPU_MEMORY_USED.labels(g.uuid or str(g.index)).set(g.memory_used_bytes)
            metrics.GPU_MEMORY_TOTAL.labels(g.uuid or str(g.index)).set(g.memory_total_bytes)
            metrics.GPU_UTILIZATION.labels(g.uuid or str(g.index)).set(g.utilization)
            metrics.GPU_HEALTH.labels(g.uuid or str(g.index)).set(g.health)
        for t in status.throughput:
            metrics.DECODE_RATE.labels(t.device_id).set(t.decode_tokens_per_s)
            metrics.DECODE_CAPACITY.labels(t.device_id).set(t.capacity_tokens_per_s)
        due = time.monotonic() - self._last_node_at > NODE_REFRESH_S
        if not (force or due or node_changed(self._last_node, status)):
            return
        try:
            await self.store.put(
                self.keys.node(self.config.node_id), status, lease=self.session.lease_id
            )
            self._last_node, self._last_node_at = status, time.monotonic()
        except Exception as e:
            log.info("publishing node status failed (%s); will retry", type(e).__name__)

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Engine stats every STATS_INTERVAL_S, the node every NODE_INTERVAL_S (if changed)."""
        tick = 0
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            tick += 1
            await self.publish_stats()  # replicas first: a node's capacity never precedes them
            if tick % round(NODE_INTERVAL_S / STATS_INTERVAL_S) == 0:
                await self.publish_node()

    async def publish_stats(self) -> None:
        """Engine load into ReplicaStatus, at most every STATS_INTERVAL_S and only when it moved:
        at most one write/s per replica, so etcd sees O(replicas) small writes, not one per
        request. The decode rate is measured on the way (throughput.py)."""
        serving = [
            (r, r.engine.stats())
            for r in list(self.replicas.values())
            if r.engine is not None and r.ready
        ]
        samples = [
            Sample(r.spec.name, r.devices, st.generated_tokens, st.waiting > 0) for r, st in serving
        ]
        self.throughput.observe(time.monotonic(), samples)
        for r, st in serving:
            assert r.engine is not None
            seen = self._preempted.get(r.engine, 0)
            if st.preempted > seen:
                metrics.PREEMPTIONS.labels(r.spec.name).inc(st.preempted - seen)
            self._preempted[r.engine] = st.preempted
            s = r.status
            rate = round(self.throughput.replica_rate(r.spec.name), 1)
            busy = (st.running, st.waiting) != (s.running, s.waiting)
            grew = r.engine.memory_bytes() > s.memory_bytes  # e.g. after a device OOM
            faster = moved(s.decode_tokens_per_s, rate)
            if busy or grew or faster or abs(st.kv_cache_usage - s.kv_cache_usage) > 0.1:
                s.running, s.waiting, s.kv_cache_usage = st.running, st.waiting, st.kv_cache_usage
                s.decode_tokens_per_s = rate
                s.memory_bytes = max(s.memory_bytes, r.engine.memory_bytes())
                await self.publish(r)
                if grew:
                    await self.publish_node(force=True)

    async def republish(self, _lease: int) -> None:
        """After a lost lease: our keys are gone; write them again under the new lease."""
        log.warning("lease replaced; re-registering node and replicas")
        await self.publish_node(force=True)
        for r in list(self.replicas.values()):
            await self.publish(r)
