"""The cluster layer against a real etcd: leases, election fencing, watches, restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aetcd
import pytest
from meshserve.cluster.election import Election
from meshserve.cluster.etcd_process import EtcdProcess
from meshserve.cluster.keepalive import keeper_for
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.router.core.table import EndpointTable
from meshserve.v1 import cluster_pb2 as S

from tests.factories import spec
from tests.waiting import eventually


async def test_keys_vanish_when_the_lease_expires(store: Store, keys: Keyspace) -> None:
    session = Session(store.client, ttl_s=2)
    await session.start()
    key = keys.node("n1")
    await store.put(key, S.NodeStatus(node_id="n1"), lease=session.lease_id)
    assert await store.get(key, S.NodeStatus) is not None
    # The process "dies": keepalives stop, nothing revokes the lease.
    assert session._task is not None
    session._task.cancel()
    await eventually(lambda: _absent(store, key), timeout=6, what="the node key to expire")


async def _absent(store: Store, key: bytes) -> bool:
    return await store.get(key, S.NodeStatus) is None


async def test_keepalive_holds_keys_past_the_ttl(store: Store, keys: Keyspace) -> None:
    session = Session(store.client, ttl_s=2)
    await session.start()
    key = keys.node("n1")
    await store.put(key, S.NodeStatus(node_id="n1"), lease=session.lease_id)
    refreshed = 0
    while refreshed < 4:  # four keepalive periods, well past one TTL
        await asyncio.sleep(session.ttl_s / 2)
        refreshed += 1
        assert await store.get(key, S.NodeStatus) is not None
    await session.close()
    assert await store.get(key, S.NodeStatus) is None  # close revokes: keys go at once


async def test_many_sessions_share_a_few_keepalive_streams_and_all_hold(
    store: Store, keys: Keyspace
) -> None:
    """500 leases in one process (a simulated fleet's): all kept alive over the keeper's few
    LeaseKeepAlive streams (not one per refresh) through several TTLs; none expires."""
    sessions = [Session(store.client, ttl_s=2) for _ in range(500)]
    await asyncio.gather(*(s.start() for s in sessions))
    for i, s in enumerate(sessions):
        await store.put(keys.node(f"many-{i}"), S.NodeStatus(node_id=f"many-{i}"), lease=s.lease_id)
    keeper = keeper_for(store.client)

    async def all_open() -> list[object] | None:
        streams: list[object] = list(keeper._streams)
        return streams if all(streams) else None

    streams = await eventually(all_open, 5, "the keepalive streams open")
    for _ in range(6):  # three TTLs
        await asyncio.sleep(1.0)
        nodes, _rev = await store.list(keys.nodes(), S.NodeStatus)
        assert sum(n.value.node_id.startswith("many-") for n in nodes) == 500
        assert not any(s.lost.is_set() for s in sessions)
    assert keeper._streams == streams  # the same streams all along
    await asyncio.gather(*(s.close() for s in sessions))


async def test_session_replaces_a_lost_lease_and_reregisters(store: Store, keys: Keyspace) -> None:
    session = Session(store.client, ttl_s=2)
    await session.start()
    first = session.lease_id
    key = keys.node("n1")

    async def reregister(lease: int) -> None:
        await store.put(key, S.NodeStatus(node_id="n1"), lease=lease)

    session.on_new_lease(reregister)
    await reregister(first)
    await store.client.revoke_lease(first)  # etcd lost it (restored from backup, say)
    assert await store.get(key, S.NodeStatus) is None
    await eventually(lambda: session.lease_id != first, timeout=5, what="a new lease")
    await eventually(
        lambda: store.get(key, S.NodeStatus),
        timeout=5,
        what="the key written again under the new lease",
    )
    await session.close()


async def test_deposed_leader_cannot_write(etcd_client: aetcd.Client, keys: Keyspace) -> None:
    store = Store(etcd_client, keys)
    sa, sb = Session(etcd_client, 2), Session(etcd_client, 2)
    await sa.start()
    await sb.start()
    ea, eb = Election(etcd_client, sa, keys.election()), Election(etcd_client, sb, keys.election())
    a = await ea.campaign(b"a")
    b_task = asyncio.create_task(eb.campaign(b"b"))
    leader = await eb.leader()
    assert leader is not None and leader.value == b"a"
    target = keys.placement("n1", "m")
    assert await store.txn_if_created_at(a.key, a.token, [(target, S.Placement(epoch=a.token))], [])

    await sa.close()  # A's lease ends (revoked here; expiry behaves the same)
    b = await asyncio.wait_for(b_task, 10)
    assert b.token > a.token
    # A still "believes" it leads and writes with its old token: the fence rejects it.
    rejected = await store.txn_if_created_at(a.key, a.token, [(target, S.Placement(epoch=1))], [])
    assert not rejected
    assert await store.txn_if_created_at(b.key, b.token, [(target, S.Placement(epoch=b.token))], [])
    stored = await store.get(target, S.Placement)
    assert stored is not None and stored.epoch == b.token
    await sb.close()


async def test_router_table_follows_watches(store: Store, keys: Keyspace) -> None:
    table = EndpointTable(store.client, keys)
    table.start()
    await table.synced()
    assert table.current.resolve("demo") is None
    await store.put(keys.model("demo"), spec("demo", aliases=["tiny"]))
    replica = S.ReplicaStatus(
        model="demo", node_id="n1", address="h:1", state=S.REPLICA_STATE_LOADING
    )
    await store.put(keys.replica("demo", "n1"), replica)
    route = await eventually(lambda: table.current.resolve("tiny"), 5, "the model via its alias")
    assert route.ready == ()
    replica.state = S.REPLICA_STATE_READY
    await store.put(keys.replica("demo", "n1"), replica)
    await eventually(lambda: table.current.resolve("demo").ready, 5, "the READY replica")  # type: ignore[union-attr]
    await store.delete(keys.replica("demo", "n1"))
    await eventually(lambda: not table.current.resolve("demo").ready, 5, "the replica gone")  # type: ignore[union-attr]
    await store.delete(keys.model("demo"))
    await eventually(lambda: table.current.resolve("demo") is None, 5, "the model gone")
    await table.stop()


async def test_watchers_and_leases_recover_after_etcd_restart(tmp_path: Path) -> None:
    server = EtcdProcess(tmp_path / "etcd")
    server.start()
    client = connect(EtcdConfig(server.endpoint))
    keys = Keyspace("/restart/")
    store = Store(client, keys)
    try:
        session = Session(client, ttl_s=2)
        await session.start()
        await store.put(keys.node("alive"), S.NodeStatus(node_id="alive"), lease=session.lease_id)
        mirror = Mirror(client, keys.models(), S.ModelSpec)
        mirror.start()
        await store.put(keys.model("before"), spec("before"))
        await eventually(lambda: keys.model("before") in mirror.snapshot, 5, "the first key")

        server.stop()
        await eventually(lambda: mirror.reconnects > 0, 10, "the watch to notice the outage")
        server.start()

        await eventually(
            lambda: _put_ok(store, keys.model("after")), 15, "a write after the restart"
        )
        await eventually(
            lambda: (
                keys.model("after") in mirror.snapshot and keys.model("before") in mirror.snapshot
            ),
            15,
            "the mirror to re-list and see both keys",
        )
        # The session's lease survived (etcd restores leases with a fresh TTL) or was replaced.
        await eventually(lambda: store.get(keys.node("alive"), S.NodeStatus), 10, "the leased key")
        await mirror.stop()
        await session.close()
    finally:
        await client.close()
        server.stop()


async def _put_ok(store: Store, key: bytes) -> bool:
    await store.put(key, spec(store.keys.parse(key)[1]))
    return True


@pytest.mark.parametrize("ttl", [1])
def test_session_refuses_ttl_below_etcd_minimum(ttl: int) -> None:
    with pytest.raises(ValueError, match="ttl_s must be >= 2"):
        Session(None, ttl_s=ttl)  # type: ignore[arg-type]


async def test_mirror_publishes_a_burst_once_with_each_change(
    etcd_client: aetcd.Client, keys: Keyspace, store: Store
) -> None:
    """Forty keys written in one transaction reach a change listener as one batch (each key
    once, with what it was and is), and the snapshot is copied only when read."""
    mirror = Mirror(etcd_client, keys.models(), S.ModelSpec)
    batches: list[list[tuple[bytes, S.ModelSpec | None, S.ModelSpec | None]]] = []
    mirror.subscribe_changes(batches.append)
    mirror.start()
    await mirror.synced.wait()
    first = mirror.snapshot
    tx = etcd_client.transactions
    names = [f"m{i}" for i in range(40)]
    ops = [tx.put(keys.model(n), spec(n).SerializeToString()) for n in names]
    await etcd_client.transaction(compare=[], success=ops, failure=[])
    await eventually(lambda: any(batches), 5, "the burst published")
    burst = [b for b in batches if b]
    assert len(burst) == 1 and len(burst[0]) == 40, [len(b) for b in batches]
    assert all(old is None and new is not None for _k, old, new in burst[0])
    assert len(first) == 0  # a snapshot taken before stays as it was
    assert mirror.snapshot is mirror.snapshot  # one copy per change, not per read
    await store.delete(keys.model("m3"))
    await eventually(lambda: len(batches) == 3, 5, "the delete published")  # list, burst, delete
    assert len(mirror.snapshot) == 39
    key, old, new = batches[-1][0]
    assert key == keys.model("m3") and old is not None and old.name == "m3" and new is None
    await mirror.stop()
