"""Hosts that can be cut apart: each service runs in a Linux network namespace of its own with an
address of its own on a private bridge (``ip netns`` + veth pairs; root only), so a partition
drops packets, both ways or one way, between two hosts, while each keeps every other link.

A cut is silent, as a partition in a fleet is: the sender's neighbour entry for the peer is
pinned to a MAC address nobody has, so its frames leave and vanish on the bridge, its sockets
see no error, and only silence (timeouts, keepalives) tells. (A blackhole route would fail each
send at once with EINVAL, a kindness no real network gives; ``tc netem`` and tc filters are
absent from this kernel.)

    hosts = Hosts()                    # a bridge 10.77.<n>.1/24 in this (the test's) namespace
    ip = hosts.add("agent-0")          # namespace, veth, 10.77.<n>.<k>, default route
    argv = hosts.wrap("agent-0", argv) # run a command inside it
    hosts.cut("router", "agent-0")     # both ways
    hosts.cut("agent-0", "router", one_way=True)  # agent-0's packets to the router are lost
    hosts.heal("router", "agent-0")
    hosts.close()

The test process stays in the root namespace and reaches every host through the bridge.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Sequence

NOWHERE = "02:00:00:00:00:00"  # a locally administered MAC address no interface has


def available() -> str:
    """ "" where namespaces can be made here; else why not (the tests that need them fail
    with it: CI runs as root)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"msprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]  # names stay unique beside any leftovers
        self.subnet = 100 + int(self.tag, 16) % 100  # 10.77.<subnet>.0/24
        self.bridge = f"msbr{self.tag}"
        self.gateway = f"10.77.{self.subnet}.1"
        self.addresses: dict[str, str] = {}
        self._namespaces: dict[str, str] = {}
        self._devices: dict[str, str] = {}  # host → its interface inside its namespace
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> str:
        """A host of its own for ``name``; returns its address."""
        k = len(self._namespaces) + 10
        ns, outer, inner = f"ms{self.tag}-{name}", f"ms{self.tag}o{k}", f"ms{self.tag}i{k}"
        address = f"10.77.{self.subnet}.{k}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("link", "set", inner, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway)
        self._namespaces[name] = ns
        self._devices[name] = inner
        self.addresses[name] = address
        return address

    def address(self, name: str) -> str:
        return self.addresses[name]

    def wrap(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self._namespaces[name], *argv]

    def cut(self, a: str, b: str, one_way: bool = False) -> None:
        """Packets from ``a`` to ``b`` are lost (and from ``b`` to ``a`` unless ``one_way``)."""
        self._pin(a, b)
        if not one_way:
            self._pin(b, a)

    def isolate(self, name: str, one_way: bool = False) -> None:
        """Cuts ``name`` from every other host (``one_way``: it still sends, hears nothing)."""
        for other in self._namespaces:
            if other != name:
                self.cut(other, name, one_way)

    def rejoin(self, name: str) -> None:
        """Undoes `isolate`."""
        for other in self._namespaces:
            if other != name:
                self.heal(other, name)

    def heal(self, a: str, b: str) -> None:
        """Undoes `cut` between ``a`` and ``b`` (either direction): ARP finds the peer again."""
        for x, y in ((a, b), (b, a)):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("-n", self._namespaces[x], "neigh", "del", self.addresses[y],
                    "dev", self._devices[x])  # fmt: skip

    def _pin(self, src: str, dst: str) -> None:
        _ip("-n", self._namespaces[src], "neigh", "replace", self.addresses[dst],
            "lladdr", NOWHERE, "dev", self._devices[src], "nud", "permanent")  # fmt: skip

    def close(self) -> None:
        for ns in self._namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self._namespaces.clear()
