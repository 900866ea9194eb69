"""The agent's gRPC services: `Inference` (same API as the router) and `NodeAgent` (operators)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Protocol, TypeVar

import grpc
from meshserve.kvblocks import Event, Removed, Stored
from meshserve.nodeagent.adapters import with_adapter
from meshserve.nodeagent.coalesce import coalesced, interval_of
from meshserve.nodeagent.engines.base import Chunk, Resume, TensorModel
from meshserve.nodeagent.engines.params import check_continuation, resolve_params
from meshserve.nodeagent.replica import Replica
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError, invalid_argument, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import exemplar, tracer
from meshserve.tensors import check_inputs, not_a_tensor_model
from meshserve.v1 import (
    cluster_pb2,
    inference_pb2,
    inference_pb2_grpc,
    nodeagent_pb2,
    nodeagent_pb2_grpc,
)
from meshserve.validation import check_embed, check_generate
from opentelemetry import trace

_tracer = tracer(__name__)
_T = TypeVar("_T")


class Replicas(Protocol):
    """What the servicers may ask of this node (the reconciler implements it)."""

    @property
    def node_id(self) -> str: ...

    def serving(self, name: str) -> Replica:
        """The READY replica for a model name or alias that may take one more stream; raises
        ServiceError (NOT_FOUND, UNAVAILABLE, RESOURCE_EXHAUSTED) saying why not."""

    def adapter(self, name: str) -> cluster_pb2.ModelSpec | None:
        """The spec of the adapter ``name`` names (served on a replica of its base), or None."""

    def all(self) -> list[Replica]:
        """Every replica here, by model name."""

    def node_status(self) -> cluster_pb2.NodeStatus: ...

    async def drain(self, on: bool) -> cluster_pb2.NodeStatus:
        """Stop (or resume) taking streams and placements; the node's status after."""

    async def load(self, spec: cluster_pb2.ModelSpec) -> Replica:
        """Load now, pinned until `unload`; returns once it settled (READY or FAILED)."""

    async def unload(self, model: str) -> bool:
        """False when the model is not here."""


class AgentInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.node_id = replicas.node_id

    def _base_only(self, name: str) -> Replica:
        """The replica for a call that adapters do not serve (Embed, Infer): never the base's
        answer under an adapter's name."""
        if (adapter := self.replicas.adapter(name)) is not None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name!r} is a LoRA adapter of {adapter.base!r}: adapters serve Generate only",
                "ADAPTER_GENERATES_ONLY",
            )
        return self.replicas.serving(name)

    @handlers.stream
    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Ctx
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        server_span = trace.get_current_span()
        server_span.set_attribute("gen_ai.request.model", request.model)
        if request.request_id:
            server_span.set_attribute("meshserve.request_id", request.request_id)
        if request.continuation.token_ids:
            server_span.set_attribute(
                "meshserve.resumed_tokens", len(request.continuation.token_ids)
            )
        adapter = self.replicas.adapter(request.model)
        r = self.replicas.serving(request.model)  # an adapter's: a replica of its base
        check_generate(request, r.spec)
        params = replace(
            resolve_params(request.sampling, r.spec),
            priority=int(request.priority),
            cache_salt=request.cache_salt,
            adapter=adapter.name if adapter is not None else "",
        )
        check_continuation(request, params)
        resume = Resume(tuple(request.continuation.token_ids), request.continuation.text)
        assert r.engine is not None
        model = adapter.name if adapter is not None else r.spec.name  # usage names the adapter
        if adapter is not None:
            server_span.set_attribute("meshserve.adapter", adapter.name)
            server_span.set_attribute("meshserve.base_model", r.spec.name)
        await context.send_initial_metadata(
            (("meshserve-node", self.node_id), ("meshserve-model", model))
        )
        start = time.perf_counter()
        last = start
        code = "OK"
        metrics.IN_FLIGHT.labels("agent", model).inc()
        with _tracer.start_as_current_span(
            "engine.generate",
            attributes={
                "gen_ai.system": "meshserve",
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": params.max_tokens,
                "gen_ai.request.temperature": params.temperature,
                "meshserve.node": self.node_id,
            },
        ) as span:
            mark = r.share.join()
            finished = False
            try:
                first = True
                engine = r.engine

                def run(key: str) -> AsyncIterator[Chunk]:  # key: the engine's name of the load
                    return engine.generate(
                        request.prompt, request.messages, replace(params, adapter=key), resume
                    )

                if adapter is not None:
                    stream = with_adapter(r, adapter, run, handlers.remaining_s(context))
                else:
                    stream = run("")
                async for chunk in coalesced(stream, *interval_of(request, r.spec.engine_args)):
                    now = time.perf_counter()
                    if first:
                        span.set_attribute("meshserve.ttft_s", now - start)
                        metrics.TTFT.labels("agent", model).observe(now - start, exemplar())
                        first = False
                    else:
                        metrics.INTER_TOKEN.labels("agent", model).observe(now - last)
                    last = now
                    r.generated_tokens += len(chunk.token_ids)
                    metrics.TOKENS.labels(model).inc(len(chunk.token_ids))
                    response = inference_pb2.GenerateResponse(
                        text=chunk.text,
                        token_ids=chunk.token_ids,
                        finish_reason=chunk.finish_reason,  # type: ignore[arg-type]
                    )
                    for lp in chunk.logprobs:
                        p = response.logprobs.add(logprob=lp.logprob, token=lp.token)
                        for token_id, token, logprob in lp.top:
                            p.top.add(token_id=token_id, token=token, logprob=logprob)
                    if chunk.finish_reason:
                        response.usage.input_tokens = chunk.input_tokens
                        response.usage.output_tokens = chunk.output_tokens
                        response.usage.gpu_seconds = r.share.since(mark)
                        span.set_attribute("gen_ai.usage.input_tokens", chunk.input_tokens)
                        span.set_attribute("gen_ai.usage.output_tokens", chunk.output_tokens)
                        span.set_attribute(
                            "gen_ai.response.finish_reasons",
                            [inference_pb2.FinishReason.Name(chunk.finish_reason)],  # type: ignore[arg-type]
                        )
                    yield response
                    finished = bool(chunk.finish_reason)
                if not finished:  # the engine gave up without saying why: never a silent cut
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"model {model!r}: the engine ended the stream before it finished; retry",
                        "ENGINE_DIED",
                        retry_after_s=1.0,
                    )
                span.set_status(trace.StatusCode.OK)
            except BaseException as e:
                code = handlers.code_of(e)
                if code == "CANCELLED":
                    span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled by the client"))
                raise
            finally:
                r.share.leave(mark)
                metrics.IN_FLIGHT.labels("agent", model).dec()
                metrics.REQUESTS.labels("agent", model, code).inc()

    @handlers.unary
    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Ctx
    ) -> inference_pb2.EmbedResponse:
        check_embed(request)
        r = self._base_only(request.model)
        assert r.engine is not None
        with _tracer.start_as_current_span(
            "engine.embed", attributes={"gen_ai.request.model": r.spec.name}
        ):
            vectors = await r.engine.embed(request.inputs)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v) for v in vectors]
        )

    @handlers.unary
    async def Infer(
        self, request: inference_pb2.InferRequest, context: Ctx
    ) -> inference_pb2.InferResponse:
        r = self._base_only(request.model)
        engine = r.engine
        if not isinstance(engine, TensorModel):
            raise not_a_tensor_model(r.spec.name)
        model = r.spec.name
        rows = check_inputs(model, request.inputs, request.outputs, engine.signature())
        code = "OK"
        metrics.IN_FLIGHT.labels("agent", model).inc()
        with _tracer.start_as_current_span(
            "engine.infer",
            attributes={
                "gen_ai.request.model": model,
                "meshserve.node": self.node_id,
                "meshserve.rows": rows,
            },
        ) as span:
            if request.request_id:
                span.set_attribute("meshserve.request_id", request.request_id)
            try:
                done = await engine.infer(
                    request.inputs,
                    request.outputs,
                    rows,
                    int(request.priority),
                    handlers.remaining_s(context),
                )
            except BaseException as e:
                code = handlers.code_of(e)
                raise
            finally:
                metrics.IN_FLIGHT.labels("agent", model).dec()
                metrics.REQUESTS.labels("agent", model, code).inc()
            span.set_attribute("meshserve.batch.rows", done.batch_rows)
            span.set_attribute("meshserve.batch.requests", done.batch_requests)
            span.set_attribute("meshserve.batch.queue_ms", done.queue_s * 1000)
            span.set_attribute("meshserve.batch.window_ms", done.window_s * 1000)
        await context.send_initial_metadata(
            (("meshserve-node", self.node_id), ("meshserve-model", model))
        )
        return inference_pb2.InferResponse(
            outputs=done.result, batch_size=done.batch_rows, queue_ms=done.queue_s * 1000
        )

    @handlers.unary
    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Ctx
    ) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for r in self.replicas.all():
            out.models.add(
                name=r.spec.name,
                aliases=r.spec.aliases,
                ready_replicas=1 if r.ready else 0,
                max_model_len=r.spec.max_model_len,
                signature=r.status.signature,
            )
        return out


class AgentControl(nodeagent_pb2_grpc.NodeAgentServicer):
    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

    @handlers.unary
    async def GetNodeStatus(
        self, request: nodeagent_pb2.GetNodeStatusRequest, context: Ctx
    ) -> nodeagent_pb2.GetNodeStatusResponse:
        out = nodeagent_pb2.GetNodeStatusResponse(node=self.replicas.node_status())
        for r in self.replicas.all():
            out.replicas.append(r.status)
            out.load.add(
                model=r.spec.name,
                in_flight=r.engine.in_flight if r.engine else 0,
                generated_tokens=r.generated_tokens,
            )
        return out

    @handlers.unary
    async def Drain(
        self, request: nodeagent_pb2.DrainRequest, context: Ctx
    ) -> nodeagent_pb2.DrainResponse:
        return nodeagent_pb2.DrainResponse(node=await self.replicas.drain(not request.undrain))

    @handlers.unary
    async def LoadModel(
        self, request: nodeagent_pb2.LoadModelRequest, context: Ctx
    ) -> nodeagent_pb2.LoadModelResponse:
        spec = request.spec
        if not spec.name or not spec.source:
            raise invalid_argument([("spec", "name and source are required")])
        r = await self.replicas.load(spec)
        return nodeagent_pb2.LoadModelResponse(replica=r.status)

    @handlers.stream
    async def WatchKvBlocks(
        self, request: nodeagent_pb2.WatchKvBlocksRequest, context: Ctx
    ) -> AsyncIterator[nodeagent_pb2.WatchKvBlocksResponse]:
        r = next((x for x in self.replicas.all() if x.spec.name == request.model), None)
        if r is None:
            raise not_found_model(request.model, [x.spec.name for x in self.replicas.all()])
        if r.kv is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {request.model!r} on this node does not report its KV blocks (its "
                "engine has no prefix cache, or cannot say what it holds; ReplicaStatus."
                "kv_events says which do)",
                "NO_KV_EVENTS",
            )
        kv = r.kv
        async for n, (snapshot, events) in _numbered(kv.watch()):
            yield nodeagent_pb2.WatchKvBlocksResponse(
                seq=n, snapshot=snapshot, events=[_event_pb(e) for e in events],
                generation=kv.generation,
            )  # fmt: skip

    @handlers.unary
    async def UnloadModel(
        self, request: nodeagent_pb2.UnloadModelRequest, context: Ctx
    ) -> nodeagent_pb2.UnloadModelResponse:
        if not await self.replicas.unload(request.model):
            raise not_found_model(request.model, [r.spec.name for r in self.replicas.all()])
        return nodeagent_pb2.UnloadModelResponse()


async def _numbered(items: AsyncIterator[_T]) -> AsyncIterator[tuple[int, _T]]:
    n = 0
    async for item in items:
        yield n, item
        n += 1


def _event_pb(e: Event) -> nodeagent_pb2.KvBlockEvent:
    E = nodeagent_pb2.KvBlockEvent
    if isinstance(e, Stored):
        return E(kind=E.KIND_STORED, hashes=e.hashes, medium=e.medium)  # type: ignore[arg-type]
    if isinstance(e, Removed):
        return E(kind=E.KIND_REMOVED, hashes=e.hashes, medium=e.medium)  # type: ignore[arg-type]
    return E(kind=E.KIND_CLEARED)
