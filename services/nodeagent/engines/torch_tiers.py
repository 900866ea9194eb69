"""The weights of a torch engine and their tiers: GPU → pinned CPU RAM → local disk, through one
flat buffer per model (engines/flat.py). Shared by the LLM engine (torch_engine.py) and the tensor
engine (torch_tensor.py); each holds the model in ``_model`` and takes ``_turn`` per forward pass,
so a tier change never runs under a forward pass.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import torch
from meshserve.nodeagent.engines import flat
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.serving import Serving
from meshserve.nodeagent.engines.torch_device import torch_device
from meshserve.v1 import cluster_pb2

DEVICE, HOST, DISK = cluster_pb2.TIER_DEVICE, cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK


class TorchWeights(Serving):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._model: Any = None
        self._device = torch_device(config)
        self._name = ""
        self._memory = 0
        self._tier = 0
        self._host: torch.Tensor | None = None  # the flat weights while offloaded to CPU RAM
        self._slots: list[flat.Slot] = []
        self._disk_bytes = 0
        self._turn = threading.Lock()  # held per forward pass and by tier changes
        self._stopping = False

    def health(self) -> str:
        """Engines without a worker thread of their own have nothing that can die apart."""
        return ""

    def memory_bytes(self) -> int:
        return self._memory if self._tier == DEVICE else 0

    def host_bytes(self) -> int:
        return int(self._host.numel()) if self._host is not None and self._tier == HOST else 0

    def disk_bytes(self) -> int:
        return self._disk_bytes if self._tier == DISK else 0

    @property
    def tier_note(self) -> str:
        if self._device.type == "cpu":
            return "device is the CPU: TIER_HOST keeps the weights in RAM (frees no device memory)"
        return ""

    def _check_serving(self) -> None:
        self._refuse_unless_serving(self._name, self._model is not None and not self._stopping)

    def _dtype(self, args: dict[str, str]) -> torch.dtype:
        default = "float32" if self._device.type == "cpu" else "bfloat16"
        dtype: torch.dtype = getattr(torch, args.get("dtype", default))
        return dtype

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self._device) if self._device.type == "cuda" else 0

    def _settle(self, model: Any, name: str, before: int) -> None:
        """``model`` is loaded on the device: measure what it takes (``before``: `_allocated`
        before the load)."""
        self._model, self._name, self._tier = model, name, DEVICE
        if self._device.type == "cuda":
            self._memory = torch.cuda.memory_allocated(self._device) - before
        else:
            tensors = [*model.parameters(), *model.buffers()]
            self._memory = sum(t.numel() * t.element_size() for t in tensors)

    def _forget(self) -> None:
        """After unload: nothing held (the caller collects garbage)."""
        self._model = None
        self._host, self._slots, self._memory, self._tier = None, [], 0, 0
        self._disk_path().unlink(missing_ok=True)

    # --- tiers -------------------------------------------------------------------------------

    def _disk_path(self) -> Path:
        return Path(self.config.cache_dir or ".") / f"{self._name or 'model'}.flat.safetensors"

    async def offload(self, tier: int) -> None:
        if tier not in (HOST, DISK):
            raise ValueError(f"cannot offload to tier {tier}")
        if tier == DISK and not self.config.cache_dir:
            raise ValueError("the disk tier needs a cache directory (--cache-dir)")
        await asyncio.to_thread(self._offload_sync, tier)

    def _offload_sync(self, tier: int) -> None:
        with self._turn:
            pin = self._device.type == "cuda"
            if self._tier == DEVICE:
                self._host, self._slots = flat.pack(self._model, pin)
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
            if tier == DISK and self._host is not None:
                flat.save(self._host, self._slots, self._disk_path())
                self._disk_bytes = self._disk_path().stat().st_size
                flat.release(self._model, self._slots)
                self._host = None
            self._tier = tier

    async def restore(self) -> None:
        await asyncio.to_thread(self._restore_sync)

    def _restore_sync(self) -> None:
        with self._turn:
            if self._tier == DEVICE:
                return
            if self._tier == DISK:
                self._host = flat.load(self._disk_path(), pin=self._device.type == "cuda")
            assert self._host is not None
            flat.point(self._model, self._slots, flat.to_device(self._host, self._device))
            self._host = None
            self._tier = DEVICE
