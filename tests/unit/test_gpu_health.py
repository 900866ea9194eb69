"""GPU health: the pure verdict over NVML's signals (gpu_health.py, table-driven), and the agent's
NVML probe judging each GPU of a host described to the stand-in NVML (tests/standins/pynvml.py,
the GPUs being what is absent here), faults injected by rewriting its description."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from meshserve.nodeagent.gpu_health import DEGRADED, FAILED, OK, History, Signals, judge

STANDIN = Path(__file__).resolve().parents[1] / "standins" / "pynvml.py"


@pytest.mark.parametrize(
    ("signals", "history", "health", "reason"),
    [
        (Signals(), History(), OK, ""),  # a quiet GPU
        (Signals(lost=True), History(), FAILED, "the GPU is lost"),
        (Signals(), History(xids=[79]), FAILED, "Xid 79: the GPU fell off the bus"),
        (Signals(), History(xids=[48]), FAILED, "double-bit ECC"),
        (Signals(), History(xids=[94]), DEGRADED, "Xid 94: contained ECC error"),
        (Signals(), History(xids=[13, 31, 43]), OK, ""),  # application faults, not the device's
        # uncorrected ECC counts from the baseline: 3 already there at start are not new
        (Signals(ecc_uncorrected=5), History(ecc_baseline=3), FAILED, "2 uncorrectable ECC"),
        (Signals(ecc_uncorrected=3), History(ecc_baseline=3), OK, ""),
        (Signals(remap_failed=True), History(), FAILED, "row remapping failed"),
        (Signals(remap_pending=True), History(), DEGRADED, "remapped rows wait for a reset"),
        (Signals(retired_pending=True), History(), DEGRADED, "retired pages wait"),
        (Signals(throttle=0x40), History(), DEGRADED, "HW thermal slowdown"),
        (Signals(throttle=0x4 | 0x1), History(), OK, ""),  # power cap, idle: normal
        (Signals(pcie_width=8, pcie_max_width=16), History(), DEGRADED, "PCIe link x8 of x16"),
        (Signals(), History(engine_deaths=1), DEGRADED, "1 engine(s) died on it"),
        (Signals(), History(engine_deaths=3), FAILED, "3 engines died on it"),
        # the worst level wins, every reason is kept
        (Signals(throttle=0x8), History(xids=[79]), FAILED, "HW slowdown"),
    ],
)
def test_the_verdict_of_each_signal(
    signals: Signals, history: History, health: int, reason: str
) -> None:
    got, reasons = judge(signals, history)
    assert got == health, reasons
    assert reason in " ".join(reasons)
    assert bool(reasons) == (health != OK)


def test_a_cleared_device_is_judged_from_then_on() -> None:
    history = History(xids=[79], engine_deaths=3)
    assert judge(Signals(ecc_uncorrected=7), history)[0] == FAILED
    history.clear(Signals(ecc_uncorrected=7))
    assert judge(Signals(ecc_uncorrected=7), history) == (OK, ())
    assert judge(Signals(ecc_uncorrected=8), history)[0] == FAILED  # a new one after the clear


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two GPUs, the second in MIG mode with two instances, behind the stand-in NVML."""
    path = tmp_path / "nvml.json"
    write(path, {})
    monkeypatch.setenv("MESHSERVE_STANDIN_NVML", str(path))
    spec = importlib.util.spec_from_file_location("pynvml", STANDIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return path


def write(
    path: Path, faults: dict[str, object], mig_faults: dict[str, object] | None = None
) -> None:
    children = [{"uuid": f"MIG-1-{k}", "total": 10 << 30} for k in range(2)]
    gpus = [
        {"uuid": "GPU-0", "total": 80 << 30, **faults},
        {"uuid": "GPU-1", "total": 80 << 30, **(mig_faults or {}), "children": children},
    ]
    path.write_text(json.dumps({"gpus": gpus}))


def health_of(probe: object) -> dict[str, tuple[int, tuple[str, ...]]]:
    from meshserve.nodeagent.devices import NvmlProbe

    assert isinstance(probe, NvmlProbe)
    return {g.uuid: (g.health, tuple(g.health_reasons)) for g in probe.read().gpus}


def test_the_probe_judges_each_gpu_and_its_mig_instances(host: Path) -> None:
    from meshserve.nodeagent.devices import NvmlProbe

    probe = NvmlProbe()
    assert {u: h for u, (h, _r) in health_of(probe).items()} == {
        "GPU-0": OK, "MIG-1-0": OK, "MIG-1-1": OK,
    }  # fmt: skip
    write(host, {"xids": [79], "throttle": 0x80}, {"pcie": [4, 16]})
    got = health_of(probe)
    assert got["GPU-0"][0] == FAILED
    assert got["GPU-0"][1] == ("Xid 79: the GPU fell off the bus", "HW power brake slowdown")
    assert got["MIG-1-0"] == got["MIG-1-1"] == (DEGRADED, ("PCIe link x4 of x16",))
    assert health_of(probe)["GPU-0"][0] == FAILED  # an Xid is remembered, not a passing event
    probe.clear("GPU-0")  # an operator reset it
    write(host, {})
    assert health_of(probe)["GPU-0"] == (OK, ())
    for _ in range(3):  # engines keep dying on a MIG instance: its GPU takes the blame
        probe.engine_died("MIG-1-1")
    write(host, {})
    assert health_of(probe)["MIG-1-0"][0] == FAILED
    write(host, {"lost": True})
    lost = health_of(probe)["GPU-0"]  # still named by its uuid, so placements can avoid it
    assert lost[0] == FAILED and "the GPU is lost" in " ".join(lost[1])
    probe.close()
