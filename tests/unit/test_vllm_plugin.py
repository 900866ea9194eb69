"""The vLLM general plugin (engines/vllm_plugin.py): AMX tile state, and vLLM's processes tied to
their parent."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import psutil
import pytest
from meshserve import lifeline
from meshserve.nodeagent.engines import vllm_plugin

from tests.waiting import eventually


def test_the_plugin_is_an_installed_vllm_general_plugin() -> None:
    """vLLM finds general plugins by this entry-point group in every process it starts; the
    installed metadata must point at our register function."""
    found = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert "meshserve_amx" in found, sorted(found)
    assert found["meshserve_amx"].load() is vllm_plugin.register


def test_amx_state_is_granted_where_the_cpu_has_amx() -> None:
    """On an AMX CPU (e.g. the CI machine's Emerald Rapids) the kernel grants the request; on a
    CPU without AMX nothing is asked."""
    amx = " amx_tile" in Path("/proc/cpuinfo").read_text()
    assert vllm_plugin.request_amx() is (True if amx else None)


def _child(path: str) -> None:
    """A stand-in for vLLM's engine core: watches its parent, spawns a "worker", then idles."""
    lifeline.WATCH_S = 0.1
    assert vllm_plugin.die_with_parent()
    worker = subprocess.Popen(["sleep", "600"])
    Path(path).write_text(f"{os.getpid()} {worker.pid}")
    time.sleep(600)


def _late_child(path: str) -> None:
    """vLLM loads its plugins seconds into a process's life: the parent may be gone by then."""
    lifeline.WATCH_S = 0.1
    creator = multiprocessing.parent_process()
    assert creator is not None
    Path(path).write_text(f"{os.getpid()} {os.getpid()}")
    while os.getppid() == creator.pid:
        time.sleep(0.05)
    vllm_plugin.die_with_parent()
    time.sleep(600)


def _env_child(path: str) -> None:
    """As an engine core the agent spawns: its environment asks for the watch, and it starts by
    re-importing the agent's main module (meshserve.cli); then it waits, as a core whose agent
    died mid-start waits for its handshake, without ever loading vLLM's plugins."""
    import meshserve.cli  # noqa: F401

    lifeline.WATCH_S = 0.1
    worker = subprocess.Popen(["sleep", "600"])
    Path(path).write_text(f"{os.getpid()} {worker.pid}")
    time.sleep(600)


MIDDLE = """
import multiprocessing, sys, time
from tests.unit import test_vllm_plugin
target = getattr(test_vllm_plugin, sys.argv[2])
multiprocessing.get_context("spawn").Process(target=target, args=(sys.argv[1],)).start()
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("target", ["_child", "_late_child", "_env_child"])
def test_a_spawned_process_exits_with_its_children_when_its_parent_is_killed(
    tmp_path: Path, target: str
) -> None:
    """The agent (here a process that spawns as vLLM does) is killed with SIGKILL: the process it
    spawned (the engine core) and that one's child (a worker) exit, instead of running on
    with the memory they hold; also when the parent was gone before the watch began, and when
    only the agent's environment asked for it (vLLM not loaded yet)."""
    pids = tmp_path / "pids"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, lifeline.WATCH_ENV: "1"} if target == "_env_child" else None
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, str(pids), target], cwd=root, env=env)
    try:
        asyncio.run(eventually(lambda: pids.exists() and pids.read_text(), 60, "the core up"))
        core, worker = map(int, pids.read_text().split())
        middle.kill()
        middle.wait(10)
        asyncio.run(eventually(lambda: _gone(core) and _gone(worker), 10, "core, worker gone"))
    finally:
        middle.kill()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if pids.exists() and p.pid in map(int, pids.read_text().split()):
                    p.kill()


def test_a_process_not_spawned_by_multiprocessing_does_not_watch() -> None:
    """The agent itself, or vLLM's own server: their launcher watches them (meshserve.lifeline)."""
    assert vllm_plugin.die_with_parent() is False
