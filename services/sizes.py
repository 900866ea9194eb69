"""Byte sizes as people write them in flags and model files."""

from __future__ import annotations


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1.5GiB"`` or a plain number of bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    unit = t[len(number) :]
    if unit not in units:
        raise ValueError(f"unknown size unit in {text!r}")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None


def format_bytes(n: float) -> str:
    """``"410 KiB"``, ``"16.0 GiB"``: the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
