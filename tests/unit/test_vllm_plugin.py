"""The vLLM general plugin that asks Linux for AMX tile state (engines/vllm_plugin.py)."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from meshserve.nodeagent.engines import vllm_plugin


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
