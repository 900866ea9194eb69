"""How the agent batches a tensor model (``engine_args``), read and checked in one place: by
`meshserve model apply` before the spec reaches etcd, and by the engine at load."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MODES = ("off", "fixed", "adaptive")


@dataclass(frozen=True)
class BatchConfig:
    mode: str = "fixed"
    window_s: float = 0.020  # the most a request waits for others (adaptive: the upper bound)
    max_batch: int = 8  # rows per batch
    target_p95_s: float = 0.0  # adaptive: the P95 of request latency to stay under

    @classmethod
    def from_args(cls, args: Mapping[str, str], slo_ms: int = 0) -> BatchConfig:
        """From ``engine_args``: batching, batch_window_ms, max_batch_size, latency_slo_ms (else
        the spec's slo_ttft_ms). Raises ValueError naming the bad argument."""
        mode = args.get("batching", "fixed")
        if mode not in MODES:
            raise ValueError(f"engine_args.batching must be one of {', '.join(MODES)}: {mode!r}")
        try:
            window_ms = float(args.get("batch_window_ms", 20))
            max_batch = int(args.get("max_batch_size", 8))
            target_ms = float(args.get("latency_slo_ms", slo_ms))
        except ValueError as e:
            raise ValueError(f"engine_args batching values must be numbers: {e}") from None
        if not 0 <= window_ms <= 1000:
            raise ValueError(f"engine_args.batch_window_ms must be in [0, 1000]: {window_ms}")
        if not 1 <= max_batch <= 1024:
            raise ValueError(f"engine_args.max_batch_size must be in [1, 1024]: {max_batch}")
        if mode == "adaptive" and not target_ms > 0:
            raise ValueError(
                "engine_args.batching adaptive needs a P95 target: latency_slo_ms (or the "
                "spec's slo_ttft_ms)"
            )
        return cls(mode, window_ms / 1000, max_batch, max(0.0, target_ms) / 1000)
