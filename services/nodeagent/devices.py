"""What a node has: NVIDIA GPUs through NVML (``nvidia-ml-py``), or the host's memory when there
is no driver. Both implement `DeviceProbe`; the agent never asks which one it has.

NVML errors after start-up (a GPU fallen off the bus, a driver reload) are reported in the GPU's
``name`` as ``error: …`` with zero memory and FAILED health, so the scheduler stops placing there,
instead of crashing the agent. Each GPU's health (gpu_health.py) is judged at every reading from
NVML's counters and its Xid events; the agent tells the probe of engines that died on a device
and of an operator's clearing of one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

from meshserve.nodeagent.gpu_health import FAILED, History, Signals, judge
from meshserve.v1 import cluster_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReport:
    kind: str  # "cuda" or "cpu"
    gpus: tuple[cluster_pb2.GpuDevice, ...]
    host_total_bytes: int
    host_available_bytes: int


class DeviceProbe(Protocol):
    kind: str

    def read(self) -> DeviceReport:
        """Current memory, utilization and health; never raises for a device fault."""

    def engine_died(self, uuid: str) -> None:
        """An engine on device ``uuid`` (a GPU or MIG instance) died: it counts against it."""

    def clear(self, uuid: str) -> None:
        """An operator cleared device ``uuid``: forget what was seen of it before now."""

    def close(self) -> None: ...


XID_CRITICAL_ERROR = 0x8  # nvmlEventTypeXidCriticalError
GPU_IS_LOST = 15  # NVML_ERROR_GPU_IS_LOST
_HOST_MEMORY_TTL_S = 0.5  # agents of one process (a simulated fleet) share one reading
_host_memory_read: tuple[float, tuple[int, int]] = (-1.0, (0, 0))


def host_memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo, read at most every half second in a
    process; (0, 0) where there is none."""
    global _host_memory_read
    now = time.monotonic()
    if now - _host_memory_read[0] < _HOST_MEMORY_TTL_S:
        return _host_memory_read[1]
    _host_memory_read = (now, _read_meminfo())
    return _host_memory_read[1]


def _read_meminfo() -> tuple[int, int]:
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
    except OSError:
        return 0, 0
    return fields.get("MemTotal", 0), fields.get("MemAvailable", fields.get("MemFree", 0))


class HostProbe:
    """No GPU: the serving device is the CPU and its memory is host RAM."""

    kind = "cpu"

    def read(self) -> DeviceReport:
        total, available = host_memory()
        return DeviceReport("cpu", (), total, available)

    def engine_died(self, uuid: str) -> None:
        pass  # no device of its own to blame

    def clear(self, uuid: str) -> None:
        pass

    def close(self) -> None:
        pass


class NvmlProbe:
    """NVIDIA GPUs through NVML. Construction raises when no driver is present."""

    kind = "cuda"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._count = pynvml.nvmlDeviceGetCount()
        if self._count == 0:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPU")
        self._histories: dict[str, History] = {}  # per GPU uuid
        self._uuids: dict[int, str] = {}  # index → uuid, kept for a GPU that is lost later
        self._parent: dict[str, str] = {}  # MIG instance uuid → its GPU's
        self._last: dict[str, Signals] = {}
        self._events = self._watch_xids()

    def _watch_xids(self) -> Any:
        """An NVML event set for every GPU's critical Xid events (None where unsupported)."""
        nv = self._nvml
        try:
            events = nv.nvmlEventSetCreate()
        except (nv.NVMLError, AttributeError) as e:
            log.info("NVML events unsupported (%s): Xid errors are not watched", e)
            return None
        for i in range(self._count):
            with contextlib.suppress(nv.NVMLError):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                nv.nvmlDeviceRegisterEvents(handle, XID_CRITICAL_ERROR, events)
        return events

    def _drain_xids(self) -> None:
        """Every Xid event since the last reading, into its GPU's history (never blocks)."""
        nv = self._nvml
        while self._events is not None:
            try:
                event = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:
                return  # NVML_ERROR_TIMEOUT: no more events
            try:
                uuid = _text(nv.nvmlDeviceGetUUID(event.device))
            except nv.NVMLError:
                continue
            uuid = self._parent.get(uuid, uuid)
            log.warning("Xid %d on %s", event.eventData, uuid)
            self._histories.setdefault(uuid, History()).xids.append(int(event.eventData))

    def _signals(self, handle: Any) -> Signals:
        """What NVML says of one GPU's health; each query NVML cannot answer on this GPU (not
        supported, no permission) is left out."""
        nv = self._nvml
        got: dict[str, Any] = {}

        def ask(key: str, function: str, *args: Any) -> None:
            fn = getattr(nv, function, None)  # an older nvidia-ml-py may lack it
            if fn is None:
                return
            try:
                got[key] = fn(handle, *args)
            except nv.NVMLError as e:
                if getattr(e, "value", None) == GPU_IS_LOST:
                    raise

        ask("ecc", "nvmlDeviceGetTotalEccErrors", 1, 0)  # uncorrected, volatile
        ask("retired", "nvmlDeviceGetRetiredPagesPendingStatus")
        ask("remap", "nvmlDeviceGetRemappedRows")
        ask("throttle", "nvmlDeviceGetCurrentClocksEventReasons")
        ask("width", "nvmlDeviceGetCurrPcieLinkWidth")
        ask("max_width", "nvmlDeviceGetMaxPcieLinkWidth")
        remap = got.get("remap", (0, 0, 0, 0))
        return Signals(
            ecc_uncorrected=int(got.get("ecc", 0)),
            retired_pending=bool(got.get("retired", 0)),
            remap_pending=bool(remap[2]),
            remap_failed=bool(remap[3]),
            throttle=int(got.get("throttle", 0)),
            pcie_width=int(got.get("width", 0)),
            pcie_max_width=int(got.get("max_width", 0)),
        )

    def _judge(self, gpu: cluster_pb2.GpuDevice, signals: Signals) -> None:
        self._last[gpu.uuid] = signals
        health, reasons = judge(signals, self._histories.setdefault(gpu.uuid, History()))
        gpu.health = health  # type: ignore[assignment]
        gpu.health_reasons[:] = reasons

    def engine_died(self, uuid: str) -> None:
        uuid = self._parent.get(uuid, uuid)
        self._histories.setdefault(uuid, History()).engine_deaths += 1

    def clear(self, uuid: str) -> None:
        uuid = self._parent.get(uuid, uuid)
        self._histories.setdefault(uuid, History()).clear(self._last.get(uuid, Signals()))

    def _gpu(self, index: int) -> cluster_pb2.GpuDevice:
        nv = self._nvml
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            self._uuids[index] = _text(nv.nvmlDeviceGetUUID(h))
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            gpu = cluster_pb2.GpuDevice(
                uuid=_text(nv.nvmlDeviceGetUUID(h)),
                name=_text(nv.nvmlDeviceGetName(h)),
                index=index,
                memory_total_bytes=int(mem.total),
                memory_used_bytes=int(mem.used),
            )
            with contextlib.suppress(nv.NVMLError):  # not supported on some MIG configurations
                gpu.utilization = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            try:
                current, _pending = nv.nvmlDeviceGetMigMode(h)
                gpu.mig = bool(current)
            except nv.NVMLError:
                pass  # GPUs without MIG
            self._add_processes(h, gpu)
            self._judge(gpu, self._signals(h))
            return gpu
        except nv.NVMLError as e:
            log.warning("NVML error on GPU %d: %s", index, e)
            lost = getattr(e, "value", None) == GPU_IS_LOST
            gpu = cluster_pb2.GpuDevice(
                index=index, uuid=self._uuids.get(index, ""), name=f"error: {e}"
            )
            if lost or gpu.uuid:  # a device we know went bad: say so by its uuid
                self._judge(gpu, Signals(lost=True) if lost else Signals())
            if not lost:
                gpu.health = FAILED  # type: ignore[assignment]
                gpu.health_reasons.append(f"NVML: {e}")
            return gpu

    def _add_processes(self, handle: object, device: cluster_pb2.GpuDevice) -> None:
        """The compute processes on a GPU or MIG instance and the memory each uses (none where
        NVML cannot say, e.g. without the permission)."""
        nv = self._nvml
        with contextlib.suppress(nv.NVMLError):
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                used = proc.usedGpuMemory if proc.usedGpuMemory is not None else 0
                device.processes.add(pid=int(proc.pid), used_memory_bytes=int(used))

    def _mig_instances(
        self, index: int, parent: cluster_pb2.GpuDevice
    ) -> list[cluster_pb2.GpuDevice]:
        """The MIG instances of GPU ``index`` when MIG is on: each is a device of its own for
        placement (memory, processes); empty when MIG is off or NVML cannot list them."""
        nv = self._nvml
        out: list[cluster_pb2.GpuDevice] = []
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            slots = nv.nvmlDeviceGetMaxMigDeviceCount(h)
        except nv.NVMLError:
            return out
        for slot in range(slots):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except nv.NVMLError:
                continue  # an empty slot
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(mh)
                mig = cluster_pb2.GpuDevice(
                    uuid=_text(nv.nvmlDeviceGetUUID(mh)),
                    name=f"{parent.name} MIG {slot}",
                    index=index,
                    memory_total_bytes=int(mem.total),
                    memory_used_bytes=int(mem.used),
                    mig=True,
                    health=parent.health,  # an instance is as healthy as its GPU
                    health_reasons=parent.health_reasons,
                )
                self._parent[mig.uuid] = parent.uuid
                self._add_processes(mh, mig)
                out.append(mig)
            except nv.NVMLError as e:
                log.warning("NVML error on MIG instance %d of GPU %d: %s", slot, index, e)
        return out

    def read(self) -> DeviceReport:
        """Every GPU; a GPU with MIG enabled is reported as its MIG instances (what a model can
        actually be given), or as itself when NVML cannot list them."""
        total, available = host_memory()
        self._drain_xids()
        gpus: list[cluster_pb2.GpuDevice] = []
        for i in range(self._count):
            gpu = self._gpu(i)
            instances = self._mig_instances(i, gpu) if gpu.mig else []
            gpus.extend(instances or [gpu])
        return DeviceReport("cuda", tuple(gpus), total, available)

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            if self._events is not None:
                self._nvml.nvmlEventSetFree(self._events)
            self._nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_probe(kind: str = "auto") -> DeviceProbe:
    """``auto``: NVML when a driver answers, else the host. ``cpu`` forces the host probe;
    ``cuda`` requires NVML and raises without it."""
    if kind == "cpu" or os.environ.get("MESHSERVE_FORCE_CPU") == "1":
        return HostProbe()
    try:
        return NvmlProbe()
    except Exception as e:
        if kind == "cuda":
            raise RuntimeError(f"--device cuda, but NVML is not usable: {e}") from e
        log.info("no NVIDIA GPU (%s); serving on the CPU", e)
        return HostProbe()


def capacity_bytes(report: DeviceReport, memory_limit: int) -> int:
    """Memory offered to models: the GPUs' total (or host memory on CPU), capped by the limit."""
    if report.gpus:
        offered = sum(g.memory_total_bytes for g in report.gpus)
    else:
        offered = int(report.host_total_bytes * 0.8)  # leave the OS and the agent room
    return min(offered, memory_limit) if memory_limit else offered
