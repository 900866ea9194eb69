"""The scheduler's configuration: one frozen dataclass, validated once (STYLE)."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.cluster.keys import check_name
from meshserve.config import ServiceConfig, process_id
from meshserve.scheduler.profile import Profile


@dataclass(frozen=True)
class SchedulerConfig:
    # The lease TTL is also how long a dead leader goes unnoticed before a standby takes over.
    service: ServiceConfig = field(default_factory=ServiceConfig)
    scheduler_id: str = field(default_factory=process_id)
    resync_s: float = 5.0  # full round at least this often (idle timeouts, missed events)
    debounce_s: float = 0.05  # gather a burst of watch events into one round
    profile: Profile = field(default_factory=Profile)  # plugins, weights, strategy, eviction

    def __post_init__(self) -> None:
        check_name("scheduler", self.scheduler_id)
        if self.resync_s <= 0 or self.debounce_s < 0:
            raise ValueError("resync_s must be > 0 and debounce_s >= 0")
