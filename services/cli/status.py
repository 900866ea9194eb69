"""`meshserve status`: nodes, GPUs, models, replicas, placements and breakers from etcd, as tables
that read at 80 columns: no borders (two spaces between columns), identifiers never wrapped or
cut, sizes in their own units, one row per GPU, and a replica's note (an error, how its engine
keeps tiers) as a numbered reference whose text is printed whole below the table instead of
wrapping one word per line in a narrow column."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, fail
from meshserve.sizes import format_bytes
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

app = typer.Typer()


@app.command()
def status(etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Nodes, devices, memory, replicas and placements, as tables."""
    console.print(asyncio.run(_read(default_etcd(etcd), prefix)))


async def _read(etcd: str, prefix: str) -> Group:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    store = Store(client, keys)
    try:
        nodes, _ = await store.list(keys.nodes(), cluster_pb2.NodeStatus)
        replicas, _ = await store.list(keys.replicas(), cluster_pb2.ReplicaStatus)
        placements, _ = await store.list(keys.placements(), cluster_pb2.Placement)
        models, _ = await store.list(keys.models(), cluster_pb2.ModelSpec)
        demands, _ = await store.list(keys.demands(), cluster_pb2.RouterDemand)
    except Exception as e:
        raise fail(f"cannot read etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await client.close()
    return render(
        [e.value for e in nodes],
        [e.value for e in models],
        [e.value for e in replicas],
        [e.value for e in placements],
        [e.value for e in demands],
    )


def _table(title: str, columns: Sequence[str], ids: int) -> Table:
    """The first ``ids`` columns are identifiers: never wrapped nor cut (others give way)."""
    t = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, no_wrap=i < ids, overflow="fold")
    return t


def render(
    nodes: Sequence[Any],
    models: Sequence[Any],
    replicas: Sequence[Any],
    placements: Sequence[Any],
    demands: Sequence[Any],
) -> Group:
    """The status view of these records (pure: what etcd held, as rich renderables)."""
    from meshserve.v1 import cluster_pb2, common_pb2

    parts: list[RenderableType] = []
    notes: dict[str, int] = {}  # text → its number (rows with the same note share it)
    t = _table("nodes", ("node", "address", "device", "GPUs", "memory", "used", "drain"), 2)
    gpus = _table("GPUs", ("node", "GPU", "uuid", "memory used", "util", "health"), 3)
    for n in nodes:
        t.add_row(
            n.node_id, n.address, n.device_kind, str(len(n.gpus)) if n.gpus else "-",
            format_bytes(n.capacity_bytes), format_bytes(n.used_bytes), "yes" if n.draining else "",
        )  # fmt: skip
        for i, g in enumerate(n.gpus):
            name = g.name.removeprefix("NVIDIA ")
            used = f"{format_bytes(g.memory_used_bytes)} / {format_bytes(g.memory_total_bytes)}"
            health = _health(g.health)
            if g.health_reasons:  # why, below the table (as the replicas' notes)
                text = f"{g.uuid}: " + "; ".join(g.health_reasons)
                health += f" [{notes.setdefault(text, len(notes) + 1)}]"
            gpus.add_row(
                n.node_id, f"{i} {name}", g.uuid[-12:], used, f"{g.utilization:.0%}", health
            )
    parts.append(t)
    if gpus.row_count:
        parts.append(gpus)
        parts += [Text(f"[{i}] {text}") for text, i in notes.items()]
    t = _table("models", ("model", "aliases", "memory", "min", "priority"), 1)
    for m in models:
        name = m.name + (f" (adapter of {m.base})" if m.base else "")
        t.add_row(
            name, ", ".join(m.aliases), format_bytes(m.memory_bytes), str(m.min_replicas),
            common_pb2.Priority.Name(m.priority).removeprefix("PRIORITY_"),
        )  # fmt: skip
    parts.append(t)
    # streams: running+waiting in the engine; KV: its cache in use
    t = _table("replicas", ("model", "node", "state", "tier", "memory", "streams", "KV", "note"), 2)
    shown = len(notes)
    for r in replicas:
        text = r.error or r.tier_note
        ref = f"[{notes.setdefault(text, len(notes) + 1)}]" if text else ""
        state = cluster_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_")
        if r.state == cluster_pb2.REPLICA_STATE_LOADING and r.download_total_bytes:
            fetched = r.download_bytes / r.download_total_bytes
            if fetched < 1:  # fetching its files from the registry
                state += f" {fetched:.0%} of {format_bytes(r.download_total_bytes)}"
        held = f"\n+ adapters {', '.join(r.adapters)} ({len(r.adapters)}/{r.max_adapters})"
        t.add_row(
            r.model + (held if r.adapters else ""), r.node_id, state,
            _tier(r.tier), format_bytes(r.memory_bytes), f"{r.running}+{r.waiting}",
            f"{r.kv_cache_usage:.0%}", ref,
        )  # fmt: skip
    parts.append(t)
    parts += [Text(f"[{i}] {text}") for text, i in notes.items() if i > shown]
    t = _table("placements", ("node", "model", "tier", "GPUs", "epoch", "reason"), 2)
    for p in placements:
        t.add_row(
            p.node_id, p.model, _tier(p.tier),
            "\n".join(d[-12:] for d in p.devices) or "-", str(p.epoch), p.reason,
        )  # fmt: skip
    parts.append(t)
    breakers = [(d.router_id, b) for d in demands for b in d.breakers]
    if breakers:
        columns = ("router", "replica", "model", "state", "failures", "opened", "probe in")
        t = _table("circuit breakers (per router, replica and model)", columns, 3)
        for router_id, b in breakers:
            t.add_row(
                router_id, b.address, b.model, b.state.upper(), str(b.consecutive_failures),
                str(b.opened), f"{b.retry_in_s:.0f} s" if b.state == "open" else "",
            )  # fmt: skip
        parts.append(t)
    spaced: list[RenderableType] = []
    for part in parts:  # a blank line before each table
        spaced += [Text(""), part] if isinstance(part, Table) else [part]
    return Group(*spaced)


def _tier(tier: int) -> str:
    from meshserve.v1 import cluster_pb2

    return cluster_pb2.Tier.Name(tier).removeprefix("TIER_") if tier else "-"  # type: ignore[arg-type]


def _health(health: int) -> str:
    from meshserve.v1 import cluster_pb2

    return cluster_pb2.DeviceHealth.Name(health).removeprefix("DEVICE_HEALTH_") if health else "-"  # type: ignore[arg-type]
