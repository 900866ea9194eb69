"""Both shapes of a server-streaming handler pass the server's interceptors (tracing, decode
guard) the same way: an async generator (as gRPC's own stubs write them) is run in writer form
(`as_writer`), so its responses arrive in order, and undecodable bytes get INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from meshserve.rpc import handlers
from meshserve.rpc.server import start_server
from meshserve.v1 import inference_pb2

METHOD = "/meshserve.v1.Inference/Generate"


async def as_generator(request: inference_pb2.GenerateRequest, context: Any) -> AsyncIterator[Any]:
    for i in range(3):
        yield inference_pb2.GenerateResponse(text=f"{request.prompt}{i}")


@handlers.stream
async def as_writer(request: inference_pb2.GenerateRequest, context: Any) -> AsyncIterator[Any]:
    async for response in as_generator(request, context):
        yield response


@pytest.mark.parametrize("behavior", [as_generator, as_writer], ids=["generator", "writer"])
async def test_streaming_handlers_of_either_shape_stream_and_refuse_garbage(behavior: Any) -> None:
    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(
            behavior,
            request_deserializer=inference_pb2.GenerateRequest.FromString,
            response_serializer=inference_pb2.GenerateResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("meshserve.v1.Inference", {"Generate": handler}),)
        )

    running = await start_server("127.0.0.1:0", [register], ["meshserve.v1.Inference"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            call = ch.unary_stream(
                METHOD,
                request_serializer=inference_pb2.GenerateRequest.SerializeToString,
                response_deserializer=inference_pb2.GenerateResponse.FromString,
            )
            texts = [r.text async for r in call(inference_pb2.GenerateRequest(prompt="p"))]
            assert texts == ["p0", "p1", "p2"]
            raw = ch.unary_stream(METHOD)  # bytes as they are
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in raw(b"\xff\xff\xff\xff"):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await running.stop(0)
