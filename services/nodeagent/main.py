"""Entry point of the node agent (``meshserve agent``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshserve.cluster.keys import Keyspace
from meshserve.cluster.session import Session
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import open_probe
from meshserve.nodeagent.engines import preload_engines
from meshserve.nodeagent.reconcile import Reconciler
from meshserve.nodeagent.server import AgentControl, AgentInference
from meshserve.rpc.server import start_server
from meshserve.runtime import wait_for_signal, write_ready_file
from meshserve.telemetry.metrics import serve_metrics
from meshserve.telemetry.tracing import setup_tracing, shutdown_tracing
from meshserve.v1 import inference_pb2_grpc, nodeagent_pb2_grpc

log = logging.getLogger("meshserve.nodeagent")


async def serve(config: AgentConfig) -> None:
    setup_tracing("nodeagent")
    serve_metrics(config.metrics_port)
    engines = await asyncio.to_thread(preload_engines)
    log.info("engines available: %s", ", ".join(engines) or "none")
    client = connect(EtcdConfig(config.etcd))
    store = Store(client, Keyspace(config.prefix))
    session = Session(client, config.lease_ttl_s)
    await session.start()
    probe = open_probe(config.device)
    rec = Reconciler(config, store, session, probe)
    inference, control = AgentInference(rec), AgentControl(rec)
    server = await start_server(
        config.listen,
        [
            lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(inference, s),
            lambda s: nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(control, s),
        ],
        ["meshserve.v1.Inference", "meshserve.v1.NodeAgent"],
    )
    address = config.advertise(server.port)
    await rec.start(address)
    log.info("node agent %s serving on %s (%s)", config.node_id, address, probe.kind)
    write_ready_file(config.ready_file, address=address, node_id=config.node_id)
    try:
        await wait_for_signal()
    finally:
        log.info("shutting down")
        await server.stop(grace_s=5.0)
        await rec.stop()
        await session.close()
        with contextlib.suppress(Exception):
            await client.close()
        probe.close()
        shutdown_tracing()
