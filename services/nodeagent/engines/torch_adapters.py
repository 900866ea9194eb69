"""LoRA adapters in the torch LLM engine, in slots made with `peft` (DESIGN §7), as vLLM and
S-LoRA keep them: a base with ``max_adapters`` gets that many LoRA slots at load, on every
linear layer of the model (peft's "all-linear") or those ``engine_args.adapter_modules`` names,
of rank ``max_adapter_rank`` (16 if unset), all zero and switched off. Loading an adapter
copies its A and B into a free slot (a smaller rank fills the first rows and columns, the rest
stays zero: the same product) and sets the slot's scale from its alpha and rank: a copy of its
tensors, not a re-injection of peft's layers (tens of milliseconds with the worker held), done
beside the worker's forward passes, which read only the slot of the stream they step. Each
forward pass runs the base (slots off) or one slot, switched by pointing each LoRA layer at it
(`_switch`: microseconds, so a turn steps its streams in their own order whatever their adapters).

Adapters peft's plain LoRA cannot express this way (DoRA, per-module ranks, extra trained
modules, a rank above the slots', layers outside them) are refused with the reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from pathlib import Path
from typing import Any

import grpc
import torch
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.params import adapter_rank
from meshserve.nodeagent.engines.prompts import no_adapters
from meshserve.nodeagent.engines.torch_tiers import TorchWeights
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2

BASE = ""  # the active "slot" that is none: adapter layers off
PREFIX = "base_model.model."  # peft's prefix of module paths in a saved adapter


def _bad(name: str, why: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, f"adapter {name!r}: {why}", "BAD_ADAPTER"
    )


class TorchAdapters(TorchWeights):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._peft: Any = None  # peft's model over ``_model`` while it has slots
        self._lora: dict[str, Any] = {}  # module path → its peft LoRA layer
        self._rank = 0  # the slots' rank
        self._free: list[str] = []  # slots holding no adapter
        self._held: dict[str, str] = {}  # adapter name → its slot
        self._on = BASE  # the slot forward passes use now
        self._task = "generate"
        # Slots are filled and freed beside the worker's forward passes, never under its turn:
        # a forward pass reads only the slot of the stream it steps, and a slot is filled only
        # while free and published (``_held``) once whole; this lock guards the bookkeeping.
        self._slot_lock = threading.Lock()

    def _make_slots(self, model: Any, spec: cluster_pb2.ModelSpec) -> None:
        """At load (before memory is measured): ``spec.max_adapters`` zero slots, switched off."""
        self._peft, self._lora, self._held, self._on = None, {}, {}, BASE
        if not spec.max_adapters or self._task != "generate":
            return
        from peft import LoraConfig, get_peft_model

        self._rank = adapter_rank(spec)
        # Slots on every linear layer unless the base names the ones its adapters train
        # (engine_args.adapter_modules: "q_proj,v_proj"): smaller slots, and faster passes.
        named = spec.engine_args.get("adapter_modules", "")
        targets: Any = [m.strip() for m in named.split(",") if m.strip()] or "all-linear"
        config = LoraConfig(r=self._rank, lora_alpha=self._rank, target_modules=targets)
        names = [f"slot{i}" for i in range(spec.max_adapters)]
        peft: Any = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft.add_adapter(name, config)
        with torch.no_grad():
            for path, module in model.named_modules():
                if hasattr(module, "lora_A") and names[0] in module.lora_A:
                    self._lora[path] = module
                    for name in names:
                        module.lora_A[name].weight.zero_()
                        module.lora_B[name].weight.zero_()
        peft.eval()
        peft.base_model.disable_adapter_layers()
        peft.requires_grad_(False)  # served, never trained: `_switch` leaves grads alone
        self._peft, self._free = peft, names[::-1]

    async def load_adapter(self, name: str, path: str) -> None:
        self._check_serving()
        if self._peft is None:
            raise no_adapters(f"torch engine of {self._name!r} (max_adapters 0)")
        config, tensors = await asyncio.to_thread(self._read_adapter, name, Path(path))
        await asyncio.to_thread(self._fill_slot, name, config, tensors)

    def _read_adapter(self, name: str, path: Path) -> tuple[dict[str, Any], dict[Any, Any]]:
        """Its config, checked against the slots, and its tensors by (module path, A or B)."""
        from safetensors.torch import load_file

        config = json.loads((path / "adapter_config.json").read_text())
        rank = int(config.get("r", 0))
        if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise _bad(name, "DoRA and per-module ranks or alphas are not served by engine torch")
        if config.get("modules_to_save"):
            raise _bad(name, "it trains whole modules (modules_to_save): not a plain LoRA")
        if not 0 < rank <= self._rank:
            raise _bad(name, f"rank {rank}; this base's slots take rank 1..{self._rank}")
        tensors: dict[tuple[str, str], Any] = {}
        for key, t in load_file(str(path / "adapter_model.safetensors")).items():
            module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight") or module not in self._lora:
                raise _bad(name, f"{key}: not a LoRA weight of this base's linear layers")
            tensors[(module, part[0])] = t
        return config, tensors

    def _fill_slot(self, name: str, config: dict[str, Any], tensors: dict[Any, Any]) -> None:
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        with self._slot_lock:
            if name in self._held:
                return
            if not self._free:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"adapter {name!r}: every adapter slot of {self._name!r} is taken",
                    "ADAPTER_SLOTS_BUSY",
                    retry_after_s=1.0,
                )
            slot = self._free.pop()
        with torch.no_grad():  # a free slot: no forward pass reads it
            try:
                for path, module in self._lora.items():
                    a, b = module.lora_A[slot].weight, module.lora_B[slot].weight
                    a.zero_()
                    b.zero_()
                    if (path, "A") in tensors:
                        a[:rank].copy_(tensors[(path, "A")])
                        b[:, :rank].copy_(tensors[(path, "B")])
                    module.scaling[slot] = scale
            except (RuntimeError, KeyError) as e:  # shapes of another base, a half pair
                with self._slot_lock:
                    self._free.append(slot)
                raise _bad(name, f"its tensors do not fit this base ({e})") from None
        with self._slot_lock:
            self._held[name] = slot

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._free_slot, name)

    def _free_slot(self, name: str) -> None:
        with self._slot_lock:  # the agent frees only an adapter no stream uses
            slot = self._held.pop(name, None)
            if slot is not None:
                self._free.append(slot)

    def _forward(self, adapter: str, **inputs: Any) -> Any:
        """One forward pass of the base (``adapter`` "") or with a loaded adapter; never the
        base's answer for an adapter that is not loaded."""
        slot = self._held.get(adapter, "") if adapter else BASE
        if adapter and not slot:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"adapter {adapter!r} is not loaded on this replica of {self._name!r}; retry",
                "ADAPTER_NOT_LOADED",
                retry_after_s=0.2,
            )
        if self._peft is None:
            return self._model(**inputs)
        if slot != self._on:
            self._switch(slot)
        return self._peft(**inputs)

    def _switch(self, slot: str) -> None:
        """Points every LoRA layer at ``slot`` (or switches them off for the base). peft's own
        set_adapter / enable_adapter_layers also flip requires_grad on every slot's tensors:
        3.3 ms and 5.3 ms a switch on the 32 layers of the adapters benchmark's base, paid once
        per adapter per worker turn, which made TTFT p99 with four adapters in turn 1.44x the
        base's; these two attributes are all a layer's forward reads (peft 0.21's
        BaseTunerLayer: ``active_adapters``, ``disable_adapters``), set in microseconds."""
        off = slot == BASE
        for layer in self._lora.values():
            layer._disable_adapters = off
            if not off:
                layer._active_adapter = [slot]
        self._on = slot

    def _drop_adapters(self) -> None:
        """After unload: nothing of peft's held."""
        self._peft, self._lora, self._held, self._free, self._on = None, {}, {}, [], BASE
