"""The router's admission queue: replica capacity, FIFO hand-over, exclusions, bounds and honest
errors. A real EndpointTable whose routes are published by hand (no etcd needed to decide)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, connect
from meshserve.router.core.admission import Admission
from meshserve.router.core.demand import DemandTracker
from meshserve.router.core.ensure import Ensured
from meshserve.router.core.prefixes import Prompt
from meshserve.router.core.table import EndpointTable
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.endpoints import Route
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2 as S

from tests.factories import spec


def replica(
    node: str, incarnation: int = 1, max_streams: int = 2, generation: int = 1
) -> S.ReplicaStatus:
    return S.ReplicaStatus(
        model="m",
        node_id=node,
        address=f"{node}:1",
        state=S.REPLICA_STATE_READY,
        max_streams=max_streams,
        incarnation=incarnation,
        generation=generation,
    )


def install(
    table: EndpointTable, specs: list[S.ModelSpec], replicas: Iterable[S.ReplicaStatus]
) -> None:
    """As the mirrors' changes would: each spec and replica put, then the listeners told."""
    b, changed = table.builder, set()
    for s in specs:
        changed |= b.spec(s.name, s)
    for r in replicas:
        key = f"{r.model}/{r.node_id}".encode()
        changed |= b.replica(key, r, b.statuses[r.model].get(key))
    table.publish(changed)


def admission(*replicas: S.ReplicaStatus, per_model: int = 8, ready_in_s: float = 0.0) -> Admission:
    table = EndpointTable(connect(EtcdConfig("127.0.0.1:1")), Keyspace())  # never started
    install(table, [spec("m")], replicas)

    async def ensure(_model: str, _wake: bool = False) -> Ensured:
        return Ensured("", ready_in_s)

    return Admission(table, ensure, Breakers(), DemandTracker("r"), per_model, 30.0, 0.05)


def route(a: Admission) -> Route:
    r = a.table.current.resolve("m")
    assert r is not None
    return r


async def test_capacity_then_oldest_waiter_first() -> None:
    a = admission(replica("n1"))
    s1, s2 = await a.acquire(route(a)), await a.acquire(route(a))
    third = asyncio.create_task(a.acquire(route(a), deadline_s=5))
    fourth = asyncio.create_task(a.acquire(route(a), deadline_s=5))
    await asyncio.sleep(0.01)
    assert not third.done() and not fourth.done()  # both slots taken: they queue
    a.release(s1)
    got = await asyncio.wait_for(third, 1)
    assert got.waited_s > 0 and not fourth.done()  # the oldest got the slot
    a.release(s2)
    await asyncio.wait_for(fourth, 1)


async def test_excluded_replica_waits_for_a_new_incarnation() -> None:
    a = admission(replica("n1", incarnation=1))
    first = await a.acquire(route(a))
    a.release(first)
    waiting = asyncio.create_task(a.acquire(route(a), deadline_s=5, exclude={("n1:1", 1, 1)}))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the only replica failed this request: not again
    install(a.table, [spec("m")], [replica("n1", incarnation=2)])  # restarted
    slot = await asyncio.wait_for(waiting, 1)
    assert slot.endpoint.incarnation == 2


async def test_excluded_replica_loaded_again_is_taken() -> None:
    """The agent reloaded the replica after it failed (same agent, same lease): a request that
    gave up on the old load takes the new one instead of waiting out its deadline."""
    a = admission(replica("n1", generation=1))
    waiting = asyncio.create_task(a.acquire(route(a), deadline_s=5, exclude={("n1:1", 1, 1)}))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    install(a.table, [spec("m")], [replica("n1", generation=2)])  # loaded again
    slot = await asyncio.wait_for(waiting, 1)
    assert slot.endpoint.identity == ("n1:1", 1, 2)
    a.release(slot)


async def test_full_queue_and_deadline_say_why() -> None:
    a = admission(replica("n1", max_streams=1), per_model=1)
    await a.acquire(route(a))
    queued = asyncio.create_task(a.acquire(route(a), deadline_s=0.4))
    await asyncio.sleep(0.01)
    with pytest.raises(ServiceError) as full:
        await a.acquire(route(a), deadline_s=1)
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(ServiceError) as late:
        await queued
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "busy" in str(late.value)


async def test_a_load_past_the_deadline_fails_at_once() -> None:
    a = admission(ready_in_s=30.0)  # no replica; the scheduler expects one in 30 s
    started = asyncio.get_running_loop().time()
    with pytest.raises(ServiceError) as e:
        await a.acquire(route(a), deadline_s=10)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "needs about" in str(e.value)
    assert asyncio.get_running_loop().time() - started < 1.0
    await a.close()


async def test_a_repository_load_waits_through_the_one_cold_start_loop() -> None:
    """KServe's repository load waits in admission's cold-start loop (ensure.py): it returns
    once a replica is READY, says why when the scheduler cannot place the model, and gives up
    at its deadline (the load goes on)."""
    table = EndpointTable(connect(EtcdConfig("127.0.0.1:1")), Keyspace())  # never started
    install(table, [spec("m")], [])
    answers: list[str] = []
    verdict = ""

    async def ensure(model: str, _wake: bool = False) -> Ensured:
        answers.append(model)
        return Ensured(verdict)

    cold = Admission(table, ensure, Breakers(), DemandTracker("r"), 8, 30.0, 0.05).cold
    with pytest.raises(ServiceError) as late:
        await cold.until_ready("m", time.monotonic() + 1.2)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and answers  # it asked
    verdict = "no node has 80 GiB free"
    with pytest.raises(ServiceError) as refused:
        await cold.until_ready("m", time.monotonic() + 30)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no node has 80 GiB free" in refused.value.message
    verdict = ""
    waiting = asyncio.create_task(cold.until_ready("m", time.monotonic() + 30))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    install(table, [], [replica("a")])  # a replica turns READY
    await asyncio.wait_for(waiting, 5)
    await cold.close()


def test_an_unreachable_only_replica_waits_for_the_table_not_the_attempt_count() -> None:
    """The model's only replica refuses connections (its agent died; its lease has yet to end):
    retries wait for the table within the queue timeout instead of spending the attempts; any
    other failure, or the same with another replica to go to, counts as before."""
    from meshserve.router.config import RouterConfig
    from meshserve.router.core.admission import Slot
    from meshserve.router.core.attempts import AttemptPolicy, Broken, Tries
    from meshserve.router.core.budget import RetryBudget

    table = EndpointTable(connect(EtcdConfig("127.0.0.1:1")), Keyspace())  # never started
    install(table, [spec("m")], [replica("a")])
    config = RouterConfig(max_attempts=1, queue_timeout_s=5.0)
    policy = AttemptPolicy(config, table, Breakers(), RetryBudget(1.0))
    route = table.current.resolve("m")
    assert route is not None
    slot = Slot(route, route.ready[0])
    dead = Broken("UNAVAILABLE: failed to connect", unreachable=True)
    tries = Tries("m")
    for now in (100.0, 101.0, 104.9):
        assert policy.retry(tries, slot, dead, now) <= 1.0
    assert tries.retries == 0
    with pytest.raises(ServiceError):
        policy.retry(tries, slot, dead, 105.1)  # past the queue timeout: it counts
    with pytest.raises(ServiceError):
        policy.retry(Tries("m"), slot, Broken("INTERNAL: boom"), 100.0)
    install(table, [], [replica("b")])  # another replica to go to: the attempt counts
    with pytest.raises(ServiceError):
        policy.retry(Tries("m"), slot, dead, 100.0)


def asleep(node: str, restore_s: float, tier: int = S.TIER_HOST) -> S.ReplicaStatus:
    r = replica(node)
    r.state, r.tier, r.restore_seconds = S.REPLICA_STATE_OFFLOADED, tier, restore_s  # type: ignore[assignment]
    return r


def waking(*replicas: S.ReplicaStatus, refuse: str = "") -> tuple[Admission, list[bool]]:
    """An admission whose scheduler records each EnsureModel's ``wake`` and refuses with
    ``refuse`` (when set)."""
    table = EndpointTable(connect(EtcdConfig("127.0.0.1:1")), Keyspace())  # never started
    install(table, [spec("m")], replicas)
    asked: list[bool] = []

    async def ensure(_model: str, wake: bool = False) -> Ensured:
        asked.append(wake)
        return Ensured("", 0.0, refuse if wake else "")

    return Admission(table, ensure, Breakers(), DemandTracker("r"), 8, 30.0, 0.05), asked


async def test_a_request_with_no_free_slot_wakes_an_asleep_replica_and_takes_it() -> None:
    """The READY replica's slot is taken: the router asks the scheduler for a wake (once,
    however many wait), of the quickest sleeper, and the request takes it once it turns READY,
    before the busy one frees; the route lists it as asleep until then."""
    a, asked = waking(replica("n1", max_streams=1), asleep("n2", 0.3), asleep("n3", 2.0))
    assert [e.node_id for e in route(a).asleep] == ["n2", "n3"]
    assert route(a).asleep[0].restore_s == 0.3
    busy = await a.acquire(route(a))
    waiters = [asyncio.create_task(a.acquire(route(a), deadline_s=5)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert asked == [True] and not any(w.done() for w in waiters)
    [(_asked, d)] = list(a.decisions.last("m", 1))
    assert "woke an asleep replica" in d.note and "n2" in d.note, d.note
    install(a.table, [spec("m")], [replica("n2", max_streams=1)])  # restored: READY
    first = await asyncio.wait_for(waiters[0], 1)
    assert first.endpoint.node_id == "n2" and not waiters[1].done()
    # The other still finds no slot: it wakes the next sleeper, but takes the first slot that
    # frees on a READY replica meanwhile.
    await asyncio.sleep(0.05)
    assert asked == [True, True] and a.wakes.pending["m"].endpoint.node_id == "n3"
    a.release(busy)
    assert (await asyncio.wait_for(waiters[1], 1)).endpoint.node_id == "n1"
    await a.close()


async def test_a_refused_wake_sends_requests_back_to_the_ready_replicas() -> None:
    a, asked = waking(replica("n1", max_streams=1), asleep("n2", 0.3), refuse="max_replicas")
    busy = await a.acquire(route(a))
    waiter = asyncio.create_task(a.acquire(route(a), deadline_s=5))
    await asyncio.sleep(0.05)
    assert asked == [True] and a.wakes.pending["m"].refused == "max_replicas"
    a.release(busy)
    assert (await asyncio.wait_for(waiter, 1)).endpoint.node_id == "n1"
    await a.close()


async def test_a_free_slot_is_taken_unless_the_sleeper_answers_over_twice_as_fast() -> None:
    """With a slot free, the prediction decides (restore + prefill vs queue + prefill): a
    replica with a long queue loses to a quick restore, a short one keeps the request."""
    prompt = Prompt(tokens=4_000)
    quick = replica("n1", max_streams=64)
    quick.waiting = 0
    a, asked = waking(quick, asleep("n2", 0.2))
    slot = await a.acquire(route(a), prompt=prompt)
    assert slot.endpoint.node_id == "n1" and asked == []
    a.release(slot)
    jammed = replica("n1", max_streams=64)
    jammed.waiting = 40  # 40 prompts queued in its engine: seconds of prefill ahead
    b, asked = waking(jammed, asleep("n2", 0.2))
    waiter = asyncio.create_task(b.acquire(route(b), deadline_s=5, prompt=prompt))
    await asyncio.sleep(0.05)
    assert asked == [True] and not waiter.done()
    install(b.table, [spec("m")], [replica("n2", max_streams=64)])
    assert (await asyncio.wait_for(waiter, 1)).endpoint.node_id == "n2"
    await a.close()
    await b.close()
