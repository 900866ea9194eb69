"""`meshserve health`: a gRPC health check that speaks the process's TLS (Kubernetes' own gRPC
probe cannot present a client certificate: manifests with mutual TLS exec this instead)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from meshserve.cli.common import fail

app = typer.Typer()


@app.command()
def health(
    address: Annotated[str, typer.Argument(help="host:port of a meshserve server")],
    service: Annotated[str, typer.Option(help="a gRPC service name; '' = the server")] = "",
    timeout: Annotated[float, typer.Option(help="seconds")] = 3.0,
) -> None:
    """Exit 0 when ADDRESS reports SERVING (for SERVICE), 1 otherwise, saying why."""
    asyncio.run(_check(address, service, timeout))


async def _check(address: str, service: str, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from meshserve.tls import open_channel

    async with open_channel(address) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            raise fail(f"{address}: {e.code().name}: {e.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise fail(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
