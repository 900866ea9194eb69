"""Tenancy's pure parts: the tenants document, limits (token buckets, concurrency, shares),
fair queueing, usage; and admission's priority order, fair shares, shedding and headroom."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshserve.router.core.admission import Slot, Who
from meshserve.router.tenancy.fairqueue import FairQueue
from meshserve.router.tenancy.quota import Quotas
from meshserve.router.tenancy.tenants import Limits, Price, Tenant, hash_key, new_key, parse_book
from meshserve.router.tenancy.usage import UsageLedger
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import common_pb2 as C

from tests.unit.test_admission import admission, replica, route

KEY = new_key()
GOOD = f"""
tenants:
  - name: search
    keys: [{hash_key(KEY)}]
    models: ["llama-*", demo]
    max_priority: high
    weight: 2
    limits: {{requests_per_s: 5, tokens_per_min: 600, concurrent: 2}}
    model_limits: {{demo: {{requests_per_s: 1}}}}
  - name: batch
    cert_subjects: [CN=batch]
    default_priority: low
prices:
  demo: {{input_per_1k: 1.0, output_per_1k: 2.0}}
"""


# --- the document ----------------------------------------------------------------------------


def test_a_good_document_parses_with_defaults() -> None:
    book = parse_book(GOOD)
    search, batch = book.tenants
    assert book.auth and book.by_hash[hash_key(KEY)] is search
    assert book.by_subject["CN=batch"] is batch
    assert search.limits == Limits(5, 600, 2) and search.weight == 2
    assert search.model_limits["demo"] == Limits(requests_per_s=1)
    assert batch.models == ("*",) and batch.default_priority == C.PRIORITY_LOW
    assert book.prices["demo"].cost(1000, 500, 0) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda t: t.replace(hash_key(KEY), KEY), "never the key itself"),
        (lambda t: t.replace("max_priority: high", "max_priority: urgent"), "priority must be"),
        (lambda t: t.replace("weight: 2", "weight: 0"), "weight: must be > 0"),
        (lambda t: t.replace("concurrent: 2", "concurrent: 2.5"), "a whole number"),
        (lambda t: t.replace("requests_per_s: 5", "requests_per_s: -1"), ">= 0"),
        (lambda t: t.replace("weight: 2", "wieght: 2"), "unknown field(s) wieght"),
        (lambda t: t.replace("name: batch", "name: search"), "listed twice"),
        (lambda t: t.replace("tenants:", "tenants: {}\nx:"), "unknown top-level"),
        (lambda t: t + "  : [", "not valid YAML"),
    ],
)
def test_bad_documents_say_what_is_wrong(change: object, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_book(change(GOOD))  # type: ignore[operator]


def test_globs_and_the_priority_ceiling() -> None:
    search = parse_book(GOOD).tenants[0]
    assert search.may_use("llama-70b") and search.may_use("tiny", "demo")
    assert not search.may_use("secret")
    assert search.priority(0) == C.PRIORITY_NORMAL
    assert search.priority(C.PRIORITY_CRITICAL) == C.PRIORITY_HIGH  # capped


# --- limits ----------------------------------------------------------------------------------


def tenant(**limits: float) -> Tenant:
    return Tenant("t", limits=Limits(**limits))  # type: ignore[arg-type]


def refusal(q: Quotas, t: Tenant, now: float, model: str = "m") -> ServiceError:
    with pytest.raises(ServiceError) as e:
        q.admit(t, model, now)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return e.value


def test_requests_per_s_bucket_refuses_with_the_time_until_a_token() -> None:
    q, t = Quotas(), tenant(requests_per_s=2)
    q.admit(t, "m", 0.0)
    q.admit(t, "m", 0.0)  # a burst of one second's worth
    e = refusal(q, t, 0.1)
    assert e.reason == "REQUESTS_PER_S_LIMIT" and e.retry_after_s == pytest.approx(0.4)
    assert ("tenant", "t") in e.metadata
    q.admit(t, "m", 0.1 + (e.retry_after_s or 0.0))  # honoured: it passes


def test_tokens_per_min_goes_into_debt_and_waits_it_out() -> None:
    q, t = Quotas(), tenant(tokens_per_min=60)  # 1 token/s
    ticket = q.admit(t, "m", 0.0)
    q.finish(t, ticket, 90, 1.0)  # 60 in the bucket, 90 used: 30 in debt
    e = refusal(q, t, 1.0)
    assert e.reason == "TOKENS_PER_MIN_LIMIT" and e.retry_after_s == pytest.approx(31.0)
    q.admit(t, "m", 32.5)


def test_concurrency_frees_when_a_stream_ends() -> None:
    q, t = Quotas(), tenant(concurrent=1)
    ticket = q.admit(t, "m", 0.0)
    assert refusal(q, t, 0.0).reason == "CONCURRENT_STREAMS_LIMIT"
    q.finish(t, ticket, 0, 0.0)
    q.admit(t, "m", 0.0)


def test_a_model_limit_applies_beside_the_tenant_limit_and_takes_nothing_when_refused() -> None:
    t = Tenant("t", limits=Limits(concurrent=5), model_limits={"m": Limits(requests_per_s=1)})
    q = Quotas()
    q.admit(t, "m", 0.0)
    e = refusal(q, t, 0.0)
    assert e.reason == "REQUESTS_PER_S_LIMIT" and ("scope", "m") in e.metadata
    for _ in range(4):  # the refusal took no stream: four more fit the tenant's five
        q.admit(t, "other", 0.0)
    assert refusal(q, t, 0.0, "other").reason == "CONCURRENT_STREAMS_LIMIT"


def test_a_router_enforces_its_share_of_a_cluster_wide_limit() -> None:
    q, t = Quotas(share=lambda _t: 0.25), tenant(requests_per_s=8)  # 2/s here
    q.admit(t, "m", 0.0)
    q.admit(t, "m", 0.0)
    assert refusal(q, t, 0.0).retry_after_s == pytest.approx(0.5)


# --- fair queueing ---------------------------------------------------------------------------


def drain(q: FairQueue[str]) -> list[str]:
    out = []
    while q:
        first = next(iter(q))
        q.served(first)
        out.append(first)
    return out


def test_priority_first_then_age() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("low-1", C.PRIORITY_LOW, "a")
    q.push("normal-1", C.PRIORITY_NORMAL, "a")
    q.push("high-1", C.PRIORITY_HIGH, "a")
    q.push("normal-2", C.PRIORITY_NORMAL, "a")
    assert q.lowest() == ("low-1", C.PRIORITY_LOW)
    assert drain(q) == ["high-1", "normal-1", "normal-2", "low-1"]


def test_a_burst_does_not_hold_up_another_tenant() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(10):
        q.push(f"flood-{i}", C.PRIORITY_NORMAL, "flood")
    q.push("one", C.PRIORITY_NORMAL, "polite")
    order = drain(q)
    assert order.index("one") <= 1  # served next to the flood's first, not after ten


def test_weights_share_slots_while_both_wait() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(40):
        q.push(f"a{i}", C.PRIORITY_NORMAL, "a", weight=3)
        q.push(f"b{i}", C.PRIORITY_NORMAL, "b", weight=1)
    first = Counter(x[0] for x in drain(q)[:40])
    assert first == {"a": 30, "b": 10}


# --- usage -----------------------------------------------------------------------------------


def test_usage_totals_windows_and_cost() -> None:
    ledger = UsageLedger()
    t0 = ledger.started_ms / 1000
    price = Price(input_per_1k=1.0, output_per_1k=2.0, gpu_second=0.5)
    ledger.record("a", "m", True, 100, 50, 2.0, price, now=t0)
    ledger.record("a", "m", False, 100, 50, 2.0, price, now=t0 + 3600)
    ledger.record("b", "m", False, 10, 5, 0.0, None, now=t0 + 3600)
    rows, _ = ledger.report(None, 0)
    (ta, ma, a), (_tb, _mb, b) = rows
    assert (ta, ma, a.requests, a.cold_starts, a.input_tokens, a.output_tokens) == (
        "a",
        "m",
        2,
        1,
        200,
        100,
    )
    assert a.cost == pytest.approx(2 * (0.1 + 0.1 + 1.0)) and b.cost == 0.0
    late, covered = ledger.report(["a"], int((t0 + 1800) * 1000))
    assert [(t, c.requests) for t, _m, c in late] == [("a", 1)]
    assert covered >= int((t0 + 1800) * 1000) - 60_000


# --- admission: priority, fairness, shedding, headroom ---------------------------------------


async def test_a_higher_priority_waiter_gets_the_next_slot() -> None:
    a = admission(replica("n1", max_streams=1))
    held = await a.acquire(route(a))
    low = asyncio.create_task(a.acquire(route(a), deadline_s=5, who=Who("x", C.PRIORITY_LOW)))
    await asyncio.sleep(0.01)
    high = asyncio.create_task(a.acquire(route(a), deadline_s=5, who=Who("y", C.PRIORITY_HIGH)))
    await asyncio.sleep(0.01)
    a.release(held)
    got = await asyncio.wait_for(high, 1)
    assert not low.done()
    a.release(got)
    a.release(await asyncio.wait_for(low, 1))


async def test_a_full_queue_sheds_its_lowest_priority_for_a_higher_one() -> None:
    a = admission(replica("n1", max_streams=1), per_model=1)
    held = await a.acquire(route(a))
    low = asyncio.create_task(a.acquire(route(a), deadline_s=5, who=Who("x", C.PRIORITY_LOW)))
    await asyncio.sleep(0.01)
    high = asyncio.create_task(a.acquire(route(a), deadline_s=5, who=Who("y", C.PRIORITY_HIGH)))
    with pytest.raises(ServiceError) as shed:
        await asyncio.wait_for(low, 1)
    assert shed.value.reason == "SHED_FOR_PRIORITY" and shed.value.retry_after_s
    with pytest.raises(ServiceError) as full:  # same priority as the queue holds: refused
        await a.acquire(route(a), deadline_s=5, who=Who("z", C.PRIORITY_HIGH))
    assert full.value.reason == "QUEUE_FULL"
    a.release(held)
    a.release(await asyncio.wait_for(high, 1))


async def test_sheddable_streams_leave_a_quarter_of_the_slots_free() -> None:
    a = admission(replica("n1", max_streams=4))
    batch = Who("batch", C.PRIORITY_LOW)
    slots = [await a.acquire(route(a), who=batch) for _ in range(3)]
    fourth = asyncio.create_task(a.acquire(route(a), deadline_s=5, who=batch))
    await asyncio.sleep(0.01)
    assert not fourth.done()  # the last slot is kept for interactive traffic
    interactive: Slot = await asyncio.wait_for(a.acquire(route(a), deadline_s=1), 1)
    for s in [*slots[:1], interactive]:
        a.release(s)
    a.release(await asyncio.wait_for(fourth, 1))


async def test_tenants_of_one_priority_share_a_saturated_replica_by_weight() -> None:
    a = admission(replica("n1", max_streams=1), per_model=200)
    held = await a.acquire(route(a))
    served: list[str] = []

    async def one(who: Who) -> None:
        slot = await a.acquire(route(a), deadline_s=30, who=who)
        served.append(who.tenant)
        await asyncio.sleep(0)
        a.release(slot)

    heavy, light = Who("heavy", weight=3), Who("light", weight=1)
    tasks = [asyncio.create_task(one(heavy)) for _ in range(60)]
    tasks += [asyncio.create_task(one(light)) for _ in range(60)]
    await asyncio.sleep(0.01)
    a.release(held)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert Counter(served[:40]) == {"heavy": 30, "light": 10}


def test_a_routers_share_follows_where_the_tenants_requests_arrive() -> None:
    """Each router enforces its part of a tenant's cluster-wide limit: 3 req/s here and 1 req/s
    at another router give this one about three quarters; a tenant nobody sees is split
    equally; a router alone has it all."""
    from meshserve.router.tenancy.gate import TenantRates
    from meshserve.v1 import cluster_pb2 as S

    rates = TenantRates("r1")
    assert rates.share("t") == 1.0  # alone: the whole limit
    for _ in range(30):  # 3 req/s here over the 10 s window
        rates.arrived("t")
    rates.others = {
        b"r1": S.RouterDemand(router_id="r1", tenant_rates={"t": 3.0}),  # our own record
        b"r2": S.RouterDemand(router_id="r2", tenant_rates={"t": 1.0}),
        b"r3": S.RouterDemand(router_id="r3"),
    }
    assert 0.70 < rates.share("t") < 0.75  # 3 of 4 req/s, less a little for the idle router
    assert rates.share("quiet") == pytest.approx(1 / 3)  # nobody sees it: equal parts
    assert rates.rates() == {"t": 3.0}


@given(st.lists(st.integers(0, 200), min_size=1, max_size=6))
def test_the_routers_shares_of_a_limit_add_up_to_the_whole(arrivals: list[int]) -> None:
    """Whatever each router sees (its arrivals in the window, published as rates), the shares
    the routers compute each for itself sum to 1: the cluster-wide limit is neither exceeded
    nor left unused."""
    from meshserve.router.tenancy.gate import RATE_WINDOW_S, TenantRates
    from meshserve.v1 import cluster_pb2 as S

    routers = [TenantRates(f"r{i}") for i in range(len(arrivals))]
    for r, n in zip(routers, arrivals, strict=True):
        for _ in range(n):
            r.arrived("t")
    records = {
        f"r{i}".encode(): S.RouterDemand(router_id=f"r{i}", tenant_rates={"t": n / RATE_WINDOW_S})
        for i, n in enumerate(arrivals)
    }
    for r in routers:
        r.others = records
    assert sum(r.share("t") for r in routers) == pytest.approx(1.0)
    busiest = max(range(len(arrivals)), key=lambda i: arrivals[i])
    assert routers[busiest].share("t") >= 1 / len(arrivals) - 1e-9  # more traffic, more share
