"""`meshserve top`: a live view of the fleet, refreshed every second.

Per model: requests/s, streams in flight and queued (every router's demand record, summed),
TTFT p50/p99 (the worst router's), tokens/s (its replicas' measured decode rates), replicas by
state and tier, KV cache use. Per node: device, each GPU's memory and utilization, capacity and
use, the models it holds. The data come from etcd watches (cluster/mirror.py): after one initial
read, the mesh sends only changes, so the view costs the mesh the same at one refresh a second as
at ten, and nothing per refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, fail
from rich.console import Group
from rich.table import Table

app = typer.Typer()
MIB = 2**20


@dataclass
class ModelRow:
    name: str
    rate: float = 0.0
    in_flight: int = 0
    queued: int = 0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tokens_per_s: float = 0.0
    kv: float = 0.0
    states: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)


def model_rows(
    models: Mapping[bytes, Any], replicas: Mapping[bytes, Any], demands: Mapping[bytes, Any]
) -> list[ModelRow]:
    """One row per registered model (and per model with replicas or demand), by name."""
    from meshserve.v1 import cluster_pb2

    rows: dict[str, ModelRow] = {}

    def row(name: str) -> ModelRow:
        return rows.setdefault(name, ModelRow(name))

    for spec in models.values():
        row(spec.name)
    for r in replicas.values():
        m = row(r.model)
        m.states[cluster_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_")] += 1
        m.tiers[cluster_pb2.Tier.Name(r.tier).removeprefix("TIER_")] += 1
        m.tokens_per_s += r.decode_tokens_per_s
        m.kv = max(m.kv, r.kv_cache_usage)
    for d in demands.values():
        for md in d.models:
            m = row(md.model)
            m.rate += md.request_rate
            m.in_flight += md.in_flight
            m.queued += md.queued
            m.ttft_p50_s = max(m.ttft_p50_s, md.ttft_p50_s)
            m.ttft_p99_s = max(m.ttft_p99_s, md.ttft_p99_s)
    return sorted(rows.values(), key=lambda m: (-m.rate, -m.in_flight, m.name))


def render(
    models: Mapping[bytes, Any],
    replicas: Mapping[bytes, Any],
    demands: Mapping[bytes, Any],
    nodes: Mapping[bytes, Any],
    cordons: Mapping[bytes, Any] | None = None,
) -> Group:
    t = Table(title=f"models ({len(models)})", expand=True)
    for c in ("model", "req/s", "in flight", "queued", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
              "replicas", "tiers", "KV"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("model", "replicas", "tiers") else "right")
    for m in model_rows(models, replicas, demands):
        t.add_row(
            m.name,
            f"{m.rate:.1f}",
            str(m.in_flight),
            str(m.queued) if m.queued else "",
            f"{m.ttft_p50_s * 1000:.0f}" if m.ttft_p50_s else "",
            f"{m.ttft_p99_s * 1000:.0f}" if m.ttft_p99_s else "",
            f"{m.tokens_per_s:.0f}" if m.tokens_per_s else "",
            " ".join(f"{k}:{v}" for k, v in sorted(m.states.items())) or "-",
            " ".join(f"{k}:{v}" for k, v in sorted(m.tiers.items())) or "-",
            f"{m.kv:.0%}" if m.kv else "",
        )
    held: dict[str, list[str]] = defaultdict(list)
    for r in replicas.values():
        held[r.node_id].append(r.model)
    held_by = {c.node_id: c for c in (cordons or {}).values()}
    n = Table(title=f"nodes ({len(nodes)})", expand=True)
    for c in ("node", "device", "GPUs (used/total MiB, util)", "used/capacity MiB", "models",
              "hold"):  # fmt: skip
        n.add_column(c)
    for node in sorted(nodes.values(), key=lambda x: x.node_id):
        gpus = " ".join(
            f"{g.index}:{g.memory_used_bytes / MIB:.0f}/{g.memory_total_bytes / MIB:.0f} "
            f"{g.utilization:.0%}"
            for g in node.gpus
        )
        n.add_row(
            node.node_id,
            node.device_kind,
            gpus or "-",
            f"{node.used_bytes / MIB:.0f}/{node.capacity_bytes / MIB:.0f}",
            ", ".join(sorted(held.get(node.node_id, []))) or "-",
            hold_of(node, held_by.get(node.node_id)),
        )
    return Group(t, n)


def hold_of(node: Any, cordon: Any) -> str:
    """Why a node takes nothing new: its agent drains (shutting down), or an operator's hold."""
    if cordon is not None:
        return "drained" if cordon.drain else "cordoned"
    return "draining" if node.draining else ""


@app.command()
def top(
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 1.0,
    once: Annotated[bool, typer.Option(help="print one view and exit")] = False,
) -> None:
    """A live view of models and nodes (from etcd watches), refreshed every second."""
    if interval <= 0:
        raise fail("--interval must be > 0")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the view
        asyncio.run(_top(default_etcd(etcd), prefix, interval, once))


async def _top(etcd: str, prefix: str, interval: float, once: bool) -> None:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.mirror import Mirror
    from meshserve.cluster.store import EtcdConfig, connect
    from meshserve.v1 import cluster_pb2
    from rich.live import Live

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    mirrors = (
        Mirror(client, keys.models(), cluster_pb2.ModelSpec),
        Mirror(client, keys.replicas(), cluster_pb2.ReplicaStatus),
        Mirror(client, keys.demands(), cluster_pb2.RouterDemand),
        Mirror(client, keys.nodes(), cluster_pb2.NodeStatus),
        Mirror(client, keys.cordons(), cluster_pb2.NodeCordon),
    )
    try:
        for m in mirrors:
            m.start()
        try:
            async with asyncio.timeout(10):
                for m in mirrors:
                    await m.synced.wait()
        except TimeoutError:
            raise fail(f"cannot read etcd at {etcd} (no answer in 10 s)") from None

        def view() -> Group:
            return render(*(m.view for m in mirrors))

        if once:
            console.print(view())
            return
        with Live(view(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(view())
    finally:
        for m in mirrors:
            await m.stop()
        await client.close()
