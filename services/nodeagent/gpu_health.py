"""A GPU's health from what NVML says of it (pure: signals in, a verdict out).

What fleets evacuate on (NVIDIA's Xid catalogue, DCGM's health watches, node-problem-detector's
GPU rules), in three levels:

- FAILED (no placements; its replicas are moved off, make before break): the GPU is lost
  (``NVML_ERROR_GPU_IS_LOST``, Xid 79), uncorrectable memory errors (volatile uncorrected ECC,
  Xid 48/95/140, a row remap that failed, Xid 64), other fatal Xids (74 NVLink, 119/120 GSP), or
  engines dying on it again and again.
- DEGRADED (placed on last): clocks slowed by the hardware (HW slowdown, thermal, power brake),
  a PCIe link narrower than it can be, pages or rows waiting for a reset to be retired or
  remapped, a warning Xid (63 row remap recorded, 92 high single-bit ECC rate, 94 contained
  ECC error), or one engine that died on it.
- OK otherwise. Application faults (Xid 13, 31, 43, 45 …) are the program's, not the device's.

Counts are taken relative to a baseline: what the device had when the agent started, or when an
operator last cleared it (`meshserve node uncordon NODE --device UUID`), so a device that was
repaired is judged on what happens after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.v1 import cluster_pb2

OK, DEGRADED, FAILED = (
    cluster_pb2.DEVICE_HEALTH_OK,
    cluster_pb2.DEVICE_HEALTH_DEGRADED,
    cluster_pb2.DEVICE_HEALTH_FAILED,
)
FATAL_XIDS = {
    48: "double-bit ECC error",
    64: "row remapping failed",
    74: "NVLink error",
    79: "the GPU fell off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}
WARNING_XIDS = {
    63: "a row remapping was recorded",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
}
# NVML's clocks-event reasons that mean the hardware is holding the GPU back (not a power cap
# or an idle clock, which are normal).
THROTTLES = {
    0x8: "HW slowdown",
    0x40: "HW thermal slowdown",
    0x80: "HW power brake slowdown",
}
DEATHS_DEGRADED, DEATHS_FAILED = 1, 3  # engines that died on the device since its baseline


@dataclass(frozen=True)
class Signals:
    """What NVML reported of one GPU at one reading (the agent adds the engine deaths)."""

    lost: bool = False  # NVML_ERROR_GPU_IS_LOST on a call
    ecc_uncorrected: int = 0  # volatile uncorrected ECC errors (since the driver loaded)
    retired_pending: bool = False  # retired pages waiting for a reset
    remap_pending: bool = False  # remapped rows waiting for a reset
    remap_failed: bool = False  # a row remapping failed
    throttle: int = 0  # clocks-event reasons bitmask
    pcie_width: int = 0  # current link width (lanes); 0 = unknown
    pcie_max_width: int = 0  # what the link can do; 0 = unknown


@dataclass
class History:
    """One device's baseline and what happened since (the agent's memory of it)."""

    ecc_baseline: int | None = None  # the uncorrected ECC count at the baseline
    xids: list[int] = field(default_factory=list)  # Xid events since the baseline
    engine_deaths: int = 0

    def clear(self, now: Signals) -> None:
        """An operator says the device is fine: judge it from here on."""
        self.ecc_baseline = now.ecc_uncorrected
        self.xids.clear()
        self.engine_deaths = 0


def judge(now: Signals, history: History) -> tuple[int, tuple[str, ...]]:
    """(health, reasons) of a device from its signals and its history since the baseline."""
    if history.ecc_baseline is None:  # first reading: what it had before counts as old news
        history.ecc_baseline = now.ecc_uncorrected
    failed: list[str] = []
    degraded: list[str] = []
    if now.lost:
        failed.append("NVML: the GPU is lost")
    new_ecc = now.ecc_uncorrected - history.ecc_baseline
    if new_ecc > 0:
        failed.append(f"{new_ecc} uncorrectable ECC error(s)")
    if now.remap_failed:
        failed.append("a row remapping failed")
    for xid in sorted(set(history.xids)):
        if xid in FATAL_XIDS:
            failed.append(f"Xid {xid}: {FATAL_XIDS[xid]}")
        elif xid in WARNING_XIDS:
            degraded.append(f"Xid {xid}: {WARNING_XIDS[xid]}")
    if history.engine_deaths >= DEATHS_FAILED:
        failed.append(f"{history.engine_deaths} engines died on it")
    elif history.engine_deaths >= DEATHS_DEGRADED:
        degraded.append(f"{history.engine_deaths} engine(s) died on it")
    if now.retired_pending:
        degraded.append("retired pages wait for a reset")
    if now.remap_pending:
        degraded.append("remapped rows wait for a reset")
    degraded += [name for bit, name in THROTTLES.items() if now.throttle & bit]
    if now.pcie_width and now.pcie_max_width and now.pcie_width < now.pcie_max_width:
        degraded.append(f"PCIe link x{now.pcie_width} of x{now.pcie_max_width}")
    if failed:
        return FAILED, tuple(failed + degraded)
    if degraded:
        return DEGRADED, tuple(degraded)
    return OK, ()
