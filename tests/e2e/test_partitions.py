"""Partitions between hosts, through real processes: etcd (three members), two schedulers, two
node agents and a router, each in a network namespace of its own on a private bridge
(meshserve.netns), so a link between two of them can be cut — both ways or one way — while
every other link stays. Needs root (CI runs as root); without it they skip, listed in the
run's summary."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aetcd
import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import pytest
from meshserve.cluster.etcd_process import EtcdCluster
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.netns import Hosts, available
from meshserve.rpc.errors import decode_details, error_reason
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2

from tests.e2e.conftest import (
    apply,
    assert_clean_stop,
    generate,
    model_spec,
    ready_replicas,
    replica_records,
)
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.netns]
ETCD = ("etcd-0", "etcd-1", "etcd-2")  # a three-member cluster, each member a host
SERVICES = (*ETCD, "scheduler-0", "scheduler-1", "agent-0", "agent-1", "router")
LEASE_S = 2
TOKENS = 1200


@pytest.fixture(scope="module")
def pmesh(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> Iterator[tuple[Mesh, Hosts]]:
    why = available()
    if why and os.geteuid() != 0:
        pytest.skip(why)  # listed in the run's summary; allowed only without root
    assert not why, why  # as root (CI) a partition test that cannot run fails
    hosts = Hosts()
    for name in SERVICES:
        hosts.add(name)
    m = Mesh(
        tmp_path_factory.mktemp("partitions"), lease_ttl_s=LEASE_S, etcd_members=3, hosting=hosts
    )
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_scheduler("scheduler-1")  # a standby
        m.start_agent("agent-0")
        m.start_agent("agent-1")
        m.start_router()
        asyncio.run(apply(m, model_spec("demo", demo_model, min_replicas=2)))
        router = m.services["router"].address
        asyncio.run(eventually(lambda: _two(router), 120, "a replica on each agent"))
        yield m, hosts
    except BaseException:
        m.stop()
        hosts.close()
        raise
    try:
        assert_clean_stop(m)
    finally:
        hosts.close()


def cut_from_etcd(hosts: Hosts, name: str, heal: bool = False) -> None:
    """``name`` loses (or gets back) its links to every etcd member."""
    for member in ETCD:
        (hosts.heal if heal else hosts.cut)(member, name)


async def _two(router: str) -> bool:
    return await ready_replicas(router, "demo") >= 2


def greedy(tokens: int = TOKENS) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model="demo", prompt="The scheduler decided")
    r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = tokens, 0.0, True
    return r


class Reader:
    """One stream through the router; ``fault(node)`` after ``after`` tokens; records the
    tokens, the longest silence after the fault, the trailers and the error."""

    def __init__(self, router: str) -> None:
        self.router = router
        self.ids: list[int] = []
        self.node = ""
        self.gap = 0.0
        self.trailers: dict[str, str] = {}
        self.error: grpc.aio.AioRpcError | None = None
        self.request = greedy()

    async def run(self, after: int, fault: object, timeout: float = 120) -> None:
        faulted = 0.0
        last = 0.0
        async with grpc.aio.insecure_channel(self.router) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(self.request, timeout=timeout)
            try:
                async for msg in call:
                    now = time.monotonic()
                    if faulted:
                        self.gap = max(self.gap, now - last)
                    last = now
                    self.ids += msg.token_ids
                    self.node = self.node or dict(await call.initial_metadata())["meshserve-node"]
                    if not faulted and len(self.ids) >= after:
                        fault(self.node)  # type: ignore[operator]
                        faulted = last = time.monotonic()
                self.trailers = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
            except grpc.aio.AioRpcError as e:
                self.error = e


async def test_partition_router_agent_mid_stream_moves_the_stream(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """The router loses its link to the agent serving a stream (the agent keeps its lease: etcd
    still sees it): the stream continues on the other replica within seconds, exactly, with
    one failover."""
    mesh, hosts = pmesh
    router = mesh.services["router"].address
    expected = (await generate(router, greedy(), timeout=120)).token_ids
    s = Reader(router)
    cut: list[str] = []

    def partition(node: str) -> None:
        hosts.cut("router", node)
        cut.append(node)

    try:
        await s.run(after=40, fault=partition)
    finally:
        for node in cut:
            hosts.heal("router", node)
    assert s.error is None, s.error
    assert s.ids == expected and s.trailers.get("meshserve-failovers") == "1"
    assert s.gap < 5.0, f"the stream stalled {s.gap:.1f} s before it moved"


async def test_partition_one_way_agent_hears_nothing_the_stall_watch_moves_the_stream(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """One-way loss: the serving agent can send to the router but hears nothing from it (etcd
    still hears it and renews its lease: the table keeps the replica). Its tokens stop arriving
    for want of acknowledgements; the router's stall watch tells within seconds (the stream's
    pace, not the 30 s inter-token timeout) and the stream goes on on the other replica,
    exactly. (Deaf to etcd as well, its lease lapses and the router leaves it on that.)"""
    mesh, hosts = pmesh
    router = mesh.services["router"].address
    expected = (await generate(router, greedy(), timeout=120)).token_ids
    s = Reader(router)
    cut: list[str] = []

    def deafen(node: str) -> None:
        hosts.cut("router", node, one_way=True)  # the router's packets to the agent are lost
        cut.append(node)

    try:
        await s.run(after=40, fault=deafen)
    finally:
        for node in cut:
            hosts.heal("router", node)
    assert s.error is None, s.error
    assert s.ids == expected and s.trailers.get("meshserve-failovers") == "1"
    # its pace says 2 s (stall_floor_s); the keepalives would take 5-15 s, the inter-token limit 30
    assert s.gap < 4.0, f"the stream stalled {s.gap:.1f} s before it moved"
    await eventually(lambda: _two(router), 60, "both replicas READY again")


def sim_request(tokens: int = 300, model: str = "solo") -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt="cut off")
    r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = tokens, 0.0, True
    return r


async def solo_on(mesh: Mesh) -> str:
    """A sim model with one replica (max_replicas 1); the node it is READY on."""
    spec = model_spec("solo", "sim://solo", engine="sim", memory="64MiB", min_replicas=1,
                      max_replicas=1)  # fmt: skip
    spec.engine_args.update(ttft_ms="5", itl_ms="20")
    await apply(mesh, spec)
    router = mesh.services["router"].address
    await eventually(lambda: ready_replicas(router, "solo"), 60, "solo READY")
    out = await generate(router, sim_request(4), timeout=30)
    return out.headers["meshserve-node"]


async def stream_solo(router: str, fault: object, after: int = 20) -> Reader:
    s = Reader(router)
    s.request = sim_request()
    await s.run(after=after, fault=fault)
    return s


async def _only_on(mesh: Mesh, node: str) -> bool:
    return await solo_nodes(mesh) == {node}


async def solo_nodes(mesh: Mesh) -> set[str]:
    return {r.node_id for r in await replica_records(mesh)
            if r.model == "solo" and r.state == S.REPLICA_STATE_READY}  # fmt: skip


async def test_partition_from_the_only_replica_places_another_and_the_request_goes_on(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """Cut from the only replica of a model (its agent still holds its lease: etcd calls it
    healthy), the router opens its breaker and says so in its demand; the scheduler places a
    replica on the idle agent, and the waiting stream goes on there, exactly. Once the link
    heals and a request proves the first replica back, the surplus goes."""
    mesh, hosts = pmesh
    node = await solo_on(mesh)
    other = next(n for n in ("agent-0", "agent-1") if n != node)
    router = mesh.services["router"].address
    expected = (await generate(router, sim_request(), timeout=60)).token_ids
    cut: list[str] = []

    def partition(serving: str) -> None:
        hosts.cut("router", serving)
        cut.append(serving)

    try:
        s = await stream_solo(router, partition)
        during = await solo_nodes(mesh)
    finally:
        for n in cut:
            hosts.heal("router", n)
    assert cut == [node]
    assert s.error is None, s.error
    assert s.ids == expected  # nothing lost, nothing repeated, though it waited for a new one
    assert s.trailers.get("meshserve-failovers") == "1"
    assert during == {node, other}  # the cut replica kept (the link may heal), one more placed

    async def one_again() -> bool:  # requests probe the healed replica; its breaker closes
        assert (await generate(router, sim_request(4), timeout=30)).token_ids
        return len(await solo_nodes(mesh)) == 1

    await eventually(one_again, 90, "the surplus replica gone once the link healed")


async def test_partition_with_nowhere_else_to_go_waits_and_resumes_on_the_same_replica(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """The only replica is cut off and no other node may take one (cordoned): the stream waits
    (it has a deadline) and, once the link heals, goes on on the same replica, exactly."""
    mesh, hosts = pmesh
    node = await solo_on(mesh)
    other = next(n for n in ("agent-0", "agent-1") if n != node)
    router = mesh.services["router"].address
    expected = (await generate(router, sim_request(), timeout=60)).token_ids
    assert cli(mesh, "node", "cordon", other).returncode == 0
    try:
        healed: list[float] = []

        def partition(serving: str) -> None:
            hosts.cut("router", serving)
            asyncio.get_running_loop().call_later(6.0, heal, serving)

        def heal(serving: str) -> None:
            hosts.heal("router", serving)
            healed.append(time.monotonic())

        s = await stream_solo(router, partition)
    finally:
        if not healed:
            hosts.heal("router", node)
        assert cli(mesh, "node", "uncordon", other).returncode == 0
    assert s.error is None, s.error
    assert s.ids == expected
    assert await solo_nodes(mesh) == {node}  # nowhere else: it went on where it was
    assert s.trailers.get("meshserve-failovers") == "1"
    assert 6.0 <= s.gap < 6.0 + 20.0, f"it resumed {s.gap:.1f} s after the cut"


def cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshserve", *args, "--etcd", mesh.etcd.endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def reason_of(address: str, request: inference_pb2.GenerateRequest) -> str:
    """The reason a direct call to an agent was refused with ("" when it was served)."""
    try:
        await generate(address, request, timeout=10)
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name} {error_reason(decode_details(e.trailing_metadata()))}"
    return ""


async def test_partition_agent_etcd_expires_its_lease_fences_it_and_it_rejoins_once(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """An agent cut from etcd mid-stream (the router still reaches it): its lease expires, the
    router drops its replica and moves the stream, the scheduler places the model on the other
    agent within the lease TTL and a round; the cut agent takes no new streams (it cannot know
    whether its placements still hold: AGENT_FENCED). Healed, it registers again and the model
    ends with one replica (max_replicas 1), never two placements."""
    mesh, hosts = pmesh
    node = await solo_on(mesh)
    other = next(n for n in ("agent-0", "agent-1") if n != node)
    router = mesh.services["router"].address
    expected = (await generate(router, sim_request(), timeout=60)).token_ids
    cut_at: list[float] = []

    def partition(serving: str) -> None:
        cut_from_etcd(hosts, serving)
        cut_at.append(time.monotonic())

    placed_twice: list[set[str]] = []

    async def placements() -> set[str]:
        client = connect(EtcdConfig(mesh.etcd.endpoint))
        try:
            store = Store(client, Keyspace())
            found = set()
            for n in ("agent-0", "agent-1"):
                held, _ = await store.list(store.keys.placements(n), S.Placement)
                found |= {n for p in held if p.value.model == "solo"}
            return found
        finally:
            await client.close()

    try:
        s = await stream_solo(router, partition)
        replaced = time.monotonic() - cut_at[0]
        # READY there (polled: on a loaded machine the record may be rewritten at this moment —
        # CI once read no READY replica the instant the stream ended)
        await eventually(lambda: _only_on(mesh, other), 3 * LEASE_S, f"solo READY on {other}")
        fenced = await reason_of(mesh.services[node].address, sim_request(4))
        assert fenced == "UNAVAILABLE AGENT_FENCED", fenced
    finally:
        cut_from_etcd(hosts, node, heal=True)
    assert s.error is None, s.error
    assert s.ids == expected and s.trailers.get("meshserve-failovers") == "1"
    # the stream waited for the new placement: lease TTL (+ a TTL of grace) and a round
    assert replaced < 3 * LEASE_S + 10, f"re-placed {replaced:.1f} s after the cut"

    async def rejoined() -> bool:
        if len(found := await placements()) > 1:
            placed_twice.append(found)
        nodes = {r.node_id for r in await replica_records(mesh) if r.model == "solo"}
        return nodes == {other} and await reason_of(mesh.services[node].address, greedy(4)) == ""

    await eventually(rejoined, 60, "the healed agent registered again, serving, solo once")
    assert not placed_twice, placed_twice
    await eventually(lambda: _two(router), 60, "demo on both agents again")


async def candidates(store: Store) -> list[tuple[str, int]]:
    """(scheduler id, fencing token) of each candidate, the leader first."""
    got = await store.client.get_prefix(
        store.keys.election(), sort_order="ascend", sort_target="create"
    )
    return [
        (S.SchedulerCandidate.FromString(kv.value).scheduler_id, int(kv.create_revision))
        for kv in got
    ]


async def history(store: Store, since: int) -> list[tuple[int, S.Placement]]:
    """Every placement written since revision ``since``: (revision, placement). Reads the
    watch up to a marker key written now (outside every prefix a service reads)."""
    marker = store.keys.prefix.encode() + b"tests/marker"
    await store.client.put(marker, b"")
    out: list[tuple[int, S.Placement]] = []
    watch = await store.client.watch_prefix(store.keys.prefix.encode(), start_revision=since)
    try:
        async with asyncio.timeout(30):
            async for event in watch:
                if event.kv.key == marker:
                    break
                if event.kind == "PUT" and event.kv.key.startswith(store.keys.placements()):
                    out.append((event.kv.mod_revision, S.Placement.FromString(event.kv.value)))
    finally:
        await watch.cancel()
    return out


async def test_partition_scheduler_leader_etcd_is_fenced_and_a_standby_takes_over(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """The leading scheduler is cut from etcd: the standby leads within the lease TTL and
    places what comes meanwhile; once the old leader is back, its writes are refused (no
    placement carries its epoch after the standby took over) and it stands again as a
    candidate."""
    mesh, hosts = pmesh
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    store = Store(client, Keyspace())
    try:
        (old, old_token), *_ = await candidates(store)
        since = int((await store.client.get_prefix(store.keys.placements())).header.revision)
        cut_from_etcd(hosts, old)
        cut = time.monotonic()
        try:
            await eventually(
                lambda: _led_by_another(store, old), 30, "a standby leading"
            )  # fmt: skip
            took = time.monotonic() - cut
            (new, new_token), *_ = await candidates(store)
            await apply(mesh, sim_spec("after-takeover"))
            router = mesh.services["router"].address
            await eventually(lambda: ready_replicas(router, "after-takeover"), 60, "placed")
        finally:
            cut_from_etcd(hosts, old, heal=True)

        async def standing_again() -> bool:
            return old in {sid for sid, _ in await candidates(store)}

        await eventually(standing_again, 30, f"{old} a candidate again, behind {new}")
        assert (await candidates(store))[0] == (new, new_token)  # it did not take over back
        written = await history(store, since + 1)
    finally:
        await client.close()
    assert took < 3 * LEASE_S + 5, f"the standby led {took:.1f} s after the cut"
    late = [(rev, p.model, p.node_id) for rev, p in written if p.epoch == old_token
            and rev > new_token]  # fmt: skip
    assert not late, f"the deposed leader's writes went through: {late}"
    assert any(p.epoch == new_token for _rev, p in written)  # the standby did write
    assert "lost leadership" in (mesh.data_dir / "logs" / f"{old}.log").read_text()


async def _led_by_another(store: Store, old: str) -> bool:
    found = await candidates(store)
    return bool(found) and found[0][0] != old


def sim_spec(name: str) -> S.ModelSpec:
    spec = model_spec(name, f"sim://{name}", engine="sim", memory="64MiB", min_replicas=1)
    spec.engine_args.update(ttft_ms="5", itl_ms="20")
    return spec


async def etcd_leader(mesh: Mesh) -> int:
    """The index of the member that leads the etcd cluster now (-1: none)."""
    assert isinstance(mesh.etcd, EtcdCluster)
    return await asyncio.to_thread(mesh.etcd.leader)


async def test_partition_etcd_leader_member_a_new_one_leads_and_the_mesh_goes_on(
    pmesh: tuple[Mesh, Hosts],
) -> None:
    """The etcd member that leads is cut off from everyone (members and services): the other
    two elect a leader; every request to a READY model is served meanwhile, a model applied
    meanwhile is placed and served; healed, the member catches up (three members again)."""
    mesh, hosts = pmesh
    router = mesh.services["router"].address
    await eventually(lambda: _two(router), 60, "demo READY on both agents")
    lost = await etcd_leader(mesh)
    hosts.isolate(ETCD[lost])
    try:
        serving = asyncio.create_task(serve_for(router, 15.0))
        await eventually(lambda: _applied(mesh, sim_spec("during-leader-loss")), 30, "applied")
        await eventually(lambda: ready_replicas(router, "during-leader-loss"), 60, "placed")
        assert (await generate(router, sim_request(4, "during-leader-loss"))).token_ids
        served, failures = await serving
        assert await etcd_leader(mesh) != lost
    finally:
        hosts.rejoin(ETCD[lost])
    assert not failures and served > 10, (served, failures[:3])

    async def caught_up() -> bool:
        return await etcd_leader(mesh) >= 0 and await _member_answers(mesh, lost)

    await eventually(caught_up, 60, "the cut member back in the cluster")


async def serve_for(router: str, seconds: float) -> tuple[int, list[str]]:
    """Short requests to the READY demo model back to back: (served, failures)."""
    served, failures = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            assert len((await generate(router, greedy(4), timeout=10)).token_ids) == 4
            served += 1
        except grpc.aio.AioRpcError as e:
            failures.append(f"{e.code().name}: {e.details()}")
    return served, failures


async def _member_answers(mesh: Mesh, i: int) -> bool:
    """Member ``i`` serves a linearizable read (it has a leader and is caught up)."""
    assert isinstance(mesh.etcd, EtcdCluster)
    return await asyncio.to_thread(mesh.etcd.members[i].healthy)


async def _applied(mesh: Mesh, spec: S.ModelSpec) -> bool:
    """A call that lands on the cut member times out (as etcdctl's would) until the client's
    keepalive finds that member's connection dead (8 s); the next goes to another member."""
    try:
        await apply(mesh, spec)
    except aetcd.exceptions.ClientError:
        return False
    return True
