"""Where the torch engine computes: the placement's GPU by uuid (binding.py), and the process's
CPU threads."""

from __future__ import annotations

import contextlib

import torch
from meshserve.nodeagent.engines.base import EngineConfig


def torch_device(config: EngineConfig) -> torch.device:
    """The device for ``config``: ``cuda:<i>`` of the GPU whose uuid the placement names, found
    among the GPUs this process sees (an operator's CUDA_VISIBLE_DEVICES renumbers them)."""
    if not config.device:
        raise ValueError(
            "the torch engine runs inside the agent, which sees whole GPUs: it cannot be bound "
            f"to the MIG instance {', '.join(config.visible_devices)}; serve this model with "
            "engine vllm (engine cores in processes of their own), or run one agent per MIG "
            "instance (CUDA_VISIBLE_DEVICES=MIG-…)"
        )
    uuids = config.visible_devices
    if config.device.startswith("cuda") and uuids and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"GPU-{torch.cuda.get_device_properties(i).uuid}" == uuids[0]:
                return torch.device(f"cuda:{i}")
    return torch.device(config.device)


_threads_set = False


def set_threads(n: int) -> None:
    global _threads_set  # process-wide torch setting: set once per process
    if not _threads_set:
        torch.set_num_threads(max(1, n))
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        _threads_set = True
