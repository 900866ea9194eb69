"""Binding engines to the placement's devices by uuid (pure): an 8-GPU host, two of them
MIG-partitioned, described as the agent's NVML probe reports it."""

from __future__ import annotations

import pytest
from meshserve.nodeagent.binding import Binding, UnknownDevice, bind
from meshserve.v1 import cluster_pb2 as S

GIB = 2**30


def host() -> list[S.GpuDevice]:
    gpus = [S.GpuDevice(uuid=f"GPU-{i}", index=i, memory_total_bytes=80 * GIB) for i in range(8)]
    for parent in (6, 7):  # MIG instances carry their parent's index
        gpus += [
            S.GpuDevice(
                uuid=f"MIG-{parent}-{k}", index=parent, mig=True, memory_total_bytes=10 * GIB
            )
            for k in range(2)
        ]
    return gpus


@pytest.mark.parametrize(
    ("uuids", "expected"),
    [
        # A placement on GPU 3: exactly that GPU, and cuda:3 (PCI bus order = NVML's indices).
        (["GPU-3"], Binding(("GPU-3",), "cuda:3", 80 * GIB)),
        # A tensor-parallel gang on GPUs 5-6: both, rank order as placed.
        (["GPU-5", "GPU-4"], Binding(("GPU-5", "GPU-4"), "cuda:5", 80 * GIB)),
        # A MIG instance: its own uuid, never the parent's index.
        (["MIG-7-1"], Binding(("MIG-7-1",), "", 10 * GIB)),
        # No device named (an operator's LoadModel): the first whole GPU.
        ([], Binding(("GPU-0",), "cuda:0", 80 * GIB)),
    ],
)
def test_visible_devices_are_exactly_the_placements(uuids: list[str], expected: Binding) -> None:
    assert bind(host(), 512 * GIB, uuids) == expected


def test_two_placements_never_see_each_others_gpu() -> None:
    a, b = bind(host(), 0, ["GPU-3"]), bind(host(), 0, ["GPU-5"])
    assert not set(a.visible_devices) & set(b.visible_devices)
    assert a.torch_device != b.torch_device


def test_a_device_this_node_lacks_is_refused_with_what_it_has() -> None:
    with pytest.raises(UnknownDevice, match="GPU-9, which this node does not have"):
        bind(host(), 0, ["GPU-3", "GPU-9"])


def test_cpu_node() -> None:
    assert bind([], 64 * GIB, []) == Binding((), "cpu", 64 * GIB)
    with pytest.raises(UnknownDevice, match="no GPUs"):
        bind([], 64 * GIB, ["GPU-0"])
