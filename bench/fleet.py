"""The control plane at fleet size: a real etcd, a real scheduler leader and routers (processes),
and N simulated agents in this process (nodeagent/fleet.py: each its own lease, NodeStatus,
replicas and gRPC port) serving M `engine: sim` models.

    python bench/fleet.py [--agents 1000 --models 5000 --routers 3 --wave 1000 --lease-ttl 10]
                          [--quick] [--json PATH]

``--quick``: 100 agents, 500 models, 1 router, 3 s leases (well under 2 minutes on 2 cores).
Reports, as a table and JSON (keys kept stable for comparisons over time): time from applying the
first wave of models (1,000; all of them in --quick) to all READY, and until every wave is
READY; scheduler round p50/p99 (from its histogram: bucket upper bounds); after killing 10 %
of agents (as crashes: leases left to expire), the time and scheduler rounds until every model
is READY off the dead nodes; router table update p99 per burst of changes (its histogram);
etcd writes/s per agent and router idle CPU and memory at steady state.
Goals (issue 13): router idle CPU ≤ 5 % of a core and table update p99 ≤ 1 ms at 5,000
replicas; round p99 ≤ 1 s; 10 % loss re-placed within 2 rounds after the leases expire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.config import ServiceConfig
from meshserve.localmesh import Mesh
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.fleet import Fleet, ready_nodes, sim_spec
from meshserve.v1 import cluster_pb2 as S
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.common import cpu_seconds

STEADY_S = 10.0
WRITING = "meshserve_scheduler_writing_rounds_total"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


def quantile(text: str, name: str, q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` (inf: past the last)."""
    buckets = [
        (float(le), float(v))
        for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)', text, re.MULTILINE)
    ]
    total = buckets[-1][1] if buckets else 0.0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return 0.0


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)", text, re.MULTILINE))


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else 0.0


def sim_model(i: int) -> S.ModelSpec:
    return sim_spec(f"sim-{i:05d}", "1GiB", "256MiB")


async def revision(store: Store) -> int:
    """etcd's store revision: one more per write (a put, delete or transaction)."""
    _entries, rev = await store.list(store.keys.model("sim-00000"), S.ModelSpec)
    return rev


async def wait_for(what: str, probe: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = await probe()
        if got:
            return got
        await asyncio.sleep(0.5)
    raise TimeoutError(what)


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    mesh = Mesh(root / "mesh", lease_ttl_s=args.lease_ttl)
    mesh.start_etcd()
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    store = Store(client, Keyspace())
    # Each agent offers 80 GiB: with 1.25 GiB models (x1.1 overhead), 5 per agent on average
    # leaves the room that 10 % fewer agents need.
    base = AgentConfig(
        service=ServiceConfig(etcd=mesh.etcd.endpoint, lease_ttl_s=args.lease_ttl),
        node_id="sim",
        device="cpu",
        memory_limit_bytes=80 * 2**30,
        host_memory_limit_bytes=2**30,
    )
    fleet = Fleet(store, base, args.agents)
    out: dict[str, Any] = {"agents": args.agents, "replicas": args.models}
    try:
        await fleet.start()
        sched_port = free_port()
        mesh.start_scheduler(extra=["--metrics-port", str(sched_port)])
        router_ports = [free_port() for _ in range(args.routers)]
        routers = [
            mesh.start_router(f"router-{i}", extra=["--metrics-port", str(p)])
            for i, p in enumerate(router_ports)
        ]
        tx = client.transactions
        specs = [sim_model(i) for i in range(args.models)]
        started = time.monotonic()
        # Applied in waves (as a platform team adds models): the first wave's time to all
        # READY is `all_ready_s`; then the next wave, up to every model.
        for first in range(0, len(specs), args.wave):
            wave = specs[first : first + args.wave]
            for i in range(0, len(wave), 100):  # etcd takes up to 128 operations per txn
                ops = [
                    tx.put(store.keys.model(s.name), s.SerializeToString())
                    for s in wave[i : i + 100]
                ]
                await client.transaction(compare=[], success=ops, failure=[])
            upto = first + len(wave)

            async def all_ready(upto: int = upto) -> dict[str, str] | None:
                got = await ready_nodes(store)
                return got if len(got) == upto else None

            placed = await wait_for(f"{upto} models READY", all_ready, 900)
            if first == 0:
                out["all_ready_s"] = round(time.monotonic() - started, 2)
                out["wave"] = len(wave)
        out["every_model_ready_s"] = round(time.monotonic() - started, 2)

        # Steady state: etcd writes, router idle CPU and memory.
        await asyncio.sleep(3)
        rev0 = await revision(store)
        cpu0 = [cpu_seconds(r.proc.pid) for r in routers]
        await asyncio.sleep(STEADY_S)
        rev1 = await revision(store)
        cpu1 = [cpu_seconds(r.proc.pid) for r in routers]
        out["etcd_writes_per_s_per_agent"] = round((rev1 - rev0) / STEADY_S / args.agents, 3)
        out["router_idle_cpu_pct"] = round(
            max(100 * (b - a) / STEADY_S for a, b in zip(cpu0, cpu1, strict=True)), 2
        )
        out["router_rss_mib"] = round(max(rss_mib(r.proc.pid) for r in routers), 1)

        # Lose 10 % of the agents that hold replicas.
        victims = sorted(set(placed.values()))[: max(1, args.agents // 10)]
        rounds0 = counter(scrape(sched_port), WRITING)
        killed_at = time.monotonic()
        for node in victims:
            await fleet.kill(node)

        async def expired() -> bool:
            entries, _rev = await store.list(store.keys.nodes(), S.NodeStatus)
            return not {e.value.node_id for e in entries} & set(victims)

        await wait_for("the dead agents' leases to expire", expired, 60)
        out["leases_expired_s"] = round(time.monotonic() - killed_at, 2)

        async def converged() -> bool:
            got = await ready_nodes(store)
            return len(got) == args.models and not set(got.values()) & set(victims)

        await wait_for("re-placed after the loss", converged, 900)
        out["replace_after_loss_s"] = round(time.monotonic() - killed_at, 2)
        text = scrape(sched_port)
        # Rounds that wrote placements from the kill until all were READY again (the victims'
        # leases expire over a second or so: each expiry starts a round)
        out["replace_after_loss_rounds"] = int(counter(text, WRITING) - rounds0)
        out["round_p50_s"] = quantile(text, "meshserve_scheduler_round_seconds", 0.5)
        out["round_p99_s"] = quantile(text, "meshserve_scheduler_round_seconds", 0.99)
        out["table_update_p99_ms"] = round(
            1000
            * max(
                quantile(scrape(p), "meshserve_router_table_update_seconds", 0.99)
                for p in router_ports
            ),
            3,
        )
    finally:
        await fleet.stop()
        await client.close()
        mesh.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--routers", type=int, default=3)
    parser.add_argument("--wave", type=int, default=1000, help="models applied at a time")
    parser.add_argument(
        "--lease-ttl",
        type=int,
        default=10,
        help="s; production-like (the default 5 s with "
        "a thousand agents in one Python process on 2 cores loses leases in the first burst)",
    )
    parser.add_argument("--quick", action="store_true", help="100 agents, 500 models, 1 router")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.agents, args.models, args.routers, args.lease_ttl = 100, 500, 1, 3
    out_args = {"lease_ttl_s": args.lease_ttl}
    with tempfile.TemporaryDirectory() as tmp:
        out = {**asyncio.run(run(args, Path(tmp))), **out_args}
    table = Table(title=f"fleet: {out['agents']} simulated agents, {out['replicas']} replicas")
    table.add_column("measure")
    table.add_column("value")
    for key, value in out.items():
        table.add_row(key, str(value))
    Console(width=100).print(table)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
