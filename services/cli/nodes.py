"""`meshserve node cordon | drain | uncordon NODE`: an operator's hold on a node, in etcd
(cordons/<node>, cluster/keys.py), so it outlives agent restarts and every scheduler sees it.

- cordon: the scheduler places nothing new on the node; what runs there stays.
- drain: also moves every replica off, make before break: each is placed elsewhere first and
  leaves the node once the model has its wanted READY replicas elsewhere; the agent then lets
  the replica's streams finish (its drain grace) before it unloads, and routers fail over any
  that outlast it, so no stream fails. Waits (``--wait``, default) until the node holds nothing.
- uncordon: lifts either. With ``--device UUID`` (repeatable) it clears devices instead: their
  agent forgets the Xids, engine deaths and ECC errors it saw of them (after a GPU reset or a
  repair) and judges them afresh, so a FAILED device takes placements again if it is well.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, err, fail

node_app = typer.Typer(help="Cordon, drain or uncordon a node.", no_args_is_help=True)
Node = Annotated[str, typer.Argument(help="node id (meshserve status lists them)")]
Reason = Annotated[str, typer.Option(help="why (shown with the node)")]


@node_app.command()
def cordon(
    node: Node, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix, reason: Reason = ""
) -> None:
    """Place nothing new on NODE; what runs there stays."""
    asyncio.run(_hold(default_etcd(etcd), prefix, node, False, reason, 0.0))
    console.print(f"node [bold]{node}[/bold] cordoned: nothing new is placed there")


@node_app.command()
def drain(
    node: Node,
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
    reason: Reason = "",
    wait: Annotated[bool, typer.Option(help="wait until the node holds no replica")] = True,
    timeout: Annotated[float, typer.Option(help="longest wait, s")] = 600.0,
) -> None:
    """Move every replica off NODE (each placed elsewhere first), then leave it cordoned."""
    asyncio.run(_hold(default_etcd(etcd), prefix, node, True, reason, timeout if wait else 0.0))


@node_app.command()
def uncordon(
    node: Node,
    etcd: Etcd = "",
    prefix: Prefix = SERVICE.prefix,
    device: Annotated[
        list[str] | None,
        typer.Option(help="clear this GPU's health history instead (uuid; repeatable)"),
    ] = None,
) -> None:
    """Lift a cordon or drain of NODE, or clear the health of its devices (--device)."""
    if device:
        asyncio.run(_clear_devices(default_etcd(etcd), prefix, node, device))
        console.print(f"{', '.join(device)} on [bold]{node}[/bold]: judged afresh from now")
        return
    asyncio.run(_lift(default_etcd(etcd), prefix, node))
    console.print(f"node [bold]{node}[/bold] takes placements again")


@contextlib.asynccontextmanager
async def _store(etcd: str, prefix: str) -> AsyncIterator[Any]:
    """A Store on etcd; what fails on the way is a one-line error, not a traceback."""
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect

    store = Store(connect(EtcdConfig(etcd)), Keyspace(prefix))
    try:
        yield store
    except typer.Exit:
        raise
    except Exception as e:
        raise fail(f"cannot reach etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await store.client.close()


async def _hold(etcd: str, prefix: str, node: str, drain: bool, reason: str, wait_s: float) -> None:
    from meshserve.cluster.keys import valid_name
    from meshserve.v1 import cluster_pb2

    if not valid_name(node):
        raise fail(f"{node!r} is not a node id")
    async with _store(etcd, prefix) as store:
        nodes, _ = await store.list(store.keys.nodes(), cluster_pb2.NodeStatus)
        known = sorted(n.value.node_id for n in nodes)
        if node not in known:
            raise fail(f"no node {node!r} in the mesh (nodes: {', '.join(known) or 'none'})")
        hold = cluster_pb2.NodeCordon(
            node_id=node, drain=drain, reason=reason, since_unix_ms=int(time.time() * 1000)
        )
        await store.put(store.keys.cordon(node), hold)
        if drain:
            await _wait_empty(store, node, wait_s)


async def _wait_empty(store: Any, node: str, wait_s: float) -> None:
    """Until the node holds no placement and no replica (or ``wait_s`` passes)."""
    from meshserve.v1 import cluster_pb2

    deadline = time.monotonic() + wait_s
    last = None
    while True:
        placed, _ = await store.list(store.keys.placements(node), cluster_pb2.Placement)
        replicas, _ = await store.list(store.keys.replicas(), cluster_pb2.ReplicaStatus)
        models = {p.value.model for p in placed}
        models |= {r.value.model for r in replicas if r.value.node_id == node}
        here = sorted(models)
        if not here:
            console.print(
                f"node [bold]{node}[/bold] drained: it holds no replica and stays cordoned"
            )
            return
        if wait_s <= 0:
            console.print(f"node [bold]{node}[/bold] draining: {', '.join(here)} moving")
            return
        if here != last:
            err.print(f"[dim]{node} still holds: {', '.join(here)}[/dim]")
            last = here
        if time.monotonic() > deadline:
            raise fail(
                f"{node} still holds {', '.join(here)} after {wait_s:.0f} s (no room elsewhere? "
                f"meshserve explain MODEL); it stays draining"
            )
        await asyncio.sleep(0.5)


async def _lift(etcd: str, prefix: str, node: str) -> None:
    from meshserve.v1 import cluster_pb2

    async with _store(etcd, prefix) as store:
        if await store.get(store.keys.cordon(node), cluster_pb2.NodeCordon) is None:
            raise fail(f"node {node!r} is not cordoned")
        await store.delete(store.keys.cordon(node))


async def _clear_devices(etcd: str, prefix: str, node: str, devices: list[str]) -> None:
    from meshserve.v1 import cluster_pb2

    async with _store(etcd, prefix) as store:
        status = await store.get(store.keys.node(node), cluster_pb2.NodeStatus)
        if status is None:
            raise fail(f"no node {node!r} in the mesh")
        known = {g.uuid for g in status.gpus}
        unknown = [d for d in devices if d not in known]
        if unknown:
            has = ", ".join(sorted(known)) or "none"
            raise fail(f"{node} has no device {', '.join(unknown)} (it has: {has})")
        key = store.keys.health_clear(node)
        record = await store.get(key, cluster_pb2.DeviceHealthClear)
        record = record or cluster_pb2.DeviceHealthClear(node_id=node)
        now = int(time.time() * 1000)
        for d in devices:
            record.cleared_unix_ms[d] = max(now, record.cleared_unix_ms.get(d, 0) + 1)
        await store.put(key, record)
