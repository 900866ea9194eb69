"""LoRA adapters on a vLLM engine (``enable_lora``; DESIGN §7): each adapter the agent loads is
a `LoRARequest` added at run time (``add_lora``/``remove_lora``) and named on the requests that
ask for it.

On the CPU build, base requests go through an identity adapter (a rank-1 LoRA on the first
attention query projection with A and B zero: exactly the base's output), never through no
adapter at all: the CPU build applies an adapter to a base-model request batched with LoRA
requests (an upstream bug in its torch LoRA ops, checked here with 0.32), and meshserve must
never answer with another model's output. The identity is made from the base's safetensors
headers and registered (pinned) when the engine starts, before any base request, so no base
request ever runs without it; it takes one of vLLM's ``max_loras`` slots (the plan adds one).
GPU builds have no such bug and use none.
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
PREFIX = "base_model.model."  # peft's prefix of module paths in a saved adapter


def write_identity(model: Path, out: Path) -> Path | None:
    """A rank-1 adapter of ``model`` on its first attention query projection with A and B zero
    (B·A = 0: the base), from the safetensors headers; None when the model has no such layer."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.endswith(("q_proj.weight", "query.weight")):
                    rows, cols = f.get_slice(key).get_shape()
                    break
            else:
                continue
        module = key.removesuffix(".weight")
        out.mkdir(parents=True, exist_ok=True)
        target = module.rsplit(".", 1)[-1]
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [target],
                  "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
        (out / "adapter_config.json").write_text(json.dumps(config))
        zeros = {
            f"{PREFIX}{module}.lora_A.weight": torch.zeros(1, cols),
            f"{PREFIX}{module}.lora_B.weight": torch.zeros(rows, 1),
        }
        save_file(zeros, str(out / "adapter_model.safetensors"))
        return out
    return None


class VllmLora:
    def __init__(self, llm: object, workdir: Path) -> None:
        self.llm = llm  # vLLM's AsyncLLM, started with enable_lora
        self.workdir = workdir
        self._ids = itertools.count(2)  # 1 is the identity's
        self.requests: dict[str, LoRARequest] = {}
        self.identity: LoRARequest | None = None

    async def start(self, model: Path) -> None:
        """Registers the identity adapter (CPU builds) before the engine takes any request."""
        ident = await asyncio.to_thread(write_identity, model, self.workdir / IDENTITY)
        if ident is None:
            raise ValueError(
                f"{model}: no attention query projection (q_proj) found for the identity adapter "
                "that base requests need beside adapters on vLLM's CPU build; serve adapters of "
                "this model with engine torch"
            )
        llm: Any = self.llm
        request = LoRARequest(IDENTITY, 1, str(ident))
        if not await llm.add_lora(request):
            raise RuntimeError(f"vLLM refused the identity adapter built from {model}")
        await llm.pin_lora(1)
        self.identity = request

    async def load(self, name: str, path: str) -> None:
        llm: Any = self.llm
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
        """What a request names: its adapter, or (the base) the identity (CPU builds)."""
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
