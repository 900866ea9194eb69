"""What the benchmarks share: a process's CPU time, and the one-agent mesh most of them start
(etcd, a scheduler, agent-0 and a router, torn down whatever happens)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from meshserve.localmesh import Mesh, Service


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc, clock ticks at 100 Hz)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


@contextlib.contextmanager
def one_agent_mesh(
    root: Path,
    lease_ttl_s: int = 3,
    threads: int = 1,
    agent_extra: Sequence[str] = (),
    router_extra: Sequence[str] = (),
    agent_python: str = "",
    agent_timeout_s: float = 90.0,
) -> Iterator[tuple[Mesh, Service, Service]]:
    """(mesh, agent, router): etcd, a scheduler, agent-0 and a router, stopped on exit;
    ``agent_python``: the agent's interpreter (the vLLM environment's, for vLLM engines)."""
    mesh = Mesh(root, lease_ttl_s=lease_ttl_s)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        agent = mesh.start_agent(
            "agent-0",
            threads=threads,
            extra=agent_extra,
            python=agent_python,
            timeout_s=agent_timeout_s,
        )
        router = mesh.start_router(extra=router_extra)
        yield mesh, agent, router
    finally:
        mesh.stop()
