"""The node agent's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from meshserve.cluster.keys import check_name
from meshserve.config import ServiceConfig

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class AgentConfig:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    node_id: str = field(default_factory=socket.gethostname)
    device: str = "auto"  # auto | cpu | cuda
    memory_limit_bytes: int = 0  # cap on memory offered to models; 0 = the device's
    host_memory_limit_bytes: int = 0  # CPU RAM offered to offloaded models; 0 = half the host's
    cache_dir: str = ""  # TIER_DISK copies; "" = ~/.cache/meshserve/<node_id>
    # The artifact cache (registry sources: <cache_dir>/artifacts) holds at most this many
    # bytes; 0 = half the size of the filesystem it is on.
    artifact_cache_bytes: int = 0
    threads: int = 2  # torch intra-op threads
    max_in_flight: int = 64  # streams per model before RESOURCE_EXHAUSTED
    # How long a drain (an unload, a tier change, the agent's shutdown) lets in-flight streams
    # run before it ends them; a router continues an ended stream on another replica.
    drain_grace_s: float = 10.0
    load_retry_s: float = 30.0  # wait before reloading a model that FAILED
    labels: tuple[tuple[str, str], ...] = ()
    # Decode tokens/s one device generates at full load, as configured; published until the
    # agent measures it (throughput.py); 0 = unknown (the scheduler does not limit by compute).
    decode_tokens_per_s: float = 0.0

    def __post_init__(self) -> None:
        check_name("node", self.node_id)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.artifact_cache_bytes < 0:
            raise ValueError("artifact_cache_bytes must be >= 0")
        if self.memory_limit_bytes < 0 or self.host_memory_limit_bytes < 0:
            raise ValueError("memory_limit_bytes and host_memory_limit_bytes must be >= 0")
        if self.threads < 1 or self.max_in_flight < 1:
            raise ValueError("threads and max_in_flight must be >= 1")
        if not self.drain_grace_s >= 0:
            raise ValueError("drain_grace_s must be >= 0")
        if not self.load_retry_s >= 0:
            raise ValueError("load_retry_s must be >= 0")
        if not self.decode_tokens_per_s >= 0:  # NaN fails too
            raise ValueError("decode_tokens_per_s must be >= 0")

    @property
    def tier_cache_dir(self) -> str:
        return self.cache_dir or os.path.expanduser(f"~/.cache/meshserve/{self.node_id}")
