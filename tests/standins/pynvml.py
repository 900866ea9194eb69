"""A stand-in for NVML (``pynvml``) in processes the tests start: the GPUs are absent here, so
this module answers NVML's calls from a JSON description named by ``MESHSERVE_STANDIN_NVML``.
Put this folder first on PYTHONPATH of the process (only ours import top-level ``pynvml``; vLLM
uses its own copy). The functions are the ones meshserve's NvmlProbe calls, with NVML's shapes.

    {"gpus": [{"uuid": "GPU-…", "total": bytes, "children": [{"uuid": "MIG-…", "total": …}]}]}

A GPU with children is in MIG mode; its children are its MIG instances. Faults a test injects
(the file is read at every call, so rewriting it injects them into a running agent), per GPU:
``"lost": true`` (every call fails with NVML_ERROR_GPU_IS_LOST), ``"xids": [79, …]`` (each
delivered once as a critical-Xid event), ``"ecc_uncorrected": n``, ``"retired_pending": true``,
``"remap": [corrected, uncorrected, pending, failed]``, ``"throttle": bitmask`` (NVML's
clocks-event reasons), ``"pcie": [width, max_width]``.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
nvmlEventTypeXidCriticalError = 0x8


class NVMLError(Exception):
    def __init__(self, message: str, value: int = 999) -> None:
        super().__init__(message)
        self.value = value


_delivered: dict[str, int] = {}  # GPU uuid → Xid events already delivered


def _alive(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("lost"):
        raise NVMLError("GPU is lost", NVML_ERROR_GPU_IS_LOST)
    return d


def _spec() -> list[dict[str, Any]]:
    path = os.environ.get("MESHSERVE_STANDIN_NVML", "")
    if not path:
        raise NVMLError("MESHSERVE_STANDIN_NVML is not set")
    with open(path) as f:
        gpus: list[dict[str, Any]] = json.load(f)["gpus"]
    return gpus


def nvmlInit() -> None:
    _spec()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_spec())


def nvmlDeviceGetHandleByIndex(i: int) -> dict[str, Any]:
    return _spec()[i]


def nvmlDeviceGetMemoryInfo(d: dict[str, Any]) -> Any:
    d = _alive(d)
    return types.SimpleNamespace(total=d["total"], used=d.get("used", 0))


def nvmlDeviceGetUUID(d: dict[str, Any]) -> bytes:
    return str(_alive(d)["uuid"]).encode()


def nvmlDeviceGetName(d: dict[str, Any]) -> bytes:
    return str(d.get("name", "NVIDIA H100 80GB HBM3")).encode()


def nvmlDeviceGetUtilizationRates(d: dict[str, Any]) -> Any:
    return types.SimpleNamespace(gpu=0)


def nvmlDeviceGetMigMode(d: dict[str, Any]) -> tuple[int, int]:
    mode = 1 if d.get("children") else 0
    return (mode, mode)


def nvmlDeviceGetComputeRunningProcesses(d: dict[str, Any]) -> list[Any]:
    return []


def nvmlDeviceGetMaxMigDeviceCount(d: dict[str, Any]) -> int:
    return len(d.get("children", []))


def nvmlDeviceGetMigDeviceHandleByIndex(d: dict[str, Any], i: int) -> dict[str, Any]:
    child: dict[str, Any] = d["children"][i]
    return child


def nvmlDeviceGetTotalEccErrors(d: dict[str, Any], error_type: int, counter: int) -> int:
    return int(_alive(d).get("ecc_uncorrected", 0))


def nvmlDeviceGetRetiredPagesPendingStatus(d: dict[str, Any]) -> int:
    return int(bool(_alive(d).get("retired_pending")))


def nvmlDeviceGetRemappedRows(d: dict[str, Any]) -> tuple[int, int, int, int]:
    remap = _alive(d).get("remap", [0, 0, 0, 0])
    return (int(remap[0]), int(remap[1]), int(remap[2]), int(remap[3]))


def nvmlDeviceGetCurrentClocksEventReasons(d: dict[str, Any]) -> int:
    return int(_alive(d).get("throttle", 0))


def nvmlDeviceGetCurrPcieLinkWidth(d: dict[str, Any]) -> int:
    return int(_alive(d).get("pcie", [16, 16])[0])


def nvmlDeviceGetMaxPcieLinkWidth(d: dict[str, Any]) -> int:
    return int(_alive(d).get("pcie", [16, 16])[1])


def nvmlEventSetCreate() -> list[str]:
    return []  # the GPU uuids registered


def nvmlDeviceRegisterEvents(d: dict[str, Any], types_: int, event_set: list[str]) -> None:
    event_set.append(str(d["uuid"]))


def nvmlEventSetWait_v2(event_set: list[str], timeout_ms: int) -> Any:
    """The next Xid of a registered GPU not yet delivered; NVML_ERROR_TIMEOUT when none."""
    by_uuid = {str(g["uuid"]): g for g in _spec()}
    for uuid in event_set:
        gpu = by_uuid.get(uuid)
        xids = gpu.get("xids", []) if gpu else []
        seen = _delivered.get(uuid, 0)
        if seen < len(xids):
            _delivered[uuid] = seen + 1
            return types.SimpleNamespace(
                device=gpu, eventType=nvmlEventTypeXidCriticalError, eventData=xids[seen]
            )
    raise NVMLError("Timeout", NVML_ERROR_TIMEOUT)


def nvmlEventSetFree(event_set: list[str]) -> None:
    pass
