"""vLLM's engine arguments from a ModelSpec and the placement's grant (pure; no vLLM needed)."""

from __future__ import annotations

import pytest
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.vllm_plan import (
    GIB,
    offload_step,
    plan_engine,
    restore_step,
)
from meshserve.nodeagent.engines.vllm_plan import (
    TIER_DEVICE as DEVICE,
)
from meshserve.nodeagent.engines.vllm_plan import (
    TIER_DISK as DISK,
)
from meshserve.nodeagent.engines.vllm_plan import (
    TIER_HOST as HOST,
)
from meshserve.v1 import cluster_pb2

GPU = 80 * GIB


def spec(**engine_args: str) -> cluster_pb2.ModelSpec:
    return cluster_pb2.ModelSpec(
        name="m",
        source="/models/m",
        engine=cluster_pb2.ENGINE_KIND_VLLM,
        engine_args=engine_args,
        memory_bytes=14 * GIB,
        kv_headroom_bytes=4 * GIB,
        max_model_len=4096,
    )


def test_gpu_share_comes_from_the_grant_never_the_default() -> None:
    plan = plan_engine(
        spec(), EngineConfig(memory_budget_bytes=20 * GIB, device_total_bytes=GPU), False, True, 0
    )
    assert plan.kwargs["gpu_memory_utilization"] == 0.25
    assert plan.kwargs["enable_sleep_mode"] is True
    assert plan.kwargs["max_model_len"] == 4096
    assert plan.kwargs["enforce_eager"] is False
    assert plan.kwargs["served_model_name"] == ["m"]


def test_two_models_on_one_gpu_get_shares_that_add_up() -> None:
    shares = [
        plan_engine(
            spec(), EngineConfig(memory_budget_bytes=b, device_total_bytes=GPU), False, False, 0
        ).kwargs["gpu_memory_utilization"]
        for b in (30 * GIB, 40 * GIB)
    ]
    assert shares == [0.375, 0.5] and sum(shares) <= 0.95


def test_a_gang_placement_becomes_tensor_parallelism() -> None:
    s = spec()
    s.gpus_per_replica = 2
    plan = plan_engine(
        s, EngineConfig(memory_budget_bytes=20 * GIB, device_total_bytes=GPU), False, False, 0
    )
    assert plan.kwargs["tensor_parallel_size"] == 2
    assert plan.kwargs["gpu_memory_utilization"] == 0.125  # 20 GiB over two 80 GiB GPUs


def test_without_a_grant_the_spec_sizes_the_share() -> None:
    plan = plan_engine(spec(), EngineConfig(device_total_bytes=GPU), False, False, 0)
    assert plan.budget_bytes == round(18 * GIB * 1.15)
    assert plan.kwargs["gpu_memory_utilization"] == round(round(18 * GIB * 1.15) / (80 * GIB), 4)


def test_grants_outside_the_sane_range_are_refused() -> None:
    with pytest.raises(ValueError, match="grants must lie between"):
        plan_engine(
            spec(),
            EngineConfig(memory_budget_bytes=79 * GIB, device_total_bytes=GPU),
            False,
            False,
            0,
        )
    with pytest.raises(ValueError, match="memory size is unknown"):
        plan_engine(spec(), EngineConfig(memory_budget_bytes=GIB), False, False, 0)


def test_cpu_build_sizes_the_kv_cache_in_whole_gib() -> None:
    config = EngineConfig(memory_budget_bytes=6 * GIB)
    plan = plan_engine(spec(), config, True, False, 2 * GIB)
    assert plan.cpu_kv_gib == 3  # 6 - 2 - 15 % of 2 = 3.7 GiB, rounded down
    assert "gpu_memory_utilization" not in plan.kwargs
    assert plan.kwargs["enforce_eager"] is True
    tiny = plan_engine(spec(), EngineConfig(memory_budget_bytes=GIB // 2), True, False, 1 << 20)
    assert tiny.cpu_kv_gib == 1  # vLLM needs some KV cache to start


def test_engine_args_are_converted_and_unknown_ones_refused() -> None:
    config = EngineConfig(memory_budget_bytes=20 * GIB, device_total_bytes=GPU)
    plan = plan_engine(
        spec(dtype="bfloat16", max_num_seqs="64", enable_prefix_caching="yes", enforce_eager="1"),
        config,
        False,
        False,
        0,
    )
    assert plan.kwargs["dtype"] == "bfloat16"
    assert plan.kwargs["max_num_seqs"] == 64
    assert plan.kwargs["enable_prefix_caching"] is True
    assert plan.kwargs["enforce_eager"] is True
    with pytest.raises(ValueError, match=r"engine_args\.swap_spaces is not"):
        plan_engine(spec(swap_spaces="4"), config, False, False, 0)
    with pytest.raises(ValueError, match="expected true or false"):
        plan_engine(spec(enforce_eager="maybe"), config, False, False, 0)
    with pytest.raises(ValueError, match="serve embeddings with engine torch"):
        plan_engine(spec(task="embed"), config, False, False, 0)
    explicit = plan_engine(spec(gpu_memory_utilization="0.3"), config, False, False, 0)
    assert explicit.kwargs["gpu_memory_utilization"] == 0.3


def test_engine_cores_see_exactly_the_placed_gpus_by_uuid() -> None:
    s = spec()
    s.gpus_per_replica = 2
    gang = EngineConfig(
        memory_budget_bytes=20 * GIB, device_total_bytes=GPU, visible_devices=("GPU-5", "GPU-6")
    )
    assert plan_engine(s, gang, False, False, 0).env == {
        "CUDA_VISIBLE_DEVICES": "GPU-5,GPU-6",
        # spawned, and dying with the agent (meshserve.lifeline's watch)
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "MESHSERVE_DIE_WITH_PARENT": "1",
    }
    one = EngineConfig(
        memory_budget_bytes=10 * GIB, device_total_bytes=GPU, visible_devices=("MIG-7-1",)
    )
    assert plan_engine(spec(), one, False, False, 0).env["CUDA_VISIBLE_DEVICES"] == "MIG-7-1"
    wrong = EngineConfig(
        memory_budget_bytes=20 * GIB, device_total_bytes=GPU, visible_devices=("GPU-5",)
    )
    with pytest.raises(ValueError, match="gang of 2 GPUs was placed on 1 devices"):
        plan_engine(s, wrong, False, False, 0)


@pytest.mark.parametrize(
    ("current", "target", "sleep_mode", "step"),
    [
        (DEVICE, HOST, True, "sleep"),  # CUDA with sleep mode: weights to CPU RAM
        (DEVICE, HOST, False, "shutdown"),  # CPU build: no sleep mode, stop the engine
        (DEVICE, DISK, True, "shutdown"),  # disk: the model's own files are the copy
        (HOST, DISK, True, "shutdown"),  # asleep, then further down
        (HOST, HOST, True, "none"),
        (DISK, HOST, False, "none"),  # already below what this build can hold
        (DISK, DISK, True, "none"),
    ],
)
def test_offload_uses_sleep_mode_where_vllm_has_it(
    current: int, target: int, sleep_mode: bool, step: str
) -> None:
    assert offload_step(current, target, sleep_mode) == step


def test_restore_wakes_a_sleeping_engine_and_starts_a_stopped_one() -> None:
    assert restore_step(HOST, running=True) == "wake_up"
    assert restore_step(DISK, running=False) == "start"
    assert restore_step(HOST, running=False) == "start"  # stopped since
    assert restore_step(DEVICE, running=True) == "none"
    with pytest.raises(ValueError, match="cannot offload"):
        offload_step(DEVICE, DEVICE, True)
