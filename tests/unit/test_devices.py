"""NvmlProbe's mapping of NVML answers to GpuDevice values: plain GPUs, MIG instances, per-process
memory and device faults. No GPU here, so NVML itself is replaced by a stand-in module with the
same functions (the hardware is what is absent; tests/gpu/ runs the real NVML on a GPU)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
from meshserve.nodeagent.devices import NvmlProbe, open_probe

GIB = 1 << 30


class NVMLError(Exception):
    pass


@dataclass
class Dev:
    uuid: str
    total: int
    used: int
    util: int = 0
    mig: int = 0
    procs: list[tuple[int, int | None]] = field(default_factory=list)
    children: list[Dev | None] = field(default_factory=list)  # MIG slots (None: empty)
    broken: bool = False


def nvml(gpus: list[Dev]) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    state = {"init": 0}

    def check(d: Dev) -> Dev:
        if d.broken:
            raise NVMLError("GPU is lost")
        return d

    def mem(d: Dev) -> object:
        d = check(d)
        return types.SimpleNamespace(total=d.total, used=d.used)

    def slot(d: Dev, i: int) -> Dev:
        child = d.children[i]
        if child is None:
            raise NVMLError("not found")
        return child

    funcs = {
        "nvmlInit": lambda: state.__setitem__("init", 1),
        "nvmlShutdown": lambda: state.__setitem__("init", 0),
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda i: gpus[i],
        "nvmlDeviceGetMemoryInfo": mem,
        "nvmlDeviceGetUUID": lambda d: check(d).uuid.encode(),
        "nvmlDeviceGetName": lambda d: b"NVIDIA A100-SXM4-40GB",
        "nvmlDeviceGetUtilizationRates": lambda d: types.SimpleNamespace(gpu=check(d).util),
        "nvmlDeviceGetMigMode": lambda d: (check(d).mig, d.mig),
        "nvmlDeviceGetComputeRunningProcesses": lambda d: [
            types.SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in check(d).procs
        ],
        "nvmlDeviceGetMaxMigDeviceCount": lambda d: len(d.children),
        "nvmlDeviceGetMigDeviceHandleByIndex": slot,
    }
    for name, fn in funcs.items():
        setattr(m, name, fn)
    return m


def install(monkeypatch: pytest.MonkeyPatch, gpus: list[Dev]) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml(gpus))


def test_gpus_memory_utilization_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    install(
        monkeypatch,
        [
            Dev("GPU-a", 40 * GIB, 5 * GIB, util=37, procs=[(101, 4 * GIB), (102, None)]),
            Dev("GPU-b", 40 * GIB, 0),
        ],
    )
    probe = open_probe("auto")
    assert isinstance(probe, NvmlProbe)
    report = probe.read()
    a, b = report.gpus
    assert (a.uuid, a.index, a.memory_total_bytes, a.memory_used_bytes) == (
        "GPU-a",
        0,
        40 * GIB,
        5 * GIB,
    )
    assert a.utilization == pytest.approx(0.37)
    assert [(p.pid, p.used_memory_bytes) for p in a.processes] == [(101, 4 * GIB), (102, 0)]
    assert b.index == 1 and not b.mig
    assert report.host_total_bytes > 0


def test_mig_gpus_are_reported_as_their_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    slices = [Dev("MIG-1", 10 * GIB, GIB, procs=[(7, GIB)]), None, Dev("MIG-2", 20 * GIB, 0)]
    install(monkeypatch, [Dev("GPU-m", 40 * GIB, GIB, mig=1, children=slices)])
    gpus = NvmlProbe().read().gpus
    assert [(g.uuid, g.memory_total_bytes, g.mig) for g in gpus] == [
        ("MIG-1", 10 * GIB, True),
        ("MIG-2", 20 * GIB, True),
    ]
    assert gpus[0].processes[0].pid == 7 and "MIG" in gpus[0].name


def test_a_lost_gpu_becomes_an_error_device_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [Dev("GPU-a", 40 * GIB, 0, broken=True), Dev("GPU-b", 40 * GIB, 0)])
    gpus = NvmlProbe().read().gpus
    assert gpus[0].name.startswith("error:") and gpus[0].memory_total_bytes == 0
    assert gpus[1].uuid == "GPU-b"


def test_no_driver_falls_back_to_the_host_unless_cuda_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, [])  # NVML answers but finds no GPU
    assert open_probe("auto").kind == "cpu"
    with pytest.raises(RuntimeError, match="NVML is not usable"):
        open_probe("cuda")
