"""Admission: a request gets a READY replica with a free stream slot, or waits for one.

Each replica publishes how many streams it admits (``max_streams``); this router sends a replica
at most that many of its own streams and holds the rest in a bounded, deadline-aware queue per
model, handing the first waiter a slot as soon as one frees on any replica (a stream ends, a
replica turns READY). Queue order (fairqueue.py): priority, then fair shares across tenants,
then age. A full queue sheds its lowest-priority waiter for a higher-priority arrival
(RESOURCE_EXHAUSTED with RetryInfo). Sheddable (PRIORITY_LOW) streams never take the last
quarter of a replica's slots, so interactive requests find one free at once. Saturation is
never failure: an agent's RESOURCE_EXHAUSTED (other routers filled it) sends the request back
here. A model with no READY replica is a cold start:
one EnsureModel at a time per model (singleflight), repeated while anyone waits; a READY fallback
model serves meanwhile. A request that would queue behind saturated READY replicas may wait for
an asleep one to be woken instead (wakes.py).

Picking: the routing pipeline (routing/pipeline.py: filters free slot, not excluded for this
request (the relay excludes a replica it gave up on), breaker (soft: an open one is used when
nothing else is left); weighted scorers; each decision kept for explain-route). A request
whose every replica is excluded waits for the table to change (a new replica, or a restarted
agent: a new incarnation).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Container, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from meshserve.router.core.decisions import DecisionLog
from meshserve.router.core.demand import DemandTracker
from meshserve.router.core.ensure import ColdStarts, Ensured
from meshserve.router.core.prefixes import NOT_HASHED, Pending, Prefixes, Prompt
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.wakes import Wakes
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.endpoints import Endpoint, Route, RouteTable
from meshserve.router.routing.exclusions import Identity
from meshserve.router.routing.pipeline import (
    DEFAULT_WEIGHTS,
    Ask,
    Decision,
    View,
    pick,
    weights_for,
)
from meshserve.router.tenancy.fairqueue import FairQueue
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.v1 import common_pb2

log = logging.getLogger(__name__)
DEADLINE_MARGIN_S = 0.1  # answer a little before the caller's deadline so it gets our message
RECHECK_S = 0.5  # a waiter looks again this often (breaker cool-downs end without an event)


@dataclass(frozen=True)
class Who:
    """Whose request it is, for queue order (fairqueue.py)."""

    tenant: str = ""
    priority: int = common_pb2.PRIORITY_NORMAL
    weight: float = 1.0


ANYONE = Who()


@dataclass(frozen=True)
class Slot:
    route: Route  # what serves the request: the model's route, or a READY fallback's
    endpoint: Endpoint
    waited_s: float = 0.0  # time spent queued
    decision: Decision | None = None  # how routing chose it (routing/pipeline.py)
    probe: bool = False  # it is its replica's half-open breaker probe
    forecast: Pending | None = None  # its predicted TTFT, until the first token (prefixes.py)

    @property
    def model(self) -> str:
        return self.route.spec.name


@dataclass(eq=False)
class _Waiter:
    route: Route
    ask: Ask
    future: asyncio.Future[Slot] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    since: float = field(default_factory=time.monotonic)
    deadline_end: float | None = None  # when the caller's deadline ends (monotonic, margin off)


class Admission:
    def __init__(
        self,
        table: EndpointTable,
        ensure: Callable[[str, bool], Coroutine[Any, Any, Ensured]],
        breakers: Breakers,
        demand: DemandTracker,
        per_model: int,
        timeout_s: float,
        ensure_interval_s: float,
        fair: bool = True,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        prefixes: Prefixes | None = None,
    ) -> None:
        self.fair = fair  # False: FIFO, every request equal (priority and tenant ignored)
        self.table = table
        self.breakers = breakers
        self.demand = demand
        self.per_model = per_model
        self.timeout_s = timeout_s
        self.outstanding: dict[str, int] = {}  # address → this router's streams (ranking)
        self.streams: dict[tuple[str, str], int] = {}  # (address, model) → streams (capacity)
        self.queues: dict[str, FairQueue[_Waiter]] = {}
        self.cold = ColdStarts(
            table, ensure, ensure_interval_s, lambda m: bool(self.queues.get(m)), self._too_slow_all
        )
        self._tiebreak = itertools.count()
        self.weights = weights  # the router profile's scorer weights (a model's own win)
        self.decisions = DecisionLog()
        self.prefixes = prefixes or Prefixes()
        self._view = View(
            self.outstanding,
            self.streams,
            lambda key: breakers.allows(key, time.monotonic()),
            self.prefixes.matches,
            self.prefixes.predict,
            breakers.all_closed,
        )
        self.wakes = Wakes(ensure, self.prefixes.predict, self.prefixes.matches, self._dispatch_all)
        table.subscribe(self._on_table)

    # --- taking and giving back slots --------------------------------------------------------

    async def acquire(
        self,
        route: Route,
        session_key: str = "",
        deadline_s: float | None = None,
        exclude: Container[Identity] = frozenset(),
        who: Who = ANYONE,
        request_id: str = "",
        prompt: Prompt = NOT_HASHED,
        wait_s: float | None = None,
    ) -> Slot:
        """A slot on a replica of ``route``'s model (or a READY fallback); waits in the model's
        queue while none is free. ``deadline_s``: the caller's remaining time (None: none);
        ``wait_s``: a route hop's bound on the wait (then UNAVAILABLE: the next hop's turn).
        Raises ServiceError: RESOURCE_EXHAUSTED (queue full, or shed for a higher priority),
        DEADLINE_EXCEEDED, UNAVAILABLE."""
        model = route.spec.name
        if not self.fair:
            who = ANYONE
        queue = self.queues.setdefault(model, FairQueue())
        ask = Ask(session_key, who.priority, exclude, request_id, *prompt)
        if not queue:  # nobody ahead: no queueing cost on the hot path
            slot, refused = self._choose(self._current(route), ask, model)
            if slot is not None:
                return self._take(slot)
            if refused is not None and refused.candidates:  # why it waits, for explain-route
                note = refused.note or "none free: queued"
                self.decisions.record(model, replace(refused, note=note))
        if len(queue) >= self.per_model:
            self._shed_for(model, queue, who.priority)
        waiter = _Waiter(route, ask)
        queue.push(waiter, who.priority, who.tenant, who.weight)
        self.demand.queued(model, +1)
        metrics.QUEUED.labels(model).inc()
        end = waiter.since + min(self.timeout_s, self.timeout_s if wait_s is None else wait_s)
        if deadline_s is not None:
            waiter.deadline_end = waiter.since + deadline_s - DEADLINE_MARGIN_S
            end = min(end, waiter.deadline_end)
        try:
            while True:
                self._dispatch(model)
                if waiter.future.done():
                    return waiter.future.result()
                if not self._current(route).ready:
                    self.cold.start(model)
                left = end - time.monotonic()
                if left <= 0:
                    raise self._gave_up(waiter, deadline_s)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(
                        asyncio.shield(waiter.future), min(left, RECHECK_S)
                    )
        except BaseException:
            f = waiter.future
            if f.done() and not f.cancelled() and f.exception() is None:
                self.release(f.result())  # handed a slot as we gave up
            waiter.future.cancel()
            raise
        finally:
            queue.remove(waiter)
            queue.reset_if_idle()
            self.demand.queued(model, -1)
            metrics.QUEUED.labels(model).dec()

    def _shed_for(self, model: str, queue: FairQueue[_Waiter], priority: int) -> None:
        """The queue is full: its lowest-priority waiter makes room for a higher-priority
        arrival, or the arrival is refused."""
        lowest = queue.lowest()
        if lowest is None or lowest[1] >= priority:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(queue)} requests of this priority or higher already wait for model "
                f"{model!r}; retry later",
                "QUEUE_FULL",
                retry_after_s=1.0,
            )
        victim, victim_priority = lowest
        queue.remove(victim)
        metrics.SHED.labels(model, common_pb2.Priority.Name(victim_priority)).inc()  # type: ignore[arg-type]
        if not victim.future.done():
            victim.future.set_exception(
                ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"shed: model {model!r} is saturated and higher-priority requests filled its "
                    "queue; retry later",
                    "SHED_FOR_PRIORITY",
                    retry_after_s=2.0,
                )
            )

    def release(self, slot: Slot) -> None:
        """The stream on ``slot`` ended: its place goes to the first waiter that can use it."""
        address = slot.endpoint.address
        self.outstanding[address] = self.outstanding.get(address, 1) - 1
        key = (address, slot.model)
        self.streams[key] = self.streams.get(key, 1) - 1
        if slot.probe:
            self.breakers.released(key)
        if slot.forecast is not None and not slot.forecast.done:
            self.prefixes.abandoned(slot.forecast)
        self._dispatch_all()

    def first_token(self, slot: Slot) -> None:
        """The stream on ``slot`` got its first token: the forecast is scored and learnt."""
        if slot.forecast is not None and not slot.forecast.done:
            self.prefixes.first_token(slot.forecast)

    # --- choosing ----------------------------------------------------------------------------

    def _current(self, route: Route) -> Route:
        return self.table.current.resolve(route.spec.name) or route

    def _choose(self, route: Route, ask: Ask, asked: str) -> tuple[Slot | None, Decision | None]:
        """A replica for ``ask`` by the routing pipeline, on ``route`` or (cold) a READY
        fallback, each choice kept (explain-route); else how ``route``'s replicas were refused."""
        routes = [route]
        refused: Decision | None = None
        if not route.ready:  # cold: a READY fallback serves meanwhile
            for name in route.spec.fallbacks:
                fallback = self.table.current.resolve(name)
                if fallback is not None and fallback.ready:
                    routes.append(fallback)
        for r in routes:
            d = pick(
                r.spec.name,
                r.ready,
                replace(ask, adapter=r.spec.name) if r.spec.base else ask,
                self._view,
                weights_for(r.spec.routing_weights or self.weights, bool(r.spec.base)),
                next(self._tiebreak),
            )
            if r is route and (route.asleep or r.spec.name in self.wakes.pending):
                note = self.wakes.consider(route, ask, d, time.monotonic())
                if note:  # it waits for an asleep replica being woken
                    return None, replace(d, chosen=None, note=note)
            if d.chosen is not None:
                self.decisions.record(asked, d)
                return Slot(r, d.chosen, decision=d), d
            refused = refused or d
        return None, refused

    def _take(self, slot: Slot) -> Slot:
        metrics.QUEUE_WAIT.labels(slot.model).observe(slot.waited_s)
        address = slot.endpoint.address
        self.outstanding[address] = self.outstanding.get(address, 0) + 1
        key = (address, slot.model)
        self.streams[key] = self.streams.get(key, 0) + 1
        d = slot.decision
        forecast = None
        try:
            forecast = self.prefixes.sent(slot.model, slot.endpoint, d.ask) if d else None
        except Exception:  # never lose a slot over routing's bookkeeping
            log.exception("prefix bookkeeping failed for %s", slot.model)
        probe = self.breakers.sent(key, time.monotonic())
        return replace(slot, probe=probe, forecast=forecast) if probe or forecast else slot

    def _dispatch(self, model: str) -> None:
        """Hands free slots to waiters of ``model`` in queue order (one that cannot use any free
        slot, for its exclusions or its priority's share, does not hold up those behind it)."""
        queue = self.queues.get(model)
        if not queue:
            return
        for waiter in queue:
            if waiter.future.done():
                continue
            slot, _refused = self._choose(self._current(waiter.route), waiter.ask, model)
            if slot is None:
                continue
            queue.served(waiter)
            waited = time.monotonic() - waiter.since
            waiter.future.set_result(
                self._take(Slot(slot.route, slot.endpoint, waited, slot.decision))
            )

    def _on_table(self, table: RouteTable, models: set[str]) -> None:
        """Routes of ``models`` changed: their breakers forget replicas that are gone, and
        queues dispatch (any queue: a changed model may be another's fallback)."""
        for model in models:
            route = table.routes.get(model)
            if route is not None:
                metrics.READY_REPLICAS.labels(model).set(len(route.ready))
                self.wakes.seen(route)
            else:
                self.decisions.drop(model)
                with contextlib.suppress(KeyError):
                    metrics.READY_REPLICAS.remove(model)
        alive = {
            (address, m)
            for m in models
            if (r := table.routes.get(m)) is not None
            for address, _inc, _gen in r.alive
        }
        self.breakers.prune(alive, time.monotonic(), models)
        self._dispatch_all()

    def _dispatch_all(self) -> None:
        for model, queue in self.queues.items():
            if queue:
                self._dispatch(model)

    # --- cold starts (ensure.py) --------------------------------------------------------------

    def _too_slow_all(self, model: str) -> None:
        """Waiters whose deadline ends before the scheduler expects the model: fail now, with
        what they would otherwise learn only at their deadline."""
        ready_at = self.cold.ready_at[model]
        for w in self.queues.get(model, ()):
            if w.deadline_end is not None and w.deadline_end < ready_at and not w.future.done():
                w.future.set_exception(self._too_slow(model, w.deadline_end))

    def _too_slow(self, model: str, end: float) -> ServiceError:
        now = time.monotonic()
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"model {model!r} is loading and needs about {self.cold.ready_at[model] - now:.1f} s "
            "more "
            f"(the scheduler's estimate); the request's deadline leaves {end - now:.1f} s: retry "
            "with a longer deadline, or once it is READY (the load goes on)",
            "LOAD_EXCEEDS_DEADLINE",
        )

    def _gave_up(self, waiter: _Waiter, deadline_s: float | None) -> ServiceError:
        route = self._current(waiter.route)
        model = route.spec.name
        waited = time.monotonic() - waiter.since
        excluded = [e for e in route.ready if e.identity in waiter.ask.exclude]
        if excluded:
            why = (
                f"{len(excluded)} of its {len(route.ready)} READY replicas failed this request "
                f"(unreachable or failing; retried as they come back)"
            )
        elif route.ready:
            busy = sum(self.streams.get((e.address, model), 0) for e in route.ready)
            why = (
                f"all {len(route.ready)} READY replicas are busy ({busy} streams from this router)"
            )
        elif route.loading:
            why = f"{route.loading} replica(s) still loading"
        elif self.cold.unplaceable.get(model):
            why = f"the scheduler cannot place it: {self.cold.unplaceable[model]}"
        else:
            why = "no replica is READY or loading"
        if deadline_s is not None and waited >= deadline_s - DEADLINE_MARGIN_S - 0.01:
            return ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"waited {waited:.1f} s for a replica of {model!r} within the request's deadline: "
                f"{why}",
                "QUEUE_DEADLINE",
            )
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"no replica of {model!r} took the request in {waited:.1f} s: {why}",
            "NO_READY_REPLICA",
            retry_after_s=2.0,
        )

    async def close(self) -> None:
        await self.cold.close()
        await self.wakes.close()
