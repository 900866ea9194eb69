"""A vLLM general plugin (entry point ``vllm.general_plugins``): vLLM loads it in each of its
processes, the engine core and every model worker, before any model code runs.

It asks Linux for the AMX tile state. On x86 CPUs with AMX (Sapphire Rapids and later) vLLM's
CPU build runs bf16 attention on AMX tiles (``cpu_attn``: ISA "amx"), but Linux gives a process
the tile registers only after ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, which
vLLM 0.32's kernel never makes; the permission is cleared by exec, so vLLM's spawned workers
start without it and die of SIGILL (exit -4) on their first attention step. Checked on an
Emerald Rapids guest (kernel 6.18): without this request every vLLM replica died on its first
request; with it they serve. A CPU or kernel without AMX is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import platform
import sys
from pathlib import Path

from meshserve.lifeline import watch_parent

log = logging.getLogger(__name__)

SYS_ARCH_PRCTL = 158  # x86_64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def _has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_tile" in flags


def request_amx() -> bool | None:
    """Asks the kernel for this process's AMX tile state: True when granted, False when refused,
    None where the CPU has no AMX (nothing to ask)."""
    if sys.platform != "linux" or platform.machine() != "x86_64" or not _has_amx():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return True
    log.warning(
        "the kernel refused AMX tile state (errno %d): vLLM's AMX attention will fail",
        ctypes.get_errno(),
    )
    return False


def die_with_parent() -> bool:
    """In a process spawned by `multiprocessing` (vLLM's engine core, a model worker, also of
    vLLM's own server): `lifeline.watch_parent` of its creator. True when watching. The creator's
    pid, not getppid(): vLLM loads plugins seconds into a process's life, and a parent that died
    before that has already been replaced by init (or a subreaper)."""
    creator = multiprocessing.parent_process()
    if creator is None or creator.pid is None:
        return False  # the agent (or vLLM's own server) itself: its launcher watches it
    return watch_parent(creator.pid)


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    request_amx()
    die_with_parent()
