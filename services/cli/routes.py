"""`meshserve route apply|list|delete|status`: route documents (routespec.py) in etcd, and a
route's targets side by side as each router served them (the canary analysis view)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, fail
from meshserve.cli.inspect import ApiKey, bearer
from meshserve.cli.route import answered, ask_routers
from meshserve.v1 import cluster_pb2, router_pb2
from rich.table import Table

route_app = typer.Typer(help="Routes: weighted targets, rules, fallbacks, shadows.",
                        no_args_is_help=True)  # fmt: skip


@route_app.command("apply")
def route_apply(file: Path, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Store the route(s) in a YAML file (one mapping, or a list); routers take them within a
    second. A route's name may not be a registered model's or alias's."""
    import yaml
    from meshserve.routespec import models_named, route_from_dict

    try:
        docs = yaml.safe_load(file.read_text())
        specs = [route_from_dict(d) for d in (docs if isinstance(docs, list) else [docs])]
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise fail(f"{file}: {e}") from None
    for spec in specs:
        unknown = asyncio.run(_apply(default_etcd(etcd), prefix, spec))
        console.print(f"applied route [bold]{spec.name}[/bold] → {', '.join(models_named(spec))}")
        if unknown:
            console.print(f"[yellow]warning[/yellow]: not registered (yet): {', '.join(unknown)}")


async def _apply(etcd: str, prefix: str, spec: cluster_pb2.RouteSpec) -> list[str]:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.routespec import models_named

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    try:
        store = Store(client, keys)
        models, _ = await store.list(keys.models(), cluster_pb2.ModelSpec)
        names = {m.value.name for m in models} | {a for m in models for a in m.value.aliases}
        if spec.name in names:
            raise fail(f"route {spec.name!r}: a model or alias has that name; pick another")
        await store.put(keys.route(spec.name), spec)
    finally:
        await client.close()
    return [m for m in models_named(spec) if m not in names]


@route_app.command("list")
def route_list(etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """The routes stored in etcd."""
    routes = asyncio.run(_list(default_etcd(etcd), prefix))
    t = Table("route", "targets", "rules", "fallbacks", "shadows", "sticky")
    for r in routes:
        t.add_row(
            r.name,
            ", ".join(f"{x.model}:{x.weight:g}" for x in r.targets),
            ", ".join(f"{x.name}→{x.target}" for x in r.rules),
            " → ".join(h.model for h in r.fallbacks),
            ", ".join(f"{x.model}:{x.weight:g}" for x in r.shadows),
            r.sticky or "session",
        )
    console.print(t)


async def _list(etcd: str, prefix: str) -> list[cluster_pb2.RouteSpec]:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    try:
        entries, _ = await Store(client, keys).list(keys.routes(), cluster_pb2.RouteSpec)
    finally:
        await client.close()
    return [e.value for e in entries]


@route_app.command("delete")
def route_delete(name: str, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Remove a route: its name is unknown to clients again."""
    if not asyncio.run(_delete(default_etcd(etcd), prefix, name)):
        raise fail(f"no route {name!r}")
    console.print(f"deleted route [bold]{name}[/bold]")


async def _delete(etcd: str, prefix: str, name: str) -> bool:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, connect

    client = connect(EtcdConfig(etcd))
    try:
        reply = await client.delete(Keyspace(prefix).route(name))  # None: there was none
        return bool(reply is not None and reply.deleted)
    finally:
        await client.close()


@route_app.command("status")
def route_status(
    name: str,
    router: Annotated[str, typer.Option(help="one router's host:port (default: every one)")] = "",
    api_key: ApiKey = "",
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
) -> None:
    """NAME's targets side by side per router: requests, errors, fallbacks, TTFT and e2e p50/p99,
    tokens/s."""
    answers = asyncio.run(_status(default_etcd(etcd), prefix, router, name, api_key))
    for got in answered(answers):
        t = Table(title=f"route {name} · router {got.router_id}", title_justify="left")
        for col in ("target", "role", "requests", "errors", "fell back", "TTFT p50", "TTFT p99",
                    "e2e p50", "e2e p99", "tokens/s"):  # fmt: skip
            t.add_column(col)
        for x in got.targets:
            t.add_row(
                x.model, x.role, str(x.requests), str(x.errors), str(x.fell_back),
                *(f"{v * 1000:.0f} ms" for v in (x.ttft_p50_s, x.ttft_p99_s, x.e2e_p50_s,
                                                   x.e2e_p99_s)),
                f"{x.tokens_per_s:.1f}",
            )  # fmt: skip
        console.print(t)
    if all(isinstance(got, str) for _address, got in answers):
        raise typer.Exit(1)


async def _status(
    etcd: str, prefix: str, router: str, name: str, api_key: str
) -> list[tuple[str, router_pb2.RouteStatusResponse | str]]:
    request = router_pb2.RouteStatusRequest(route=name)
    return await ask_routers(
        etcd, prefix, router,
        lambda stub: stub.RouteStatus(request, timeout=10, metadata=bearer(api_key)),
    )  # fmt: skip
