"""Entry point of the router (``meshserve router``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl as py_ssl
from collections.abc import Mapping
from typing import Any

import grpc
from meshserve import tls
from meshserve.cluster.mirror import Mirror
from meshserve.lifecycle.service import Cluster, Component, serve
from meshserve.router.config import RouterConfig
from meshserve.router.core.accounting import Accountant, Tenancy
from meshserve.router.core.admission import Admission
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.demand import DemandTracker, publish_demand
from meshserve.router.core.ensure import Ensured
from meshserve.router.core.kvfeed import KvFeeds
from meshserve.router.core.prefixes import Prefixes
from meshserve.router.core.relay import Relay
from meshserve.router.core.routes import Routes
from meshserve.router.core.service import RouterInference
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.unary import Unary
from meshserve.router.core.upstreams import Upstreams, trace_metadata
from meshserve.router.fronts.kserve import KServe, kserve_handlers
from meshserve.router.fronts.native import NativeFront, admin_handlers_for, handlers_for
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.pipeline import DEFAULT_WEIGHTS
from meshserve.router.tenancy.gate import BookSource, TenantRates
from meshserve.router.tenancy.quota import Quotas
from meshserve.router.tenancy.usage import UsageLedger
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

    async def ensure(self, model: str, wake: bool = False) -> Ensured:
        """What the scheduler says of placing ``model``: why it cannot ("" when it is (being)
        placed), and its estimate of when a replica can serve; ``wake``: one more replica
        (an asleep one woken), and why not."""
        candidates = sorted(self.mirror.snapshot.values(), key=lambda c: c.address)
        for c in candidates:
            stub = scheduler_pb2_grpc.SchedulerStub(self.upstreams.channel(c.address))
            try:
                reply = await stub.EnsureModel(
                    scheduler_pb2.EnsureModelRequest(
                        model=model, requester=self.router_id, wake=wake
                    ),
                    timeout=3.0,
                    metadata=trace_metadata(trace.get_current_span(), ""),
                )
            except grpc.aio.AioRpcError as e:
                log.info("EnsureModel(%s) at %s failed: %s", model, c.address, e.code().name)
                continue
            if reply.outcome == scheduler_pb2.ENSURE_OUTCOME_UNSCHEDULABLE:
                return Ensured(str(reply.message))
            return Ensured("", float(reply.ready_in_s), str(reply.wake_refused))
        return Ensured("no scheduler reachable" if not candidates else "every scheduler failed")


class Router(Component):
    services = ("meshserve.v1.Inference", "meshserve.v1.Router", "inference.GRPCInferenceService")

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
        prefixes = Prefixes()
        self.admission = Admission(
            self.table,
            ensure,
            self.breakers,
            self.demand,
            config.queue_per_model,
            config.queue_timeout_s,
            config.ensure_interval_s,
            config.fair_queueing,
            config.routing_weights or DEFAULT_WEIGHTS,
            prefixes,
        )
        self.kv_feeds = KvFeeds(self.table, upstreams, prefixes)
        relay = Relay(
            config, self.table, self.admission, upstreams, self.breakers, budget, self.demand
        )
        unary = Unary(config, self.table, self.admission, upstreams, self.breakers, budget)
        accountant = Accountant(self.tenancy, self.demand)
        self.routes = Routes(cluster.client, cluster.keys)
        self.servicer = RouterInference(
            config, self.table, self.admission, relay, unary, accountant, self.routes
        )
        self.native = NativeFront(self.servicer)
        self.kserve = KServe(self.servicer, cluster.store)
        self._publisher: asyncio.Task[None] | None = None
        self._http: Any = None  # uvicorn.Server of the OpenAI front, when configured
        self._http_task: asyncio.Task[None] | None = None
        self._stopping = False  # shutdown began: the HTTP front's /health answers 503

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                handlers_for(self.native),
                admin_handlers_for(self.native),
                kserve_handlers(self.kserve),
            )
        )

    async def start(self, address: str) -> Mapping[str, str]:
        self.demand.address = address
        await self.tenancy.source.start()
        if self.tenancy.source.auth:
            self.demands.start()
        self.table.start()
        self.routes.start()
        self.schedulers.start()
        await asyncio.wait_for(self.table.synced(), 30)
        await asyncio.wait_for(self.routes.synced(), 30)  # route names known from the start
        self._publisher = asyncio.create_task(
            publish_demand(
                self.demand, self.cluster.store, self.cluster.session, self.config.demand_interval_s
            )
        )
        info = {"router_id": self.config.router_id}
        if self.config.http_listen:
            info["http"] = await self._start_http()
        return info

    async def _start_http(self) -> str:
        """The OpenAI-compatible front on ``http_listen``, on this event loop. uvicorn's
        ``_serve`` is its ``serve`` without taking over SIGINT/SIGTERM (the process's own
        handlers drain both fronts in order); pinned uvicorn version (pyproject)."""
        try:
            import uvicorn
            from meshserve.router.fronts.kserve_rest import add_kserve_rest
            from meshserve.router.fronts.openai_http import openai_app
        except ImportError as e:
            raise RuntimeError(
                f"--http-listen needs the HTTP front's packages ({e.name}): "
                "pip install 'meshserve[http]'"
            ) from None

        host, _, port = self.config.http_listen.rpartition(":")
        # Bound here, not by uvicorn: a taken port is an OSError naming it (uvicorn would log and
        # sys.exit inside the router).
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.service.reuse_port:  # router workers share the HTTP port as the gRPC one
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as e:
            sock.close()
            where = self.config.http_listen
            raise OSError(f"the OpenAI HTTP front cannot listen on {where}: {e}") from None
        sock.listen(1024)
        files = tls.configured()
        ssl: dict[str, Any] = {}
        if files is not None:  # HTTPS with the process's certificate; client certs as on gRPC
            optional = os.environ.get(tls.ENV_CLIENT_AUTH, "require") == "optional"
            ssl = {
                "ssl_certfile": files.cert,
                "ssl_keyfile": files.key,
                "ssl_ca_certs": files.ca,
                "ssl_cert_reqs": py_ssl.CERT_OPTIONAL if optional else py_ssl.CERT_REQUIRED,
            }
        app = openai_app(self.servicer, lambda: self._stopping)
        add_kserve_rest(app, self.kserve)  # KServe v2 REST beside the OpenAI API
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
            **ssl,
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http._serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task  # raises what stopped it
                raise OSError(f"the HTTP front did not start on {self.config.http_listen}")
            await asyncio.sleep(0.02)
        bound = sock.getsockname()
        return f"{host}:{bound[1]}"

    async def drain(self) -> None:
        """Shutdown begins: load balancers polling /health stop sending (gRPC health goes
        NOT_SERVING next, in process.py); calls in flight go on."""
        self._stopping = True

    async def stop(self) -> None:
        if self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 10)
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        await self.admission.close()
        await self.kv_feeds.stop()
        await self.tenancy.source.stop()
        await self.demands.stop()
        await self.table.stop()
        self.servicer.routed.close()
        await self.routes.stop()
        await self.schedulers.stop()
        await self.channels.close()


async def run(config: RouterConfig) -> None:
    async def make(cluster: Cluster) -> Component:
        return Router(config, cluster)

    await serve("router", config.service, make, grace_s=5.0)
