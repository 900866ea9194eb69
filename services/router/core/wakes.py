"""Waking an asleep replica when that starts a request sooner than queueing on the READY ones.

A model's replicas that the scheduler parked in CPU RAM or on disk (`Route.asleep`: spare
replicas it scaled down, or evicted while enough others served) come back in a restore, which
their agent estimates (``restore_seconds``). When a request finds the READY replicas saturated —
no free slot for it, or a predicted TTFT there more than WAKE_GAIN times the asleep one's
(restore + prefill of the whole prompt, routing.ttft) — the router asks the scheduler to wake one
(EnsureModel ``wake``: the scheduler stays the authority and places one more replica where it
decides; its ``locality`` scorer prefers where the model sleeps) and the request waits for it,
as it would for a free slot: the woken replica turns READY and the pipeline gives it the
request (nothing queues there yet). A wake holds at most restore x 2 + WAKE_GRACE_S; refused or
expired, requests go back to the READY replicas. One wake per model at a time (singleflight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshserve.router.core.ensure import Ensured
from meshserve.router.routing.endpoints import Endpoint, Route
from meshserve.router.routing.pipeline import Ask, Decision
from meshserve.router.routing.prefix import Match
from meshserve.telemetry import metrics

log = logging.getLogger(__name__)
WAKE_GAIN = 2.0  # waking takes a device's memory: it must at least halve the predicted wait
WAKE_GRACE_S = 3.0  # on top of twice the estimate: placement, the agent's warm-up, the table
REFUSED_HOLD_S = 5.0  # after a refusal, no new wake of the model for this long

Predict = Callable[[str, Sequence[Endpoint], Ask, Mapping[str, Match]], list[float]]
Matches = Callable[[str, Sequence[Endpoint], Ask], Mapping[str, Match]]


@dataclass
class Wake:
    endpoint: Endpoint  # the asleep replica it was judged by (the scheduler picks the node)
    asked_at: float  # monotonic
    ready: int  # the model's READY replicas when asked: one more means it is done
    until: float  # the wait ends here whatever became of it
    refused: str = ""  # the scheduler's reason, once it said no


class Wakes:
    def __init__(
        self,
        ensure: Callable[[str, bool], Coroutine[Any, Any, Ensured]],
        predict: Predict,
        matches: Matches,
        on_settled: Callable[[], None],
    ) -> None:
        self.ensure = ensure  # EnsureModel (wake: True)
        self.predict = predict
        self.matches = matches  # the prompt's cached prefix on each candidate (prefix index)
        self.on_settled = on_settled  # a wake was refused or expired: waiters look again
        self.pending: dict[str, Wake] = {}  # model → the wake under way
        self._tasks: set[asyncio.Task[None]] = set()

    def consider(self, route: Route, ask: Ask, d: Decision, now: float) -> str:
        """Whether this request should wait for a wake of ``route``'s model rather than take
        ``d.chosen`` (None: no READY replica has a slot for it): the note for its decision,
        or "" (take what the pipeline chose)."""
        model = route.spec.name
        wake = self._current(model, now)
        if wake is not None:
            if wake.refused:
                return ""
            left = max(0.0, wake.asked_at + wake.endpoint.restore_s - now)
            target = replace(wake.endpoint, restore_s=left)
            if self._pays(model, target, ask, d):
                return f"waits for the replica being woken ({left:.2f} s of restore left)"
            return ""
        if not route.asleep or not route.ready:  # none READY: a cold start (ensure.py)
            return ""
        sleeper = min(route.asleep, key=lambda e: e.restore_s)
        if not self._pays(model, sleeper, ask, d):
            return ""
        self._start(model, sleeper, len(route.ready), now)
        why = "no READY replica has a slot" if d.chosen is None else "faster than queueing"
        restore = f"restore ≈ {sleeper.restore_s:.2f} s on {sleeper.node_id}"
        return f"woke an asleep replica ({why}; {restore})"

    def _pays(self, model: str, sleeper: Endpoint, ask: Ask, d: Decision) -> bool:
        if d.chosen is None:
            return True
        if not ask.tokens:
            return False  # nothing to predict with: the READY replica has a slot, take it
        cands = [d.chosen, sleeper]
        matches = self.matches(model, cands, ask) if ask.blocks else {}
        warm, asleep = self.predict(model, cands, ask, matches)
        return asleep * WAKE_GAIN < warm

    def _current(self, model: str, now: float) -> Wake | None:
        wake = self.pending.get(model)
        if wake is None:
            return None
        hold = wake.asked_at + REFUSED_HOLD_S if wake.refused else wake.until
        if now < hold:
            return wake
        del self.pending[model]
        if not wake.refused:
            metrics.WAKES.labels(model, "expired").inc()
        return None

    def _start(self, model: str, sleeper: Endpoint, ready: int, now: float) -> None:
        until = now + 2 * sleeper.restore_s + WAKE_GRACE_S
        wake = self.pending[model] = Wake(sleeper, now, ready, until)
        metrics.WAKES.labels(model, "asked").inc()
        task = asyncio.create_task(self._ask(model, wake), name=f"wake {model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, model: str, wake: Wake) -> None:
        try:
            answer = await self.ensure(model, True)
            refused = answer.unplaceable or answer.wake_refused
        except Exception as e:  # the scheduler unreachable: requests go back to READY ones
            refused = f"scheduler unreachable ({type(e).__name__})"
        if refused:
            log.info("wake of %s refused: %s", model, refused)
            wake.refused = refused
            metrics.WAKES.labels(model, "refused").inc()
            self.on_settled()

    def seen(self, route: Route) -> None:
        """The model's route changed: a wake under way is done once it has one more READY
        replica than when asked."""
        wake = self.pending.get(route.spec.name)
        if wake is not None and not wake.refused and len(route.ready) > wake.ready:
            del self.pending[route.spec.name]
            metrics.WAKES.labels(route.spec.name, "woken").inc()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
