"""One lifecycle for the three services (STYLE: every server started and stopped one way).

`serve` owns what the router, scheduler and node agent share: signals from the first instant,
tracing, metrics, the etcd client and its `Session`, the gRPC server (health, reflection,
interceptors), the ready file launchers wait for, and the stop order — the component drains
(peers stop sending it work) → health NOT_SERVING → ``server.stop(grace)`` (in-flight calls
finish within the grace period, then are cancelled) → the component's own stop → the lease is
revoked (its keys vanish at once, not at TTL) → etcd and tracing closed.

A service is a `Component`: the gRPC services it registers, then ``start(address)`` once the
server is bound, and ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.session import Session
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.config import ServiceConfig
from meshserve.lifecycle.runtime import write_ready_file
from meshserve.lifecycle.watchdog import StallWatch
from meshserve.rpc.server import start_server
from meshserve.telemetry.metrics import serve_metrics
from meshserve.telemetry.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)
STOP_BUDGET_S = 5.0  # what shutdown may take beyond the server's grace period
ORPHAN_GRACE_S = 1.0  # grace when our launcher died (meshserve.lifeline's SIGTERM): be quick


@dataclass(frozen=True)
class Cluster:
    """This process's view of etcd: the client, typed store, keyspace and lease."""

    client: aetcd.Client
    store: Store
    keys: Keyspace
    session: Session


class Component:
    """What a service plugs into `serve`. Subclasses set ``services`` (full gRPC names) and
    implement the three methods."""

    services: Sequence[str] = ()

    def register(self, server: grpc.aio.Server) -> None:
        """Adds servicers or generic handlers to ``server`` (before it starts)."""
        raise NotImplementedError

    async def start(self, address: str) -> Mapping[str, str]:
        """The server is bound at ``address``; start work. Returns extra ready-file fields."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Shutdown begins: tell peers to send nothing new (calls in flight go on)."""

    async def stop(self) -> None:
        """Stop work (the server no longer takes calls; the lease is still held)."""
        raise NotImplementedError


async def serve(
    name: str,
    config: ServiceConfig,
    make: Callable[[Cluster], Awaitable[Component]],
    grace_s: float = 5.0,
) -> None:
    """Runs one service until SIGTERM or SIGINT (see the module docstring for the order)."""
    stop = asyncio.Event()
    parent = os.getppid()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # a signal during start-up stops right after it
    setup_tracing(name)
    serve_metrics(config.metrics_port)
    watch = StallWatch()
    watch.start()
    client = connect(EtcdConfig(config.etcd))
    keys = Keyspace(config.prefix)
    session = Session(client, config.lease_ttl_s)
    component: Component | None = None
    server = None
    try:
        await session.start()
        component = await make(Cluster(client, Store(client, keys), keys, session))
        server = await start_server(
            config.listen, [component.register], component.services, config.reuse_port
        )
        address = config.advertise(server.port)
        info = await component.start(address)
        log.info("%s serving on %s", name, address)
        write_ready_file(config.ready_file, address=address, **info)
        await stop.wait()
    finally:
        if os.getppid() != parent:  # the launcher is gone: it will not wait for us, nor etcd
            grace_s = min(grace_s, ORPHAN_GRACE_S)
        log.info("%s shutting down (grace %.0f s)", name, grace_s)
        steps = _Shutdown(name)
        try:
            await asyncio.wait_for(
                steps.run(component, server, session, client, grace_s), grace_s + STOP_BUDGET_S
            )
        except TimeoutError:
            # Whatever hangs must not keep the process (and its port) alive: our keys go with
            # the lease's TTL instead of at once.
            log.error("%s: shutdown stuck in %s; exiting now", name, steps.step)
            shutdown_tracing()
            os._exit(1)
        await watch.stop()
        shutdown_tracing()


class _Shutdown:
    """The stop order, step by step, so a step that hangs can be named."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.step = ""
        self.began = time.monotonic()
        self.took: list[str] = []  # "step 1.23 s", for the log line at the end

    def enter(self, step: str) -> None:
        now = time.monotonic()
        if self.step:
            self.took.append(f"{self.step} {now - self.began:.2f} s")
        self.step, self.began = step, now

    async def run(
        self,
        component: Component | None,
        server: Any,
        session: Session,
        client: aetcd.Client,
        grace_s: float,
    ) -> None:
        if component is not None and server is not None:
            self.enter("drain")
            with contextlib.suppress(Exception):
                await component.drain()
        if server is not None:
            self.enter("server.stop")
            await server.stop(grace_s=grace_s)
        if component is not None:
            self.enter("component.stop")
            await component.stop()
        self.enter("session.close")
        await session.close()
        self.enter("client.close")
        with contextlib.suppress(Exception):
            await client.close()
        self.enter("")
        log.info("%s stopped: %s", self.name, ", ".join(self.took))
