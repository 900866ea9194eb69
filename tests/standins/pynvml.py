"""A stand-in for NVML (``pynvml``) in processes the tests start: the GPUs are absent here, so
this module answers NVML's calls from a JSON description named by ``MESHSERVE_STANDIN_NVML``.
Put this folder first on PYTHONPATH of the process (only ours import top-level ``pynvml``; vLLM
uses its own copy). The functions are the ones meshserve's NvmlProbe calls, with NVML's shapes.

    {"gpus": [{"uuid": "GPU-…", "total": bytes, "children": [{"uuid": "MIG-…", "total": …}]}]}

A GPU with children is in MIG mode; its children are its MIG instances.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any


class NVMLError(Exception):
    pass


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
    return types.SimpleNamespace(total=d["total"], used=d.get("used", 0))


def nvmlDeviceGetUUID(d: dict[str, Any]) -> bytes:
    return str(d["uuid"]).encode()


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
