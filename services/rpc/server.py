"""Starts and stops every meshserve gRPC server the same way (STYLE: one helper).

Each server gets: OpenTelemetry's aio interceptor, ``grpc.health.v1`` with a status per service,
server reflection, message-size limits and keepalive policy. Shutdown order follows gRPC's
examples: health NOT_SERVING → ``server.stop(grace)`` (no new calls; in-flight ones finish within
the grace period) → the caller closes its etcd session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from meshserve import tls
from meshserve.rpc.decode import DecodeGuard
from meshserve.telemetry.server_interceptor import server_interceptors

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Let clients ping every 10 s without calls in flight (router → agent keepalive).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_server(
    listen: str,
    register: Sequence[Callable[[grpc.aio.Server], None]],
    services: Sequence[str],
    reuse_port: bool = False,
) -> RunningServer:
    """Binds ``listen`` (``host:port``; port 0 picks one), registers the services and starts.

    ``register`` adds servicers or generic handlers; ``services`` are their full names, used for
    health and reflection.
    """
    # The decode guard is innermost: the tracing interceptor records what it answers.
    interceptors = [*server_interceptors(), DecodeGuard()]
    options = (*SERVER_OPTIONS, ("grpc.so_reuseport", int(reuse_port)))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    for add in register:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    files = tls.configured()
    if files is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, tls.server_credentials(files))
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    running = RunningServer(server, port, health_servicer, tuple(services))
    await running.set_serving(True)
    return running


CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Catches a frozen peer process; a stuck generation loop needs the inter-token timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),  # retries are the router's, and only before the first token
)
