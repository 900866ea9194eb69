"""`meshserve explain-route MODEL`: the last routing decisions of each router (found in etcd by
their demand records, or the one named with --router) — every replica considered, the filter
that kept it out or its scores, and the one chosen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, fail
from meshserve.cli.inspect import ApiKey, bearer
from meshserve.tls import open_channel
from meshserve.v1 import router_pb2
from rich.table import Table

app = typer.Typer()
T = TypeVar("T")


@app.command("explain-route")
def explain_route(
    model: str,
    last: Annotated[int, typer.Option(help="decisions per router, newest last")] = 1,
    router: Annotated[str, typer.Option(help="one router's host:port (default: every one)")] = "",
    api_key: ApiKey = "",
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
) -> None:
    """Why the routers sent MODEL's last requests where they did."""
    if not 1 <= last <= 256:
        raise fail(f"--last must be in 1..256, got {last}")
    answers = asyncio.run(_ask(default_etcd(etcd), prefix, router, model, last, api_key))
    for got in answered(answers):
        if not got.decisions:
            console.print(f"router {got.router_id}: no decision for {model!r} yet")
        for d in got.decisions:
            console.print(render(got.router_id, d))
    if all(isinstance(got, str) for _address, got in answers):
        raise typer.Exit(1)  # no router answered (each said why above)


def answered(answers: list[tuple[str, T | str]]) -> Iterator[T]:
    """The routers' answers; each failure said as it comes, none at all refused."""
    if not answers:
        raise fail("no router is running (none publishes demand in etcd)")
    for address, got in answers:
        if isinstance(got, str):
            console.print(f"[yellow]router at {address}: {got}[/yellow]")
        else:
            yield got


def render(router_id: str, d: router_pb2.RouteDecision) -> Table:
    when = time.strftime("%H:%M:%S", time.localtime(d.unix_ms / 1000))
    served = f" (served by fallback {d.served_by})" if d.served_by != d.model else ""
    weights = " ".join(f"{k}={v:g}" for k, v in sorted(d.weights.items()))
    chosen = d.chosen_node or "none free: queued"
    title = (
        f"router {router_id} · {when} · {d.model}{served} → {chosen}\n"
        f"request {d.request_id or '-'} · priority {d.priority} · weights {weights}"
        + (f" · session {d.session_key_hash}" if d.session_key_hash else "")
        + (f"\n{d.note}" if d.note else "")
    )
    t = Table(title=title, title_justify="left")
    scorers = sorted({k for c in d.candidates for k in c.scores})
    for col in ("", "replica", "address", "filter verdict", "total", *scorers):
        t.add_column(col)
    for c in sorted(d.candidates, key=lambda c: (bool(c.rejected), -c.total)):
        t.add_row(
            "*" if c.chosen else "",
            c.node_id,
            c.address,
            c.rejected or "passed",
            "" if c.rejected else f"{c.total:.3f}",
            *("" if c.rejected else f"{c.scores.get(k, 0.0):.3f}" for k in scorers),
        )
    return t


async def router_addresses(etcd: str, prefix: str, router: str) -> list[str]:
    """``router`` when given, else every router that publishes its demand in etcd."""
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2

    if router:
        return [router]
    client = connect(EtcdConfig(etcd))
    try:
        keys = Keyspace(prefix)
        entries, _ = await Store(client, keys).list(keys.demands(), cluster_pb2.RouterDemand)
    except Exception as e:
        raise fail(f"cannot read etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await client.close()
    return sorted({e.value.address for e in entries if e.value.address})


async def ask_routers(
    etcd: str, prefix: str, router: str, ask: Callable[[Any], Awaitable[T]]
) -> list[tuple[str, T | str]]:
    """``ask(RouterStub)`` of ``router``, else of every router: each answer, or why it failed."""
    import grpc
    from meshserve.v1 import router_pb2_grpc

    out: list[tuple[str, T | str]] = []
    for address in await router_addresses(etcd, prefix, router):
        async with open_channel(address) as ch:
            try:
                out.append((address, await ask(router_pb2_grpc.RouterStub(ch))))
            except grpc.aio.AioRpcError as e:
                out.append((address, f"{e.code().name}: {e.details()}"))
    return out


async def _ask(
    etcd: str, prefix: str, router: str, model: str, last: int, api_key: str
) -> list[tuple[str, router_pb2.ExplainRouteResponse | str]]:
    request = router_pb2.ExplainRouteRequest(model=model, limit=last)
    return await ask_routers(
        etcd, prefix, router,
        lambda stub: stub.ExplainRoute(request, timeout=10, metadata=bearer(api_key)),
    )  # fmt: skip
