"""Entry point of the router (``meshserve router``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import grpc
from meshserve.cluster.mirror import Mirror
from meshserve.process import Cluster, Component, serve
from meshserve.router.admission import Admission, Ensured
from meshserve.router.breakers import Breakers
from meshserve.router.budget import RetryBudget
from meshserve.router.config import RouterConfig
from meshserve.router.demand import DemandTracker, publish_demand
from meshserve.router.gate import BookSource, TenantRates
from meshserve.router.quota import Quotas
from meshserve.router.relay import Relay
from meshserve.router.server import RouterInference, Tenancy, admin_handlers_for, handlers_for
from meshserve.router.table import EndpointTable
from meshserve.router.upstreams import Upstreams, trace_metadata
from meshserve.router.usage import UsageLedger
from meshserve.rpc.channels import ChannelPool
from meshserve.v1 import cluster_pb2, scheduler_pb2, scheduler_pb2_grpc
from opentelemetry import trace

log = logging.getLogger("meshserve.router")


class SchedulerClient:
    """Finds the schedulers through their election keys (no address to configure) and asks any of
    them; standbys forward to the leader."""

    def __init__(
        self, mirror: Mirror[cluster_pb2.SchedulerCandidate], router_id: str, upstreams: Upstreams
    ) -> None:
        self.mirror = mirror
        self.router_id = router_id
        self.upstreams = upstreams

    async def ensure(self, model: str) -> Ensured:
        """What the scheduler says of placing ``model``: why it cannot ("" when it is (being)
        placed), and its estimate of when a replica can serve."""
        candidates = sorted(self.mirror.snapshot.values(), key=lambda c: c.address)
        for c in candidates:
            stub = scheduler_pb2_grpc.SchedulerStub(self.upstreams.channel(c.address))
            try:
                reply = await stub.EnsureModel(
                    scheduler_pb2.EnsureModelRequest(model=model, requester=self.router_id),
                    timeout=3.0,
                    metadata=trace_metadata(trace.get_current_span(), ""),
                )
            except grpc.aio.AioRpcError as e:
                log.info("EnsureModel(%s) at %s failed: %s", model, c.address, e.code().name)
                continue
            if reply.outcome == scheduler_pb2.ENSURE_OUTCOME_UNSCHEDULABLE:
                return Ensured(str(reply.message))
            return Ensured("", float(reply.ready_in_s))
        return Ensured("no scheduler reachable" if not candidates else "every scheduler failed")


class Router(Component):
    services = ("meshserve.v1.Inference", "meshserve.v1.Router")

    def __init__(self, config: RouterConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster
        self.table = EndpointTable(cluster.client, cluster.keys)
        self.schedulers = Mirror(
            cluster.client, cluster.keys.election(), cluster_pb2.SchedulerCandidate
        )
        self.channels = ChannelPool()  # agents and schedulers: one channel per address
        upstreams = Upstreams(self.channels)
        self.table.subscribe(upstreams.follow)
        ensure = SchedulerClient(self.schedulers, config.router_id, upstreams).ensure
        self.breakers = Breakers(
            consecutive=config.breaker_failures,
            failure_rate=config.breaker_failure_rate,
            cooldown_s=config.breaker_cooldown_s,
        )
        rates = TenantRates(config.router_id)
        source = BookSource(
            config.tenants_file, cluster.client, cluster.keys, config.tenants_from_etcd
        )
        self.tenancy = Tenancy(source, rates, Quotas(rates.share), UsageLedger())
        # Other routers' per-tenant rates: this router's share of cluster-wide limits.
        self.demands = Mirror(cluster.client, cluster.keys.demands(), cluster_pb2.RouterDemand)
        self.demands.subscribe(lambda snap: setattr(rates, "others", snap))
        self.demand = DemandTracker(config.router_id, self.breakers, rates.rates)
        budget = RetryBudget(config.retry_budget_ratio)
        self.admission = Admission(
            self.table,
            ensure,
            self.breakers,
            self.demand,
            config.queue_per_model,
            config.queue_timeout_s,
            config.ensure_interval_s,
            config.fair_queueing,
        )
        relay = Relay(
            config, self.table, self.admission, upstreams, self.breakers, budget, self.demand
        )
        self.servicer = RouterInference(
            config, self.table, self.admission, relay, upstreams, budget, self.demand, self.tenancy
        )
        self._publisher: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (handlers_for(self.servicer), admin_handlers_for(self.servicer))
        )

    async def start(self, address: str) -> Mapping[str, str]:
        self.demand.address = address
        await self.tenancy.source.start()
        if self.tenancy.source.auth:
            self.demands.start()
        self.table.start()
        self.schedulers.start()
        await asyncio.wait_for(self.table.synced(), 30)
        self._publisher = asyncio.create_task(
            publish_demand(
                self.demand, self.cluster.store, self.cluster.session, self.config.demand_interval_s
            )
        )
        return {"router_id": self.config.router_id}

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        await self.admission.close()
        await self.tenancy.source.stop()
        await self.demands.stop()
        await self.table.stop()
        await self.schedulers.stop()
        await self.channels.close()


async def run(config: RouterConfig) -> None:
    async def make(cluster: Cluster) -> Component:
        return Router(config, cluster)

    await serve("router", config.service, make, grace_s=5.0)
