"""Whether this process may still act on its lease: fenced when the lease has gone unrenewed for
longer than its TTL while the etcd members that could hold a quorum are silent to it.

The lease is an agent's claim on its placements (DESIGN §4). Cut off from etcd it cannot renew
it: etcd lets it expire after the TTL, the scheduler places its models elsewhere, and routers
that still reach etcd drop its replicas. A router that cannot reach etcd either, or a client
calling the agent directly, would still send it streams for placements that may have moved. So
the agent fences itself: no new streams (UNAVAILABLE, AGENT_FENCED); the ones in flight go on
(their routers move them once they see the lease go, at no cost: the continuation is exact).

A lease unrenewed is not always a lease lost, though. With etcd down, or without a quorum,
nobody renews, and etcd extends every lease when a leader is elected again: nothing moves, and
fencing would stop a mesh that the outage alone does not stop (routers serve from their tables,
agents from their engines). So the fence asks the members: a refused connection is a member
down (its host answered), an accepted one a member up, silence (a timeout, no route) a member
out of reach. Fenced when the members out of reach are a majority of the cluster: they may be
a quorum, granting and expiring leases without us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

from meshserve.cluster.session import Session

log = logging.getLogger(__name__)
PROBE_S = 1.0  # a member that has not answered a TCP connect by then is out of reach
UP, DOWN, SILENT = "up", "down", "silent"


def members(endpoints: Sequence[str]) -> list[tuple[str, int]]:
    """Every member's (address, port): an endpoint that is a name may stand for several (a
    Kubernetes headless Service resolves to every member)."""
    out: list[tuple[str, int]] = []
    for one in endpoints:
        host, _, port = one.rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError:  # not resolvable now: one member, out of reach
            out.append((host, int(port)))
            continue
        out += sorted({(str(i[4][0]), int(port)) for i in infos})
    return out


async def reach(address: str, port: int, timeout_s: float = PROBE_S) -> str:
    """UP, DOWN (refused: the host is there, etcd is not) or SILENT (no answer, no route)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout_s)
    except ConnectionRefusedError:
        return DOWN
    except (TimeoutError, OSError):
        return SILENT
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return UP


class Fence:
    """``fenced`` is read on every admission (cheap); `run` updates it a few times per TTL."""

    def __init__(
        self,
        session: Session,
        endpoints: Sequence[str],
        on_change: Callable[[bool], None] = lambda _fenced: None,
    ) -> None:
        self.session = session
        self.endpoints = tuple(endpoints)
        self.fenced = False
        self.why = ""
        self._on_change = on_change

    async def check(self) -> bool:
        """Looks once; returns ``fenced``."""
        unrenewed = self.session.unrenewed_s()
        if unrenewed <= self.session.ttl_s:
            self._set(False, "")
            return False
        found = members(self.endpoints)
        states = await asyncio.gather(*(reach(a, p) for a, p in found))
        silent = [f"{a}:{p}" for (a, p), s in zip(found, states, strict=True) if s == SILENT]
        if 2 * len(silent) > len(found):
            self._set(True, f"lease unrenewed for {unrenewed:.0f} s and etcd out of reach "
                      f"({', '.join(silent)})")  # fmt: skip
        else:  # etcd is down or without a quorum where we can see it: leases are frozen
            self._set(False, "")
        return self.fenced

    def _set(self, fenced: bool, why: str) -> None:
        changed = fenced != self.fenced
        self.fenced, self.why = fenced, why
        if changed:
            if fenced:
                log.warning("fenced: taking no new streams (%s)", why)
            else:
                log.warning("unfenced: the lease is renewed, or etcd is down for everyone")
            self._on_change(fenced)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.session.ttl_s / 4)
            try:
                await self.check()
            except Exception:  # never let the watch die: it would leave the fence as it is
                log.exception("fence check failed")
