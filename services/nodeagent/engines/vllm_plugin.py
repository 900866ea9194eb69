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

import contextlib
import ctypes
import logging
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

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


PARENT_WATCH_S = 1.0  # how often a spawned vLLM process looks for its parent
_watching = False


def die_with_parent() -> bool:
    """In a process spawned by `multiprocessing` (vLLM's engine core, a model worker): once its
    parent is gone (it was reparented), kill what it spawned and exit. True when watching.

    Not ``PR_SET_PDEATHSIG``: Linux sends that when the parent *thread* ends, and the agent
    builds engines in a thread that ends as soon as the engine is up (vllm_build.py), which
    would kill every healthy engine core. A daemon thread polling ``getppid`` costs nothing."""
    global _watching
    creator = multiprocessing.parent_process()
    if _watching or creator is None or creator.pid is None:
        return _watching  # the agent (or vLLM's own server) itself: its launcher watches it
    _watching = True
    # The creator's pid, not getppid(): vLLM loads plugins seconds after the process starts,
    # and a parent that died before that has already been replaced by init (or a subreaper).
    parent = creator.pid
    threading.Thread(target=_watch, args=(parent,), name="meshserve-parent", daemon=True).start()
    return True


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_WATCH_S)
    log.warning(
        "vLLM process %d: parent %d is gone; exiting with its children", os.getpid(), parent
    )
    import psutil  # vLLM's own dependency

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    request_amx()
    die_with_parent()
