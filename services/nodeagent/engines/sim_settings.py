"""``engine: sim``: The model of a device (``engine_args``, all optional):

- ``ttft_ms`` (20): prefill of a request, from admission to its first token;
- ``itl_ms`` (10): one decode step when the device is not compute-bound;
- ``device_tokens_per_s`` (0 = unbounded): tokens/s the device decodes across all its streams;
  a step takes max(itl, running streams / device_tokens_per_s), so more streams slow each one;
- ``kv_tokens`` (65536): the KV cache; a stream reserves prompt + max_tokens when admitted and
  waits while that does not fit (``kv_cache_usage`` is the reserved share);
- ``max_batch`` (64): streams decoded at once; the rest wait in the engine's queue;
- ``prefill_ms_per_token`` (0): prefill of each prompt token not found in the prefix cache, on
  top of ``ttft_ms``; ``block_tokens`` (16): the KV block; ``cache_blocks`` (``kv_tokens`` /
  ``block_tokens``): the prefix cache, vLLM's shape: a prompt's full blocks (chained hashes,
  `meshserve.kvblocks`, salted by the request's ``cache_salt``) are kept once its first token
  is out, least recently used out first (a prefix's tail before its head), and a new stream
  skips the prefill of its leading cached blocks. Stored and evicted blocks are reported as KV
  events (``kv_sink``), as vLLM publishes them;
- ``load_ms`` (0): load time; tier changes take the model's memory over ``host_gbps`` (25) or
  ``disk_gbps`` (2);
- ``fail_load`` (false), ``inject_oom_every`` (0: every Nth decode step fails its stream with
  RESOURCE_EXHAUSTED, as a device OOM does), ``inject_crash_at_step`` (0: at that step the
  engine dies for good, as when its process or device is lost), ``inject_fail_after_step`` (0:
  every step after that one fails its stream with INTERNAL, the engine staying up: a broken
  model that passed its warm-up, 4 steps): failure hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from meshserve.kvblocks import DEFAULT_BLOCK_TOKENS


@dataclass(frozen=True)
class SimSettings:
    ttft_s: float = 0.02
    itl_s: float = 0.01
    device_tokens_per_s: float = 0.0
    kv_tokens: int = 65_536
    max_batch: int = 64
    prefill_s_per_token: float = 0.0
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    cache_blocks: int = 0  # 0: kv_tokens // block_tokens
    load_s: float = 0.0
    host_gbps: float = 25.0
    disk_gbps: float = 2.0
    fail_load: bool = False
    inject_oom_every: int = 0
    inject_crash_at_step: int = 0
    inject_fail_after_step: int = 0

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> SimSettings:
        """Raises ValueError naming the argument at fault."""

        def number(key: str, default: float, low: float = 0.0) -> float:
            try:
                value = float(args.get(key, default))
            except ValueError:
                raise ValueError(f"engine_args.{key} must be a number: {args[key]!r}") from None
            if not (value >= low and math.isfinite(value)):
                raise ValueError(f"engine_args.{key} must be >= {low}: {value}")
            return value

        return cls(
            ttft_s=number("ttft_ms", 20) / 1000,
            itl_s=number("itl_ms", 10, 0.1) / 1000,
            device_tokens_per_s=number("device_tokens_per_s", 0),
            kv_tokens=int(number("kv_tokens", 65_536, 1)),
            max_batch=int(number("max_batch", 64, 1)),
            prefill_s_per_token=number("prefill_ms_per_token", 0) / 1000,
            block_tokens=int(number("block_tokens", DEFAULT_BLOCK_TOKENS, 1)),
            cache_blocks=int(number("cache_blocks", 0)),
            load_s=number("load_ms", 0) / 1000,
            host_gbps=number("host_gbps", 25, 0.001),
            disk_gbps=number("disk_gbps", 2, 0.001),
            fail_load=args.get("fail_load", "false").lower() in ("1", "true", "yes"),
            inject_oom_every=int(number("inject_oom_every", 0)),
            inject_crash_at_step=int(number("inject_crash_at_step", 0)),
            inject_fail_after_step=int(number("inject_fail_after_step", 0)),
        )
