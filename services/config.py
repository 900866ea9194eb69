"""The configuration block every service embeds: where it listens, where etcd is, its lease, its
metrics port and its ready file. Light on imports, so the CLI can read its defaults cheaply."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from meshserve.cluster.keys import DEFAULT_PREFIX


def process_id() -> str:
    """A default id for processes of which a host may run several (routers, schedulers)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServiceConfig:
    """The block every service's config embeds (flags and ``MESHSERVE_*`` variables alike)."""

    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    advertise_host: str = ""  # host other processes dial; defaults to the listen host
    etcd: str = "127.0.0.1:2379"  # host:port
    prefix: str = DEFAULT_PREFIX  # etcd key prefix
    lease_ttl_s: int = 5  # liveness: this process's keys vanish this long after it dies
    metrics_port: int = 0  # Prometheus; 0 = off
    ready_file: str = ""  # written with {"address": …} once serving
    # SO_REUSEPORT: several processes share ``listen`` (router workers). Off, a port in use is an
    # error at start-up instead of two servers silently splitting its connections.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        for name in ("listen", "etcd"):
            host, _, port = getattr(self, name).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{name} must be host:port, got {getattr(self, name)!r}")
        if self.lease_ttl_s < 2:
            raise ValueError("lease_ttl_s must be >= 2 (etcd's minimum)")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")

    def advertise(self, port: int) -> str:
        """``host:port`` others dial for a server bound to ``port``."""
        host = self.advertise_host or self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        return f"{host}:{port}"
