"""LoRA adapters in the torch LLM engine, with `peft` (DESIGN §7): loaded into the one base model
at run time under their names, chosen per forward pass (``adapter_names``; "__base__" is the
base alone), so streams of different adapters and of the base share the worker's turns.

peft injects its LoRA layers into the base model's modules: once one adapter is loaded, every
forward pass goes through `PeftModel` with the adapter named, never through the bare model
(which would apply whichever adapter peft last made active). The agent drops adapters before a
tier change (the flat buffer of engines/flat.py is laid out without them) and loads them again
on demand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.prompts import no_adapters
from meshserve.nodeagent.engines.torch_tiers import TorchWeights
from meshserve.rpc.errors import ServiceError

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class TorchAdapters(TorchWeights):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._peft: Any = None  # peft.PeftModel over ``_model`` once an adapter was loaded
        self._adapters: set[str] = set()
        self._task = "generate"

    async def load_adapter(self, name: str, path: str) -> None:
        self._check_serving()
        if self._task != "generate":
            raise no_adapters(f"torch engine of an embeddings model ({self._name!r})")
        await asyncio.to_thread(self._load_adapter_sync, name, path)

    def _load_adapter_sync(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._turn:  # never under a forward pass
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, path, adapter_name=name)
                self._adapters = set()
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._peft.to(self._device)
            self._peft.eval()
            self._adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._unload_adapter_sync, name)

    def _unload_adapter_sync(self, name: str) -> None:
        with self._turn:
            if self._peft is None or name not in self._adapters:
                return
            self._adapters.discard(name)
            if self._adapters:
                self._peft.delete_adapter(name)
            else:  # the last one: take peft's layers out, the bare model again
                self._model = self._peft.unload()
                self._peft = None

    async def offload(self, tier: int) -> None:
        for name in list(self._adapters):  # the agent drops them first; never packed with them
            await self.unload_adapter(name)
        await super().offload(tier)

    def _forward(self, adapter: str, **inputs: Any) -> Any:
        """One forward pass of the base (``adapter`` "") or with a loaded adapter; never the
        base's answer for an adapter that is not loaded."""
        if adapter and adapter not in self._adapters:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"adapter {adapter!r} is not loaded on this replica of {self._name!r}; retry",
                "ADAPTER_NOT_LOADED",
                retry_after_s=0.2,
            )
        if self._peft is None:
            return self._model(**inputs)
        return self._peft(adapter_names=[adapter or BASE], **inputs)

    def _drop_adapters(self) -> None:
        """After unload: nothing of peft's held."""
        self._peft = None
        self._adapters = set()
