"""The node agent's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from meshserve.cluster.keys import DEFAULT_PREFIX, check_name


@dataclass(frozen=True)
class AgentConfig:
    node_id: str = field(default_factory=socket.gethostname)
    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    advertise_host: str = ""  # host other processes dial; defaults to the listen host
    etcd: str = "127.0.0.1:2379"
    prefix: str = DEFAULT_PREFIX
    device: str = "auto"  # auto | cpu | cuda
    memory_limit_bytes: int = 0  # cap on memory offered to models; 0 = the device's
    host_memory_limit_bytes: int = 0  # CPU RAM offered to offloaded models; 0 = half the host's
    cache_dir: str = ""  # TIER_DISK copies; "" = ~/.cache/meshserve/<node_id>
    lease_ttl_s: int = 5
    threads: int = 2  # torch intra-op threads
    max_in_flight: int = 64  # streams per model before RESOURCE_EXHAUSTED
    drain_grace_s: float = 10.0  # how long an unload waits for in-flight streams
    load_retry_s: float = 30.0  # wait before reloading a model that FAILED
    labels: tuple[tuple[str, str], ...] = ()
    metrics_port: int = 0
    ready_file: str = ""  # written with {"address": …} once serving

    def __post_init__(self) -> None:
        check_name("node", self.node_id)
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen must be host:port, got {self.listen!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.memory_limit_bytes < 0:
            raise ValueError("memory_limit_bytes must be >= 0")
        if self.lease_ttl_s < 2:
            raise ValueError("lease_ttl_s must be >= 2 (etcd's minimum)")
        if self.threads < 1 or self.max_in_flight < 1:
            raise ValueError("threads and max_in_flight must be >= 1")

    @property
    def tier_cache_dir(self) -> str:
        return self.cache_dir or os.path.expanduser(f"~/.cache/meshserve/{self.node_id}")

    def advertise(self, port: int) -> str:
        host = self.advertise_host or self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        return f"{host}:{port}"
