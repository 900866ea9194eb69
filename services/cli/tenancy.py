"""Tenants: `meshserve tenant key`, `tenant apply`, and `meshserve usage`."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, fail
from meshserve.cli.inspect import ApiKey, bearer
from meshserve.tls import open_channel
from rich.table import Table

app = typer.Typer()
tenant_app = typer.Typer(help="API keys and the tenants document.", no_args_is_help=True)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@tenant_app.command("key")
def tenant_key(name: Annotated[str, typer.Argument(help="the tenant it is for")]) -> None:
    """Make a new API key: the key is printed once (hand it to the tenant); the tenants document
    stores only its hash."""
    from meshserve.router.tenancy.tenants import hash_key, new_key

    key = new_key()
    console.print(f"API key for {name} (shown once): [bold]{key}[/bold]")
    console.print("Add its hash to the tenant's keys in the tenants document:")
    console.print(f"  - name: {name}\n    keys: [{hash_key(key)}]", highlight=False)


@tenant_app.command("apply")
def tenant_apply(file: Path, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Validate a tenants YAML and store it in etcd (config/tenants) for routers started with
    --tenants-from-etcd; they take it within a second."""
    from meshserve.router.tenancy.tenants import parse_book

    try:
        text = file.read_text()
        book = parse_book(text)
    except (OSError, ValueError) as e:
        raise fail(f"{file}: {e}") from None
    asyncio.run(_put_tenants(default_etcd(etcd), prefix, text))
    names = ", ".join(t.name for t in book.tenants) or "none (nobody gets in)"
    console.print(f"applied tenants: {names}; prices for {len(book.prices)} model(s)")


async def _put_tenants(etcd: str, prefix: str, text: str) -> None:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2

    client = connect(EtcdConfig(etcd))
    try:
        doc = cluster_pb2.TenantsDocument(yaml=text, updated_unix_ms=int(time.time() * 1000))
        await Store(client, Keyspace(prefix)).put(Keyspace(prefix).tenants(), doc)
    finally:
        await client.close()


def parse_since(text: str) -> int:
    """``30m``, ``2h``, ``1d`` → the unix ms that long ago; "" → 0 (since routers started)."""
    if not text:
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise ValueError(f"--since: a duration like 30m, 2h or 1d, got {text!r}")
    return int((time.time() - float(m.group(1)) * UNITS[m.group(2)]) * 1000)


@app.command()
def usage(
    tenant: Annotated[str, typer.Option(help="one tenant (default: all you may see)")] = "",
    since: Annotated[str, typer.Option(help="e.g. 30m, 2h, 1d (kept: 24 h)")] = "",
    api_key: ApiKey = "",
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
) -> None:
    """Requests, tokens, cold starts, GPU-seconds and cost per tenant and model, summed over
    every router (found in etcd)."""
    try:
        since_ms = parse_since(since)
    except ValueError as e:
        raise fail(str(e)) from None
    rows, routers, errors = asyncio.run(
        _usage(default_etcd(etcd), prefix, tenant, since_ms, api_key)
    )
    for problem in errors:
        console.print(f"[yellow]{problem}[/yellow]")
    table = Table(title=f"usage over {routers} router(s)" + (f", last {since}" if since else ""))
    for col in ("tenant", "model", "requests", "cold", "input tok", "output tok", "GPU-s", "cost"):
        table.add_column(col, justify="left" if col in ("tenant", "model") else "right")
    for (t, m), r in sorted(rows.items()):
        table.add_row(
            t,
            m,
            str(r["requests"]),
            str(r["cold_starts"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            f"{r['gpu_seconds']:.1f}",
            f"{r['cost']:.4f}",
        )
    console.print(table)


async def _usage(
    etcd: str, prefix: str, tenant: str, since_ms: int, api_key: str
) -> tuple[dict[tuple[str, str], dict[str, Any]], int, list[str]]:
    import grpc
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2, router_pb2, router_pb2_grpc

    client = connect(EtcdConfig(etcd))
    try:
        keys = Keyspace(prefix)
        entries, _rev = await Store(client, keys).list(keys.demands(), cluster_pb2.RouterDemand)
    finally:
        await client.close()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    errors: list[str] = []
    asked = 0
    fields = ("requests", "cold_starts", "input_tokens", "output_tokens", "gpu_seconds", "cost")
    for d in (e.value for e in entries):
        if not d.address:
            continue
        asked += 1
        async with open_channel(d.address) as ch:
            try:
                reply = await router_pb2_grpc.RouterStub(ch).Usage(
                    router_pb2.UsageRequest(tenant=tenant, since_unix_ms=since_ms),
                    timeout=5,
                    metadata=bearer(api_key),
                )
            except grpc.aio.AioRpcError as e:
                errors.append(f"router {d.router_id}: {e.code().name}: {e.details()}")
                continue
        for r in reply.rows:
            acc = rows.setdefault((r.tenant, r.model), dict.fromkeys(fields, 0))
            for f in fields:
                acc[f] += getattr(r, f)
    return rows, asked, errors
