"""LoRA adapters on a vLLM engine (``enable_lora``; DESIGN §7): each adapter the agent loads is
a `LoRARequest` added at run time (``add_lora``/``remove_lora``) and named on the requests that
ask for it.

Base requests go through an identity adapter (the first adapter's own tensors with every lora_B
zero: exactly the base's output), never through no adapter at all: vLLM's CPU build applies an
adapter to a base-model request batched with LoRA requests (an upstream bug in its torch LoRA
ops, checked here with 0.32), and meshserve must never answer with another model's output. The
identity is pinned and takes one of vLLM's ``max_loras`` slots (the plan adds one).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
from meshserve.rpc.errors import ServiceError
from vllm.lora.request import LoRARequest

IDENTITY = "meshserve-identity"


def write_identity(adapter: Path, out: Path) -> Path:
    """An adapter shaped like ``adapter`` whose every lora_B is zero (B·A = 0: the base)."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    zeroed = {k: torch.zeros_like(t) if "lora_B" in k else t for k, t in tensors.items()}
    save_file(zeroed, str(out / "adapter_model.safetensors"))
    return out


class VllmLora:
    def __init__(self, llm: object, workdir: Path) -> None:
        self.llm = llm  # vLLM's AsyncLLM, started with enable_lora
        self.workdir = workdir
        self._ids = itertools.count(2)  # 1 is the identity's
        self.requests: dict[str, LoRARequest] = {}
        self.identity: LoRARequest | None = None

    async def load(self, name: str, path: str) -> None:
        llm: Any = self.llm
        if self.identity is None:
            ident = await asyncio.to_thread(write_identity, Path(path), self.workdir / IDENTITY)
            request = LoRARequest(IDENTITY, 1, str(ident))
            if not await llm.add_lora(request):
                raise RuntimeError(f"vLLM refused the identity adapter built from {path}")
            await llm.pin_lora(1)
            self.identity = request
        request = LoRARequest(name, next(self._ids), path)
        if not await llm.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter {name!r} at {path}")
        self.requests[name] = request

    async def unload(self, name: str) -> None:
        request = self.requests.pop(name, None)
        if request is not None:
            llm: Any = self.llm
            await llm.remove_lora(request.lora_int_id)

    def request_for(self, adapter: str, model: str) -> LoRARequest | None:
        """What a request names: its adapter, or (the base) the identity once any was loaded."""
        if not adapter:
            return self.identity
        request = self.requests.get(adapter)
        if request is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"adapter {adapter!r} is not loaded on this replica of {model!r}; retry",
                "ADAPTER_NOT_LOADED",
                retry_after_s=0.2,
            )
        return request

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
