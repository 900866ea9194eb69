"""Entry point of the scheduler (``meshserve scheduler``)."""

from __future__ import annotations

import contextlib
import logging

from meshserve.cluster.keys import Keyspace
from meshserve.cluster.session import Session
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.rpc.server import start_server
from meshserve.runtime import wait_for_signal, write_ready_file
from meshserve.scheduler.config import SchedulerConfig
from meshserve.scheduler.leader import SchedulerLoop
from meshserve.scheduler.server import SchedulerService
from meshserve.telemetry.metrics import serve_metrics
from meshserve.telemetry.tracing import setup_tracing, shutdown_tracing
from meshserve.v1 import scheduler_pb2_grpc

log = logging.getLogger("meshserve.scheduler")


async def serve(config: SchedulerConfig) -> None:
    setup_tracing("scheduler")
    serve_metrics(config.metrics_port)
    client = connect(EtcdConfig(config.etcd))
    store = Store(client, Keyspace(config.prefix))
    session = Session(client, config.lease_ttl_s)
    await session.start()
    loop = SchedulerLoop(config, store, session)
    service = SchedulerService(loop)
    server = await start_server(
        config.listen,
        [lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, s)],
        ["meshserve.v1.Scheduler"],
    )
    loop.address = config.advertise(server.port)
    loop.start()
    log.info("scheduler %s serving on %s", config.scheduler_id, loop.address)
    write_ready_file(config.ready_file, address=loop.address, scheduler_id=config.scheduler_id)
    try:
        await wait_for_signal()
    finally:
        await server.stop(grace_s=2.0)
        await loop.stop()
        await service.close()
        await session.close()
        with contextlib.suppress(Exception):
            await client.close()
        shutdown_tracing()
