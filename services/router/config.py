"""The router's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.cluster.keys import check_name
from meshserve.config import ServiceConfig, process_id

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class RouterConfig:
    service: ServiceConfig = field(default_factory=lambda: ServiceConfig(listen=DEFAULT_LISTEN))
    router_id: str = field(default_factory=process_id)
    max_attempts: int = 3  # replicas tried before the first token
    queue_per_model: int = 256  # requests held per model while it cold-starts
    queue_timeout_s: float = (
        120.0  # longest a request waits for a replica (its deadline may cut it)
    )
    ensure_interval_s: float = 2.0  # how often a waiting model's EnsureModel is repeated
    first_token_timeout_s: float = 60.0
    inter_token_timeout_s: float = 30.0  # a replica silent this long mid-stream has stalled
    eject_after_failures: int = 3  # consecutive failures that eject a replica (outlier detection)
    eject_for_s: float = 10.0
    demand_interval_s: float = 1.0

    def __post_init__(self) -> None:
        check_name("router", self.router_id)
        for name in ("max_attempts", "queue_per_model", "eject_after_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in (
            "queue_timeout_s",
            "first_token_timeout_s",
            "inter_token_timeout_s",
            "ensure_interval_s",
            "eject_for_s",
            "demand_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
