"""The router's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.cluster.keys import check_name
from meshserve.config import ServiceConfig, process_id
from meshserve.modelspec import routing_weights

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class RouterConfig:
    service: ServiceConfig = field(default_factory=lambda: ServiceConfig(listen=DEFAULT_LISTEN))
    router_id: str = field(default_factory=process_id)
    max_attempts: int = 3  # attempts before the first token (retries: max_attempts - 1)
    max_failovers: int = 3  # times a broken stream moves to another replica mid-way
    queue_per_model: int = 256  # requests held per model waiting for a free slot or a replica
    queue_timeout_s: float = 120.0  # longest wait for a slot (the caller's deadline may cut it)
    ensure_interval_s: float = 2.0  # how often a waiting model's EnsureModel is repeated
    first_token_timeout_s: float = 60.0
    inter_token_timeout_s: float = 30.0  # a replica silent this long mid-stream has stalled
    # ... or sooner, once a stream has a pace: silent for stall_factor x its longest gap so
    # far (at least stall_floor_s) — a partition or a one-way loss shows as silence, and a
    # wrong guess only costs a failover (the continuation is exact).
    stall_factor: float = 20.0
    stall_floor_s: float = 2.0
    retry_budget_ratio: float = 0.2  # retries may add at most this share of requests
    breaker_failures: int = 3  # consecutive failures that open a (replica, model) breaker
    breaker_failure_rate: float = 0.5  # ... or this failure share over the last 30 s (≥ 10 calls)
    breaker_cooldown_s: float = 5.0  # open this long before a probe; doubles to 60 s
    demand_interval_s: float = 1.0
    # Tenancy (gate.py): a tenants YAML file (watched), or the etcd document config/tenants.
    # Neither: auth off, every caller is one implicit tenant.
    tenants_file: str = ""
    tenants_from_etcd: bool = False
    # Queue order by priority and fair shares across tenants (fairqueue.py); off: one FIFO per
    # model, every request equal (the ablation bench/tenants.py compares against).
    fair_queueing: bool = True
    # The OpenAI-compatible HTTP front (openai_http.py) in this process: host:port; "" = off.
    http_listen: str = ""
    # The routing profile: scorer weights (routing/pipeline.py; empty: its defaults, ttft 8,
    # affinity 4, kv 2, load 1); a model's own `routing:` weights win over these.
    routing_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("router", self.router_id)
        if self.http_listen:
            host, _, port = self.http_listen.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"http_listen must be host:port, got {self.http_listen!r}")
        routing_weights(self.routing_weights, "routing_weights")  # raises naming the fault
        if self.tenants_file and self.tenants_from_etcd:
            raise ValueError("tenants come from a file or from etcd, not both")
        for name in ("max_attempts", "queue_per_model", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_failovers < 0:
            raise ValueError("max_failovers must be >= 0")
        for name in ("retry_budget_ratio", "breaker_failure_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in (
            "queue_timeout_s",
            "first_token_timeout_s",
            "inter_token_timeout_s",
            "ensure_interval_s",
            "breaker_cooldown_s",
            "demand_interval_s",
            "stall_factor",
            "stall_floor_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
