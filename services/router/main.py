"""Entry point of the router (``meshserve router``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.mirror import Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.router.config import RouterConfig
from meshserve.router.demand import DemandTracker, publish_demand
from meshserve.router.server import RouterInference, Upstreams, handlers_for, trace_metadata
from meshserve.router.table import EndpointTable
from meshserve.rpc.server import start_server
from meshserve.runtime import wait_for_signal, write_ready_file
from meshserve.telemetry.metrics import serve_metrics
from meshserve.telemetry.tracing import setup_tracing, shutdown_tracing
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

    async def ensure(self, model: str) -> str:
        """Returns "" when the model is (being) placed, else the scheduler's reason."""
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
                return str(reply.message)
            return ""
        return "no scheduler reachable" if not candidates else "every scheduler failed"


async def serve(config: RouterConfig) -> None:
    setup_tracing("router")
    serve_metrics(config.metrics_port)
    client = connect(EtcdConfig(config.etcd))
    keys = Keyspace(config.prefix)
    store = Store(client, keys)
    session = Session(client, config.lease_ttl_s)
    await session.start()
    table = EndpointTable(client, keys)
    table.start()
    schedulers = Mirror(client, keys.election(), cluster_pb2.SchedulerCandidate)
    schedulers.start()
    await asyncio.wait_for(table.synced(), 30)
    demand = DemandTracker(config.router_id)
    upstreams = Upstreams()
    ensure = SchedulerClient(schedulers, config.router_id, upstreams).ensure
    servicer = RouterInference(config, table, ensure, demand)
    server = await start_server(
        config.listen,
        [lambda s: s.add_generic_rpc_handlers((handlers_for(servicer),))],
        ["meshserve.v1.Inference"],
    )
    publisher = asyncio.create_task(
        publish_demand(demand, store, session, config.demand_interval_s)
    )
    address = f"{config.listen.rpartition(':')[0]}:{server.port}"
    log.info("router %s serving on %s", config.router_id, address)
    write_ready_file(config.ready_file, address=address, router_id=config.router_id)
    try:
        await wait_for_signal()
    finally:
        await server.stop(grace_s=5.0)
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await table.stop()
        await schedulers.stop()
        await servicer.upstreams.close()
        await upstreams.close()
        await session.close()
        with contextlib.suppress(Exception):
            await client.close()
        shutdown_tracing()
