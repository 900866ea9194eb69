"""How a ModelSpec and the placement's memory grant become vLLM's engine arguments. Pure (no vLLM
import), so it is unit-tested where vLLM is not installed; engines/vllm_engine.py uses it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshserve.lifeline import WATCH_ENV
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.params import adapter_rank
from meshserve.v1 import cluster_pb2
from meshserve.weights import OVERHEAD_FRACTION, need_bytes

GIB = 1 << 30
MIN_UTILIZATION, MAX_UTILIZATION = 0.02, 0.95
# engine_args keys passed to vLLM as they are (strings converted); others are refused at load.
PASSTHROUGH: Mapping[str, type] = {
    "dtype": str,
    "quantization": str,
    "tensor_parallel_size": int,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "block_size": int,
    "seed": int,
    "enable_prefix_caching": bool,
    "enable_chunked_prefill": bool,
    "kv_cache_dtype": str,
    "swap_space": float,
    "trust_remote_code": bool,
}


@dataclass(frozen=True)
class VllmPlan:
    """What the engine will ask vLLM for: the arguments and the memory it takes."""

    kwargs: dict[str, Any]
    cpu_kv_gib: int  # VLLM_CPU_KVCACHE_SPACE on the CPU build; 0 on GPUs
    budget_bytes: int  # what the engine may take in all
    env: dict[str, str]  # the environment of the engine-core processes vLLM spawns


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def plan_engine(
    spec: cluster_pb2.ModelSpec,
    config: EngineConfig,
    on_cpu: bool,
    sleep_mode: bool,
    weight_bytes: int,
) -> VllmPlan:
    """vLLM's arguments for ``spec`` under ``config``'s memory grant (pure; unit-tested)."""
    args = dict(spec.engine_args)
    if args.pop("task", "generate") != "generate":
        raise ValueError(
            "the vllm engine serves generation here; serve embeddings with engine torch"
        )
    # No grant (an operator's LoadModel): size it as the scheduler would.
    budget = config.memory_budget_bytes or need_bytes(
        max(spec.memory_bytes, weight_bytes), spec.kv_headroom_bytes
    )
    eager = _bool(args.pop("enforce_eager", "true" if on_cpu else "false"))
    utilization = args.pop("gpu_memory_utilization", "")
    kwargs: dict[str, Any] = {
        "model": spec.source,
        "tokenizer": spec.source,
        "served_model_name": [spec.name],
        "enforce_eager": eager,
        "disable_log_stats": True,  # our stat logger still runs (AsyncLLM enables custom ones)
        "enable_log_requests": False,
        # Requests carry the router's priority (vllm_engine: negated, vLLM runs lower values
        # first): its waiting queue goes by priority and, short of KV blocks, it preempts the
        # lowest-priority running request first.
        "scheduling_policy": "priority",
    }
    if spec.max_model_len:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.max_adapters:  # LoRA adapters at run time, one slot more for the identity (vllm_lora)
        kwargs["enable_lora"] = True
        kwargs["max_loras"] = kwargs["max_cpu_loras"] = spec.max_adapters + 1
        kwargs["max_lora_rank"] = next(
            (r for r in LORA_RANKS if r >= adapter_rank(spec)), LORA_RANKS[-1]
        )
    if spec.gpus_per_replica > 1:  # the scheduler placed a gang: one shard per GPU
        kwargs["tensor_parallel_size"] = spec.gpus_per_replica
    for key, value in args.items():
        kind = PASSTHROUGH.get(key)
        if kind is None:
            raise ValueError(
                f"engine_args.{key} is not a vLLM argument meshserve passes on; "
                f"known: {', '.join(sorted([*PASSTHROUGH, 'enforce_eager', 'task']))}"
            )
        kwargs[key] = _bool(value) if kind is bool else kind(value)
    cpu_kv_gib = 0
    if on_cpu:
        # The CPU build takes whole GiB for the KV cache: what the grant leaves after the weights
        # and the overhead, at least 1 (vLLM refuses to start without a KV cache).
        spare = budget - weight_bytes - int(weight_bytes * OVERHEAD_FRACTION)
        cpu_kv_gib = max(1, spare // GIB)
    else:
        total = config.device_total_bytes
        if utilization:
            fraction = float(utilization)  # an operator's explicit choice wins
        elif total:
            fraction = budget / max(1, spec.gpus_per_replica) / total  # per GPU of a gang
        else:
            raise ValueError("the device's memory size is unknown: cannot size vLLM's share")
        if not MIN_UTILIZATION <= fraction <= MAX_UTILIZATION:
            raise ValueError(
                f"vLLM would get {fraction:.1%} of the GPU ({budget} of {total} bytes): "
                f"grants must lie between {MIN_UTILIZATION:.0%} and {MAX_UTILIZATION:.0%}"
            )
        kwargs["gpu_memory_utilization"] = round(fraction, 4)
        kwargs["enable_sleep_mode"] = sleep_mode
    # The engine core and its workers die with their parent (meshserve.lifeline's watch, set up
    # as they re-import the agent's main module): spawned, never forked, so that they do (a
    # forked process re-imports nothing). The CPU build spawns anyway; on a GPU vLLM forks
    # unless CUDA is up.
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", WATCH_ENV: "1"}
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_gib)
    if config.visible_devices:
        # The engine cores see exactly the placement's GPUs (or MIG instance), by uuid, in rank
        # order: never GPU 0.. because that is where CUDA starts counting.
        if len(config.visible_devices) != spec.gpus_per_replica and spec.gpus_per_replica > 1:
            raise ValueError(
                f"a gang of {spec.gpus_per_replica} GPUs was placed on "
                f"{len(config.visible_devices)} devices: {', '.join(config.visible_devices)}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(config.visible_devices)
    return VllmPlan(kwargs, cpu_kv_gib, budget, env)


TIER_DEVICE, TIER_HOST, TIER_DISK = (
    cluster_pb2.TIER_DEVICE,
    cluster_pb2.TIER_HOST,
    cluster_pb2.TIER_DISK,
)


def offload_step(current: int, target: int, sleep_mode: bool) -> str:
    """What moving a vLLM engine from tier ``current`` to ``target`` (TIER_HOST or TIER_DISK)
    does: "sleep" — ``sleep(level=1)``, weights to CPU RAM and the KV cache dropped (CUDA builds
    with sleep mode); "shutdown" — the engine stops and the weights stay in the model's files
    (TIER_DISK, and every tier where sleep mode is missing, as on the CPU build); "none" —
    already there, or as low as it goes."""
    if target not in (TIER_HOST, TIER_DISK):
        raise ValueError(f"cannot offload to tier {target}")
    if current == target or (current == TIER_DISK and not sleep_mode):
        return "none"
    if target == TIER_HOST and sleep_mode and current == TIER_DEVICE:
        return "sleep"
    return "shutdown"


def restore_step(current: int, running: bool) -> str:
    """Back to the device: "none" (on it), "wake_up" (asleep in CPU RAM), "start" (stopped)."""
    if current == TIER_DEVICE:
        return "none"
    if current == TIER_HOST and running:
        return "wake_up"
    return "start"
