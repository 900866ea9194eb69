"""The Scheduler service. Every scheduler serves it; a standby forwards to the leader."""

from __future__ import annotations

from dataclasses import replace

import grpc
from meshserve.rpc import handlers
from meshserve.rpc.channels import ChannelPool
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.scheduler.leader import SchedulerLoop
from meshserve.scheduler.views import ModelDecision
from meshserve.v1 import cluster_pb2, scheduler_pb2, scheduler_pb2_grpc


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: SchedulerLoop, channels: ChannelPool) -> None:
        self.loop = loop
        self.channels = channels  # to the leader, when this one stands by

    async def _leader_stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        leader = await self.loop.election.leader()
        if leader is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "no scheduler leads right now; an election is under way",
                "NO_LEADER",
                retry_after_s=1.0,
            )
        address = cluster_pb2.SchedulerCandidate.FromString(leader.value).address
        return scheduler_pb2_grpc.SchedulerStub(self.channels.get(address))

    def _spec(self, name: str) -> cluster_pb2.ModelSpec:
        spec = self.loop.spec(name)
        if spec is not None and spec.base:  # an adapter: served (and so ensured) by its base
            spec = self.loop.spec(spec.base)
        if spec is None:
            raise not_found_model(name, [s.name for s in self.loop.models.snapshot.values()])
        return spec

    @handlers.unary
    async def EnsureModel(
        self, request: scheduler_pb2.EnsureModelRequest, context: Ctx
    ) -> scheduler_pb2.EnsureModelResponse:
        spec = self._spec(request.model)
        if self.loop.leadership is None:
            stub = await self._leader_stub()
            return await stub.EnsureModel(request, timeout=handlers.remaining_s(context) or 5.0)  # type: ignore[no-any-return]
        await self.loop.ensure(spec.name, request.wake)
        plan = self.loop.last_plan
        decision = plan.decisions.get(spec.name) if plan else None
        if decision is not None and decision.unschedulable:
            return scheduler_pb2.EnsureModelResponse(
                outcome=scheduler_pb2.ENSURE_OUTCOME_UNSCHEDULABLE,
                nodes=decision.placed_on,
                message=decision.unschedulable,
                wake_refused=decision.unschedulable if request.wake else "",
            )
        return scheduler_pb2.EnsureModelResponse(
            outcome=scheduler_pb2.ENSURE_OUTCOME_PLACED,
            nodes=decision.placed_on if decision else (),
            message="placed" if decision and decision.placed_on else "placement pending",
            ready_in_s=self.loop.ready_in_s(spec),
            wake_refused=self._wake_refused(spec, decision) if request.wake else "",
        )

    def _wake_refused(self, spec: cluster_pb2.ModelSpec, decision: ModelDecision | None) -> str:
        """Why a router's wake placed no more replicas ("" when it did)."""
        asked = self.loop.wakes.get(spec.name, (0, 0.0))[0]
        placed = len(decision.placed_on) if decision is not None else 0
        if placed >= asked:
            return ""
        if spec.max_replicas and placed >= spec.max_replicas:
            return f"it has max_replicas {spec.max_replicas} placed"
        return f"{placed} of {asked} replicas placed: no node takes one more now"

    @handlers.unary
    async def Explain(
        self, request: scheduler_pb2.ExplainRequest, context: Ctx
    ) -> scheduler_pb2.ExplainResponse:
        spec = self._spec(request.model)
        if self.loop.leadership is None:
            stub = await self._leader_stub()
            return await stub.Explain(request, timeout=handlers.remaining_s(context) or 5.0)  # type: ignore[no-any-return]
        out = scheduler_pb2.ExplainResponse(model=spec.name, epoch=self.loop.leadership.token)
        explained = self.loop.explained.get(spec.name)
        if explained is None:
            out.summary = "no decision yet"
            return out
        decision, decided_at = explained
        out.decided_unix_ms = int(decided_at * 1000)
        plan = self.loop.last_plan
        latest = plan.decisions.get(spec.name) if plan is not None else None
        if latest is not None and not latest.unschedulable:
            # Where it is now; the verdicts are from the round that chose it.
            decision = replace(decision, placed_on=latest.placed_on, unschedulable="")
        out.placed_on.extend(decision.placed_on)
        for v in decision.verdicts:
            out.verdicts.add(
                node_id=v.node_id,
                feasible=v.feasible,
                reason=v.reason,
                score=v.score,
                free_bytes=v.free_bytes,
                evicts=v.evicts,
                filter=v.filter,
                scores=dict(v.scores),
                unresolvable=v.unresolvable,
            )
        out.unresolvable = decision.unresolvable
        state = self.loop.scale.get(decision.model)
        out.wanted_replicas = state.replicas if state is not None else 0
        if decision.unschedulable:
            kind = "unresolvable" if decision.unresolvable else "unschedulable"
            out.summary = f"{kind}: {decision.unschedulable}"
        elif decision.placed_on:
            out.summary = f"placed on {', '.join(decision.placed_on)}"
        else:
            out.summary = "not wanted now: min_replicas is 0 and no recent demand (scaled to zero)"
        return out

    @handlers.unary
    async def GetPlan(
        self, request: scheduler_pb2.GetPlanRequest, context: Ctx
    ) -> scheduler_pb2.GetPlanResponse:
        leader = await self.loop.election.leader()
        out = scheduler_pb2.GetPlanResponse(
            placements=sorted(
                self.loop.placements.snapshot.values(), key=lambda p: (p.node_id, p.model)
            ),
        )
        if leader is not None:
            out.epoch = leader.create_revision
            out.leader_id = cluster_pb2.SchedulerCandidate.FromString(leader.value).scheduler_id
        plan = self.loop.last_plan
        if plan is not None:
            out.unschedulable.extend(
                f"{d.model}: {d.unschedulable}" for d in plan.decisions.values() if d.unschedulable
            )
        return out
