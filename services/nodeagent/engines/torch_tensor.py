"""Tensor models on torch (``engine_args: {task: classify}``): a transformers image classifier
(``AutoModelForImageClassification``: ResNet, ViT, ConvNeXt …) served through Infer / KServe
ModelInfer with named, typed, shaped tensors, batched dynamically by the agent (batching.py).

Signature: input ``pixel_values`` FP32 [-1, channels, height, width] (channels from the model's
config, the image size from ``engine_args.image_size`` or the config's ``image_size``); outputs
``logits`` FP32 [-1, num_labels] and ``class_id`` INT64 [-1] (the arg-max). Inputs of any
float type the client sends as FP32 are cast to the model's dtype on the device.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import torch
from meshserve.batchconfig import BatchConfig
from meshserve.nodeagent.batching import Batcher, Done, Job
from meshserve.nodeagent.engines.base import NO_RESUME, Chunk, EngineConfig, EngineStats, Resume
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.prompts import out_of_memory, unloaded
from meshserve.nodeagent.engines.torch_decode import requested_bytes
from meshserve.nodeagent.engines.torch_device import set_threads
from meshserve.nodeagent.engines.torch_tiers import TorchWeights
from meshserve.rpc.errors import ServiceError
from meshserve.tensors import SIZES
from meshserve.v1 import cluster_pb2, common_pb2, inference_pb2
from transformers import AutoModelForImageClassification

log = logging.getLogger(__name__)

TORCH_TYPES = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP64": torch.float64,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT16": torch.int16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
assert sys.byteorder == "little"  # tensor data is little-endian on the wire: no swaps here


def tensor_of(t: common_pb2.Tensor) -> torch.Tensor:
    """A checked input (tensors.check_inputs) as a torch tensor (one copy)."""
    return torch.frombuffer(bytearray(t.data), dtype=TORCH_TYPES[t.datatype]).reshape(
        tuple(t.shape)
    )


def wire(name: str, datatype: str, x: torch.Tensor) -> common_pb2.Tensor:
    x = x.contiguous().cpu()
    return common_pb2.Tensor(
        name=name, datatype=datatype, shape=list(x.shape), data=x.numpy().tobytes()
    )


class TensorEngine(TorchWeights):
    """`Engine` over a transformers image classifier; also `TensorModel` (base.py)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._signature = common_pb2.TensorSignature()
        self._batcher: Batcher | None = None
        self._dtype_on_device = torch.float32
        self.ooms = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        batching = BatchConfig.from_args(spec.engine_args, spec.slo_ttft_ms)
        await asyncio.to_thread(self._load_sync, spec, batching)
        self._stopping = False
        self._batcher = Batcher(spec.name, batching, self._run)
        self._batcher.start()

    def _load_sync(self, spec: cluster_pb2.ModelSpec, batching: BatchConfig) -> None:
        set_threads(self.config.threads)
        args = dict(spec.engine_args)
        before = self._allocated()
        self._dtype_on_device = self._dtype(args)
        model = AutoModelForImageClassification.from_pretrained(
            spec.source, dtype=self._dtype_on_device
        )
        model.to(self._device).eval()  # type: ignore[arg-type]
        c = model.config
        size: Any = args.get("image_size") or getattr(c, "image_size", None)
        if size is None:
            raise ValueError(
                f"model {spec.name!r}: its config has no image_size; set engine_args.image_size"
            )
        h, w = (int(size), int(size)) if not isinstance(size, list | tuple) else map(int, size)
        self._signature = common_pb2.TensorSignature(max_batch_size=batching.max_batch)
        self._signature.inputs.add(
            name="pixel_values", datatype="FP32", shape=[-1, int(c.num_channels), h, w]
        )
        self._signature.outputs.add(name="logits", datatype="FP32", shape=[-1, int(c.num_labels)])
        self._signature.outputs.add(name="class_id", datatype="INT64", shape=[-1])
        self._settle(model, spec.name, before)

    async def unload(self) -> None:
        self._stopping = True
        if self._batcher is not None:
            await self._batcher.stop(unloaded())
            self._batcher = None
        with self._turn:
            self._forget()
        await asyncio.to_thread(gc.collect)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    async def warm_up(self) -> None:
        """One batch of one zero row, past the batcher (no window to wait)."""
        zeros = [
            common_pb2.Tensor(
                name=s.name,
                datatype=s.datatype,
                shape=[1, *s.shape[1:]],
                data=bytes(math.prod(s.shape[1:]) * SIZES[s.datatype]),
            )
            for s in self._signature.inputs
        ]
        job = Job((zeros, ()), 1, None, 0, 0.0, 0.0, asyncio.get_running_loop().create_future())
        await self._run([job])

    # --- requests ----------------------------------------------------------------------------

    def signature(self) -> common_pb2.TensorSignature:
        return self._signature

    async def infer(
        self,
        inputs: Sequence[common_pb2.Tensor],
        outputs: Sequence[str],
        rows: int,
        priority: int,
        timeout: float | None,
    ) -> Done:
        """Checked inputs (tensors.check_inputs) through the batcher; ``Done.result`` is the
        output tensors, in the order asked (all, when ``outputs`` is empty)."""
        self._check_serving()
        assert self._batcher is not None
        order = {t.name: t for t in inputs}
        ordered = [order[s.name] for s in self._signature.inputs]
        key = (tuple(tuple(t.shape[1:]) for t in ordered), tuple(outputs))
        return await self._batcher.submit((ordered, tuple(outputs)), rows, key, priority, timeout)

    async def _run(self, jobs: list[Job]) -> list[list[common_pb2.Tensor]]:
        try:
            return await asyncio.to_thread(self._run_sync, jobs)
        except torch.OutOfMemoryError as e:
            raise self._out_of_memory(e) from None

    def _run_sync(self, jobs: list[Job]) -> list[list[common_pb2.Tensor]]:
        """One forward pass over every job's rows; each job gets its own rows back."""
        with self._turn, torch.inference_mode():
            self._check_serving()
            # An image classifier takes one input: each job's payload is ([pixel_values], wanted)
            parts = [tensor_of(j.payload[0][0]) for j in jobs]
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
            x = x.to(self._device, dtype=self._dtype_on_device)
            logits = self._model(pixel_values=x).logits.float().cpu()
        out, start = [], 0
        for job in jobs:
            mine = logits[start : start + job.rows]
            start += job.rows
            made = {
                "logits": wire("logits", "FP32", mine),
                "class_id": wire("class_id", "INT64", mine.argmax(dim=-1)),
            }
            wanted = job.payload[1] or [s.name for s in self._signature.outputs]
            out.append([made[name] for name in wanted])
        return out

    def _out_of_memory(self, error: Exception) -> ServiceError:
        """A device OOM fails that batch's requests (RESOURCE_EXHAUSTED: the router retries
        them elsewhere), not the engine; the measured memory is raised for the scheduler."""
        self.ooms += 1
        self._memory += requested_bytes(str(error)) or self._memory // 10
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("%s: out of device memory (%d so far): %s", self._name, self.ooms, error)
        return out_of_memory(self._name, "retry, or send smaller batches")

    # --- not an LLM --------------------------------------------------------------------------

    def _wrong_task(self) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model {self._name!r} is a tensor model: call Infer (or KServe ModelInfer)",
            "WRONG_TASK",
        )

    async def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
        resume: Resume = NO_RESUME,
    ) -> AsyncIterator[Chunk]:
        raise self._wrong_task()
        yield  # pragma: no cover  (makes this an async generator, as the protocol has it)

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        raise self._wrong_task()

    # --- load figures ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        b = self._batcher
        return EngineStats(b.running if b else 0, b.waiting if b else 0, 0.0, self.ooms, 0)

    @property
    def in_flight(self) -> int:
        b = self._batcher
        return b.running + b.waiting if b else 0

    @property
    def max_model_len(self) -> int:
        return 0
