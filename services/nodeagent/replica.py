"""A model held on this node: its spec, the status it publishes, its engine, and what is being
done to it. Mutated only by the lifecycle (lifecycle.py) and the reconciler."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from meshserve.nodeagent.adapters import Adapters
from meshserve.nodeagent.engines.base import Engine
from meshserve.nodeagent.kvevents import KvBlocks
from meshserve.nodeagent.plan import Held
from meshserve.nodeagent.share import DeviceShare
from meshserve.v1 import cluster_pb2
from meshserve.weights import DISK_BYTES_PER_S, HOST_BYTES_PER_S

S = cluster_pb2


@dataclass
class Replica:
    spec: cluster_pb2.ModelSpec
    status: cluster_pb2.ReplicaStatus  # what replicas/<model>/<node> says
    engine: Engine | None = None
    manual: bool = False  # loaded by an operator's LoadModel: placements do not unload it
    failed_at: float = 0.0  # monotonic s of the last failure
    busy: asyncio.Task[None] | None = None  # load, tier change or unload in progress
    generated_tokens: int = 0
    unloading: bool = False
    budget_bytes: int = 0  # memory the placement granted (0: an operator's LoadModel)
    devices: tuple[str, ...] = ()  # GPU uuids the placement names (the first is used)
    # The tier last asked of the engine. An engine may settle elsewhere (vLLM's CPU build cannot
    # keep weights in CPU RAM): status.tier says where it is, this keeps us from asking again.
    asked_tier: int = S.TIER_DEVICE
    share: DeviceShare = field(init=False)  # its streams' GPU-seconds (usage)
    kv: KvBlocks | None = None  # its engine's KV blocks, for routers (engines that report them)
    restores: dict[int, float] = field(default_factory=dict)  # tier → its last restore's seconds
    adapters: Adapters | None = None  # its LoRA adapters, while serving (spec.max_adapters > 0)

    def __post_init__(self) -> None:
        self.share = DeviceShare(self.spec.gpus_per_replica)

    @property
    def ready(self) -> bool:
        return self.status.state == S.REPLICA_STATE_READY and self.engine is not None

    def restore_estimate(self) -> float:
        """Seconds to bring it back to the device from where it waits: its last restore from
        that tier (with warm-up), else its memory over the tier's seed bandwidth."""
        tier = self.status.tier
        if tier in self.restores:
            return self.restores[tier]
        rate = HOST_BYTES_PER_S if tier == S.TIER_HOST else DISK_BYTES_PER_S
        return self.status.memory_bytes / rate

    def held(self) -> Held:
        """What the planner needs to know of it."""
        return Held(
            state=self.status.state,
            epoch=self.status.epoch,
            asked_tier=self.asked_tier,
            busy=self.busy is not None,
            unloading=self.unloading,
            manual=self.manual,
            failed_at=self.failed_at,
        )
