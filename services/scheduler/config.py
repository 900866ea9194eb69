"""The scheduler's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from meshserve.cluster.keys import DEFAULT_PREFIX, check_name
from meshserve.scheduler.profile import Profile


def _default_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class SchedulerConfig:
    scheduler_id: str = field(default_factory=_default_id)
    listen: str = "127.0.0.1:0"
    advertise_host: str = ""
    etcd: str = "127.0.0.1:2379"
    prefix: str = DEFAULT_PREFIX
    lease_ttl_s: int = 5  # a dead leader is replaced within about this long
    resync_s: float = 5.0  # full round at least this often (idle timeouts, missed events)
    debounce_s: float = 0.05  # gather a burst of watch events into one round
    metrics_port: int = 0
    ready_file: str = ""
    profile: Profile = field(default_factory=Profile)  # plugins, weights, strategy, eviction

    def __post_init__(self) -> None:
        check_name("scheduler", self.scheduler_id)
        if self.lease_ttl_s < 2:
            raise ValueError("lease_ttl_s must be >= 2 (etcd's minimum)")
        if self.resync_s <= 0 or self.debounce_s < 0:
            raise ValueError("resync_s must be > 0 and debounce_s >= 0")

    def advertise(self, port: int) -> str:
        host = self.advertise_host or self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        return f"{host}:{port}"
