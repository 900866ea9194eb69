"""Which devices an engine runs on (pure): the placement's GPU or MIG uuids, addressed by uuid,
never by index (issue 10).

- Every uuid the placement names must be on this node, or the load fails with a message naming
  what is missing and what is here (the replica goes FAILED; the scheduler places it elsewhere).
- ``visible_devices`` is what engines in their own processes get as ``CUDA_VISIBLE_DEVICES``
  (vLLM's engine cores): the uuids in tensor-parallel rank order, so a process sees only its
  own GPUs or MIG instance.
- ``torch_device`` is where an in-process (torch) engine allocates: ``cuda:<i>`` for a whole
  GPU, with the agent started under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA's ordinals are
  NVML's indices. A MIG instance cannot be chosen inside a process that already sees its parent:
  "" then, and the torch engine refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshserve.v1 import cluster_pb2


class UnknownDevice(ValueError):
    """The placement names a device this node does not have."""


@dataclass(frozen=True)
class Binding:
    visible_devices: tuple[str, ...]  # uuids for CUDA_VISIBLE_DEVICES, rank order; () = no GPU
    torch_device: str  # "cpu", "cuda:<i>", or "" (needs a process of its own: MIG)
    memory_total_bytes: int  # of the first bound device (the host's RAM without GPUs)


def bind(
    gpus: Sequence[cluster_pb2.GpuDevice], host_total_bytes: int, uuids: Sequence[str]
) -> Binding:
    """The binding for a placement naming ``uuids`` (empty: an operator's load or a CPU node —
    the first whole GPU, else the CPU)."""
    by_uuid = {g.uuid: g for g in gpus}
    if not uuids:
        whole = [g for g in gpus if not g.mig]
        if not whole:
            return Binding((), "cpu", host_total_bytes)
        first = whole[0]
        return Binding((first.uuid,), f"cuda:{first.index}", int(first.memory_total_bytes))
    missing = [u for u in uuids if u not in by_uuid]
    if missing:
        have = ", ".join(sorted(by_uuid)) or "no GPUs"
        raise UnknownDevice(
            f"the placement names {', '.join(missing)}, which this node does not have "
            f"(it has: {have}); the scheduler will place the model elsewhere"
        )
    devices = [by_uuid[u] for u in uuids]
    torch_device = "" if devices[0].mig else f"cuda:{devices[0].index}"
    return Binding(tuple(uuids), torch_device, int(devices[0].memory_total_bytes))
