"""KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`) on the router, for the
whole mesh, through the same router core as the native API (gate, tenancy, admission, relay).

Models as tensors:
- an LLM: input ``text_input`` (BYTES, one element), optional ``sampling_parameters`` (BYTES,
  a JSON object: max_tokens, temperature, top_p, seed, stop, ignore_eos) and request parameters
  of the same names; output ``text_output`` (BYTES). ModelStreamInfer is decoupled, as
  Triton's vLLM backend: one response per text delta, the last with ``triton_final_response``.
- an embedding model (``engine_args.task: embed``): ``text_input`` (BYTES, N elements) →
  ``embedding`` (FP32, [N, dim]).
- a tensor model (``engine_args.task: classify``): its own named, typed, shaped inputs and
  outputs (ModelMetadata and ModelConfig from the signature its replicas publish), through the
  native Infer RPC, batched dynamically by the agent.

RepositoryModelLoad asks the scheduler to place the model and returns once a replica serves (or
the deadline passes); RepositoryModelUnload scales it to zero (ModelSpec.unloaded_unix_ms: no
replica is wanted until a request arrives after it). ModelStatistics counts what this router
served through this API, per model.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from meshserve.cluster.store import Store
from meshserve.kserve import grpc_service_pb2 as K
from meshserve.router.core.accounting import ModelStats
from meshserve.router.core.call import Call
from meshserve.router.core.service import RouterInference
from meshserve.router.fronts.kserve_tensors import (
    config,
    generate_request,
    infer_response,
    input_strings,
    kind,
    metadata,
    tensors_in,
    text_response,
)
from meshserve.router.fronts.native import call_of, send_headers
from meshserve.router.routing.endpoints import Route
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError, invalid_argument, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry.server_interceptor import traceresponse
from meshserve.v1 import cluster_pb2, inference_pb2

T = TypeVar("T")
SERVER_NAME, SERVER_VERSION = "meshserve", "0.1.0"
LOAD_TIMEOUT_S = 300.0


class KServe:
    """Handlers for inference.GRPCInferenceService; registered by `kserve_handlers`."""

    def __init__(
        self,
        core: RouterInference,
        store: Store,
    ) -> None:
        self.core = core
        self.store = store

    def _route(self, call: Call, name: str) -> Route:
        """The model's route for this caller: UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND as
        on the native API (the same gate)."""
        return self.core.enter(call, name)[1]

    def _admin(self, call: Call) -> None:
        book = self.core.tenancy.source.book
        tenant = self.core.identify(call)
        if book.auth and not tenant.admin:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may not load or unload models (admin tenants may)",
                "REPOSITORY_NOT_ALLOWED",
            )

    def _visible(self, call: Call) -> Callable[[str], bool]:
        book = self.core.tenancy.source.book
        tenant = self.core.identify(call)
        return lambda name: not book.auth or tenant.may_use(name)

    def _translated(self, route: Route, translate: Callable[..., T], *args: Any) -> T:
        """A request's translation to the core's; one it refuses counts as a failed inference
        in the model's statistics (the core counts the rest)."""
        started = time.perf_counter()
        try:
            return translate(*args)
        except ServiceError:
            self.core.accountant.refused(route.spec.name, started)
            raise
        except (ValueError, TypeError, OverflowError) as e:  # e.g. max_tokens 1e999
            self.core.accountant.refused(route.spec.name, started)
            raise invalid_argument([("parameters", f"{type(e).__name__}: {e}")]) from None

    # --- health and metadata -----------------------------------------------------------------

    async def server_live(self, _r: K.ServerLiveRequest, _c: Call) -> K.ServerLiveResponse:
        return K.ServerLiveResponse(live=True)

    async def server_ready(self, _r: K.ServerReadyRequest, _c: Call) -> K.ServerReadyResponse:
        return K.ServerReadyResponse(ready=True)

    async def server_metadata(
        self, _r: K.ServerMetadataRequest, _c: Call
    ) -> K.ServerMetadataResponse:
        return K.ServerMetadataResponse(
            name=SERVER_NAME,
            version=SERVER_VERSION,
            extensions=["model_repository", "statistics", "parameters"],
        )

    async def model_ready(self, r: K.ModelReadyRequest, c: Call) -> K.ModelReadyResponse:
        return K.ModelReadyResponse(ready=bool(self._route(c, r.name).ready))

    async def model_metadata(self, r: K.ModelMetadataRequest, c: Call) -> K.ModelMetadataResponse:
        return metadata(self._route(c, r.name))

    async def model_config(self, r: K.ModelConfigRequest, c: Call) -> K.ModelConfigResponse:
        return K.ModelConfigResponse(config=config(self._route(c, r.name)))

    async def model_statistics(
        self, r: K.ModelStatisticsRequest, c: Call
    ) -> K.ModelStatisticsResponse:
        visible = self._visible(c)
        stats = self.core.accountant.stats
        names = [self._route(c, r.name).spec.name] if r.name else sorted(stats)
        names = [n for n in names if visible(n)]
        out = K.ModelStatisticsResponse()
        for name in names:
            s = stats.get(name, ModelStats())
            m = out.model_stats.add(
                name=name,
                version="1",
                last_inference=s.last_ms,
                inference_count=s.success,
                execution_count=s.success,
            )
            m.inference_stats.success.count, m.inference_stats.success.ns = s.success, s.success_ns
            m.inference_stats.fail.count, m.inference_stats.fail.ns = s.fail, s.fail_ns
        return out

    # --- repository ----------------------------------------------------------------------------

    async def repository_index(
        self, r: K.RepositoryIndexRequest, c: Call
    ) -> K.RepositoryIndexResponse:
        out = K.RepositoryIndexResponse()
        visible = self._visible(c)
        for name, route in sorted(self.core.table.current.routes.items()):
            if not visible(name):
                continue
            state = "READY" if route.ready else "LOADING" if route.loading else "UNAVAILABLE"
            if r.ready and state != "READY":
                continue
            out.models.add(name=name, version="1", state=state)
        return out

    async def repository_model_load(
        self, r: K.RepositoryModelLoadRequest, call: Call
    ) -> K.RepositoryModelLoadResponse:
        self._admin(call)
        route = self._route(call, r.model_name)
        name = route.spec.name
        spec = await self.store.get(self.store.keys.model(name), cluster_pb2.ModelSpec)
        if spec is not None and spec.unloaded_unix_ms:
            spec.unloaded_unix_ms = 0
            await self.store.put(self.store.keys.model(name), spec)
        deadline = time.monotonic() + (call.remaining_s() or LOAD_TIMEOUT_S)
        await self.core.admission.cold.until_ready(name, deadline)  # the one cold-start wait
        return K.RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, r: K.RepositoryModelUnloadRequest, c: Call
    ) -> K.RepositoryModelUnloadResponse:
        self._admin(c)
        name = self._route(c, r.model_name).spec.name
        spec = await self.store.get(self.store.keys.model(name), cluster_pb2.ModelSpec)
        if spec is None:
            raise not_found_model(name, list(self.core.table.current.routes))
        if spec.min_replicas:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {name!r} keeps min_replicas {spec.min_replicas}: set it to 0 to unload",
                "MIN_REPLICAS",
            )
        spec.unloaded_unix_ms = int(time.time() * 1000)
        await self.store.put(self.store.keys.model(name), spec)
        return K.RepositoryModelUnloadResponse()

    # --- inference ------------------------------------------------------------------------------

    async def model_infer(self, r: K.ModelInferRequest, call: Call) -> K.ModelInferResponse:
        """One response; its only header is the trace id (the core's own stay inside)."""
        route = self._route(call, r.model_name)
        inner = replace(call, headers=[], trailers=[])
        if kind(route) == "tensor":
            reply = await self._infer(route, r, inner)
        elif kind(route) == "embed":
            reply = await self._embed(route, r, inner)
        else:
            text: list[str] = []
            async for delta, _final in self._deltas(route, r, inner):
                text.append(delta)
            reply = text_response(route.spec.name, r.id, "".join(text), True)
        if (tr := traceresponse()) is not None:  # the trace id, as Generate's headers carry it
            call.headers.append(tr)
        return reply

    async def _infer(
        self, route: Route, r: K.ModelInferRequest, call: Call
    ) -> K.ModelInferResponse:
        request = inference_pb2.InferRequest(
            model=route.spec.name,
            inputs=self._translated(route, tensors_in, r),
            outputs=[o.name for o in r.outputs],
            request_id=r.id,
        )
        got = await self.core.infer(request, call)
        return infer_response(route.spec.name, r.id, got)

    async def _embed(
        self, route: Route, r: K.ModelInferRequest, call: Call
    ) -> K.ModelInferResponse:
        texts = self._translated(route, input_strings, r, "text_input", True)
        got = await self.core.embed(
            inference_pb2.EmbedRequest(model=route.spec.name, inputs=texts), call
        )
        dim = len(got.embeddings[0].values) if got.embeddings else 0
        out = K.ModelInferResponse(model_name=route.spec.name, model_version="1", id=r.id)
        out.outputs.add(name="embedding", datatype="FP32", shape=[len(got.embeddings), dim])
        flat = [v for e in got.embeddings for v in e.values]
        out.raw_output_contents.append(struct.pack(f"<{len(flat)}f", *flat))
        return out

    async def _deltas(
        self, route: Route, r: K.ModelInferRequest, call: Call
    ) -> AsyncIterator[tuple[str, bool]]:
        g = self._translated(route, generate_request, route, r)
        async for raw in self.core.generate(g, call):
            m = inference_pb2.GenerateResponse.FromString(raw)
            yield m.text, bool(m.finish_reason)

    async def model_stream_infer(
        self, requests: AsyncIterator[K.ModelInferRequest], context: Ctx
    ) -> AsyncIterator[K.ModelStreamInferResponse]:
        """Decoupled: the stream's requests run concurrently; each answers with one response per
        text delta (errors as ``error_message``, the stream goes on)."""
        out: asyncio.Queue[K.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(r: K.ModelInferRequest) -> None:
            name = r.model_name
            call = call_of(context)  # per request: a stream of many has no headers per request
            try:
                route = self._route(call, r.model_name)
                name = route.spec.name
                if kind(route) != "llm":  # not decoupled: one response for the request
                    one_reply = (
                        await self._infer(route, r, call)
                        if kind(route) == "tensor"
                        else await self._embed(route, r, call)
                    )
                    out.put_nowait(K.ModelStreamInferResponse(infer_response=one_reply))
                    return
                async for delta, final in self._deltas(route, r, call):
                    out.put_nowait(
                        K.ModelStreamInferResponse(
                            infer_response=text_response(name, r.id, delta, final)
                        )
                    )
            except (ServiceError, grpc.aio.AioRpcError) as e:
                message = e.message if isinstance(e, ServiceError) else e.details()
                code = e.code.name if isinstance(e, ServiceError) else e.code().name
                err = K.ModelStreamInferResponse(error_message=f"{code}: {message}")
                err.infer_response.id = r.id
                err.infer_response.model_name = name
                out.put_nowait(err)

        async def read() -> None:
            async for r in requests:
                task = asyncio.create_task(one(r))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.gather(*list(running))
            out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()


def over_grpc(fn: Callable[[Any, Call], Awaitable[Any]]) -> Callable[[Any, Ctx], Awaitable[Any]]:
    """A KServe call over gRPC: the context as a `Call`, the core's headers sent after."""

    async def handler(request: Any, context: Ctx) -> Any:
        call = call_of(context)
        reply = await fn(request, call)
        await send_headers(context, call)
        return reply

    return handler


def kserve_handlers(s: KServe) -> grpc.GenericRpcHandler:
    unary: list[tuple[str, Any, Any, Any]] = [
        ("ServerLive", s.server_live, K.ServerLiveRequest, K.ServerLiveResponse),
        ("ServerReady", s.server_ready, K.ServerReadyRequest, K.ServerReadyResponse),
        ("ServerMetadata", s.server_metadata, K.ServerMetadataRequest, K.ServerMetadataResponse),
        ("ModelReady", s.model_ready, K.ModelReadyRequest, K.ModelReadyResponse),
        ("ModelMetadata", s.model_metadata, K.ModelMetadataRequest, K.ModelMetadataResponse),
        ("ModelConfig", s.model_config, K.ModelConfigRequest, K.ModelConfigResponse),
        ("ModelStatistics", s.model_statistics, K.ModelStatisticsRequest,
         K.ModelStatisticsResponse),
        ("ModelInfer", s.model_infer, K.ModelInferRequest, K.ModelInferResponse),
        ("RepositoryIndex", s.repository_index, K.RepositoryIndexRequest,
         K.RepositoryIndexResponse),
        ("RepositoryModelLoad", s.repository_model_load, K.RepositoryModelLoadRequest,
         K.RepositoryModelLoadResponse),
        ("RepositoryModelUnload", s.repository_model_unload, K.RepositoryModelUnloadRequest,
         K.RepositoryModelUnloadResponse),
    ]  # fmt: skip
    methods: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            handlers.unary(over_grpc(fn)),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
        for name, fn, req, resp in unary
    }
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        handlers.stream(s.model_stream_infer),
        request_deserializer=K.ModelInferRequest.FromString,
        response_serializer=K.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", methods)
