"""A module's tensors packed into one contiguous byte buffer, so a tier change is one big copy.

Offloading to CPU RAM copies every parameter and buffer into one (pinned, on CUDA hosts) host
buffer and points the module at views of it; restoring allocates one device buffer and copies it
over in a single transfer, which runs near the raw host→device bandwidth instead of paying a
launch per tensor. The disk tier writes the same buffer as one safetensors file and reads it back
straight into a pinned buffer (`readinto`, no intermediate copy). The file is written under a
temporary name, fsynced and renamed (a crash or a full disk never leaves a half-written file
under the real name), and carries a CRC-32 of the buffer that a restore checks (a file damaged
on disk is refused, never run as weights).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 64  # bytes; keeps every view aligned for any dtype


@dataclass(frozen=True)
class Slot:
    owner: str  # module path ("" for the root)
    name: str  # attribute on that module
    is_param: bool
    offset: int  # bytes into the flat buffer
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def layout(module: torch.nn.Module) -> tuple[list[Slot], int]:
    """Where each tensor goes in the flat buffer; tied tensors get one slot per owner."""
    slots: list[Slot] = []
    seen: dict[int, Slot] = {}
    offset = 0
    for owner, mod in module.named_modules():
        tensors = [(n, t, True) for n, t in mod._parameters.items() if t is not None]
        tensors += [(n, t, False) for n, t in mod._buffers.items() if t is not None]
        for name, t, is_param in tensors:
            key = id(t)
            if key in seen:  # tied weights: same storage, same slot
                s = seen[key]
                slots.append(Slot(owner, name, is_param, s.offset, s.nbytes, s.dtype, s.shape))
                continue
            nbytes = t.numel() * t.element_size()
            slot = Slot(owner, name, is_param, offset, nbytes, t.dtype, tuple(t.shape))
            seen[key] = slot
            slots.append(slot)
            offset += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    return slots, offset


def _modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(module.named_modules())


def pack(module: torch.nn.Module, pin: bool) -> tuple[torch.Tensor, list[Slot]]:
    """Copies every tensor into one host buffer and points the module at views of it."""
    slots, total = layout(module)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    mods = _modules(module)
    done: set[int] = set()
    for s in slots:
        mod = mods[s.owner]
        t = mod._parameters[s.name] if s.is_param else mod._buffers[s.name]
        assert t is not None
        if s.offset not in done:
            host[s.offset : s.offset + s.nbytes].copy_(
                t.detach().contiguous().view(-1).view(torch.uint8)
            )
            done.add(s.offset)
    point(module, slots, host)
    return host, slots


def point(module: torch.nn.Module, slots: list[Slot], flat: torch.Tensor) -> None:
    """Makes every tensor of ``module`` a view into ``flat`` (host or device)."""
    mods = _modules(module)
    for s in slots:
        view = flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
        mod = mods[s.owner]
        if s.is_param:
            param = mod._parameters[s.name]
            assert param is not None
            param.data = view
        else:
            mod._buffers[s.name] = view


def release(module: torch.nn.Module, slots: list[Slot]) -> None:
    """Drops every tensor's storage (the module keeps its structure, ready for `point`)."""
    mods = _modules(module)
    for s in slots:
        mod = mods[s.owner]
        empty = torch.empty(0, dtype=s.dtype)
        if s.is_param:
            param = mod._parameters[s.name]
            assert param is not None
            param.data = empty
        else:
            mod._buffers[s.name] = empty


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host→device copy of the whole buffer. On a CPU device the host buffer already is device
    memory: it is returned as is (a copy would only add page faults)."""
    if device.type == "cpu":
        return host
    out = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    out.copy_(host, non_blocking=host.is_pinned())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def save(host: torch.Tensor, slots: list[Slot], path: Path) -> None:
    """Writes the buffer as a one-tensor safetensors file (layout in its metadata)."""
    meta = [
        [s.owner, s.name, s.is_param, s.offset, s.nbytes, str(s.dtype), list(s.shape)]
        for s in slots
    ]
    data = memoryview(host.numpy())  # type: ignore[arg-type]
    header = {
        "flat": {"dtype": "U8", "shape": [host.numel()], "data_offsets": [0, host.numel()]},
        "__metadata__": {
            "meshserve.layout": json.dumps(meta),
            "meshserve.crc32": str(zlib.crc32(data)),
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. ENOSPC half-way: nothing is left behind
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def load(path: Path, pin: bool) -> torch.Tensor:
    """Reads a file written by `save` straight into a (pinned) host buffer."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        size = int(header["flat"]["shape"][0])
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(host.numpy())  # type: ignore[arg-type]
        read = 0
        while read < size:
            n = f.readinto(view[read:])
            if not n:
                raise EOFError(f"{path} is truncated")
            read += n
    expected = header.get("__metadata__", {}).get("meshserve.crc32")
    if expected is not None and zlib.crc32(view) != int(expected):
        raise ValueError(f"{path} is damaged (CRC-32 mismatch): not restoring from it")
    return host
