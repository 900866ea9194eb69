"""The native gRPC front (meshserve.v1.Inference and meshserve.v1.Router): the servicer context
becomes a `Call` (who calls, the deadline), the core's headers go out before its first message
and its trailers when the call ends. Generate's responses go out as the raw bytes the agent
sent (response_serializer=None): the router never re-encodes a token."""

from __future__ import annotations

import time

import grpc
from meshserve.router.core.call import Call
from meshserve.router.core.service import RouterInference
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError
from meshserve.rpc.handlers import Ctx
from meshserve.v1 import inference_pb2, router_pb2


def call_of(context: Ctx) -> Call:
    """The core's view of a gRPC call: its authorization metadata, its client certificate's
    subject and ``CN=<common name>`` (mTLS), its deadline."""
    authorization = ""
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # -bin metadata is bytes: nothing a route rule matches
            metadata[key] = value
            if key == "authorization":
                authorization = value
    auth = context.auth_context() or {}
    subjects = [v.decode(errors="replace") for v in auth.get("x509_subject", [])]
    subjects += [f"CN={v.decode(errors='replace')}" for v in auth.get("x509_common_name", [])]
    left = handlers.remaining_s(context)
    deadline = None if left is None else time.monotonic() + left
    return Call(authorization, subjects, deadline, metadata=metadata)


async def send_headers(context: Ctx, call: Call) -> None:
    if call.headers:
        await context.send_initial_metadata(tuple(call.headers))


class NativeFront:
    """meshserve.v1.Inference and .Router over the core; registered by `handlers_for`."""

    def __init__(self, core: RouterInference) -> None:
        self.core = core

    async def generate(self, request: inference_pb2.GenerateRequest, context: Ctx) -> None:
        """Written with ``context.write`` (as `handlers.stream` does: no generator hop per
        message); the core's headers go with its first message, its trailers before the
        status (an error's included)."""
        call = call_of(context)
        items = self.core.generate(request, call)
        write = context.write
        first = True
        try:
            try:
                async for message in items:
                    if first:
                        await send_headers(context, call)
                        first = False
                    await write(message)
                if first:
                    await send_headers(context, call)
            finally:
                await items.aclose()  # in this task (see `handlers.stream`)
                if call.trailers:
                    context.set_trailing_metadata(tuple(call.trailers))
        except ServiceError as e:
            await e.abort(context)
        except grpc.aio.AioRpcError as e:
            await handlers.abort_like(context, e)

    async def embed(
        self, request: inference_pb2.EmbedRequest, context: Ctx
    ) -> inference_pb2.EmbedResponse:
        call = call_of(context)
        reply = await self.core.embed(request, call)
        await send_headers(context, call)
        return reply

    async def infer(
        self, request: inference_pb2.InferRequest, context: Ctx
    ) -> inference_pb2.InferResponse:
        call = call_of(context)
        reply = await self.core.infer(request, call)
        await send_headers(context, call)
        return reply

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, context: Ctx
    ) -> inference_pb2.ListModelsResponse:
        return await self.core.list_models(request, call_of(context))

    async def usage(
        self, request: router_pb2.UsageRequest, context: Ctx
    ) -> router_pb2.UsageResponse:
        return await self.core.usage(request, call_of(context))

    async def explain_route(
        self, request: router_pb2.ExplainRouteRequest, context: Ctx
    ) -> router_pb2.ExplainRouteResponse:
        return await self.core.explain_route(request, call_of(context))

    async def route_status(
        self, request: router_pb2.RouteStatusRequest, context: Ctx
    ) -> router_pb2.RouteStatusResponse:
        return await self.core.route_status(request, call_of(context))


def handlers_for(front: NativeFront) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "meshserve.v1.Inference",
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                front.generate,
                request_deserializer=inference_pb2.GenerateRequest.FromString,
                response_serializer=None,
            ),
            "Embed": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.embed),
                request_deserializer=inference_pb2.EmbedRequest.FromString,
                response_serializer=inference_pb2.EmbedResponse.SerializeToString,
            ),
            "Infer": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.infer),
                request_deserializer=inference_pb2.InferRequest.FromString,
                response_serializer=inference_pb2.InferResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.list_models),
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        },
    )


def admin_handlers_for(front: NativeFront) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "meshserve.v1.Router",
        {
            "Usage": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.usage),
                request_deserializer=router_pb2.UsageRequest.FromString,
                response_serializer=router_pb2.UsageResponse.SerializeToString,
            ),
            "ExplainRoute": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.explain_route),
                request_deserializer=router_pb2.ExplainRouteRequest.FromString,
                response_serializer=router_pb2.ExplainRouteResponse.SerializeToString,
            ),
            "RouteStatus": grpc.unary_unary_rpc_method_handler(
                handlers.unary(front.route_status),
                request_deserializer=router_pb2.RouteStatusRequest.FromString,
                response_serializer=router_pb2.RouteStatusResponse.SerializeToString,
            ),
        },
    )
