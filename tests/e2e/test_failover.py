"""No request lost, no token repeated: faults at the worst moments, through a real mesh.

Two agents each hold a replica of the demo model (anti-affinity); the router serves. Each fault
hits the agent that serves a stream while the client reads it; the client must see one
uninterrupted stream equal, token for token, to an uninterrupted greedy run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import meshserve.v1.inference_pb2_grpc as inference_pb2_grpc
import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.v1 import cluster_pb2, inference_pb2

from tests.e2e.conftest import (
    apply,
    demo_mesh,
    generate,
    model_spec,
    read_spans,
    ready_replicas,
    replica_records,
    status_text,
)
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
M = TypeVar("M", cluster_pb2.ReplicaStatus, cluster_pb2.NodeStatus)
LEASE_S = 2
TOKENS = 320  # long enough that a fault lands mid-stream (≈ 0.5-1 s of generation)
GRACE_S = 1.0  # the agents' drain grace: a SIGTERM'd agent's streams get this long
AGENT_FLAGS = ("--drain-grace", str(GRACE_S))
LONG = 1900  # a stream of ≈ 3-6 s: it outlasts the grace (the demo model's context is 2048)
STOP_BUDGET_S = 5.0  # process.py: what shutdown may take beyond the grace


def greedy(
    max_tokens: int = TOKENS, prompt: str = "The scheduler decided"
) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model="demo", prompt=prompt)
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = 0.0
    r.sampling.ignore_eos = True
    return r


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    """Two agents, each holding a replica of the demo model (anti-affinity)."""
    root = tmp_path_factory.mktemp("failover")
    with demo_mesh(
        root, demo_model, 2, 2, LEASE_S, trace_dir=root / "traces", agent_flags=AGENT_FLAGS
    ) as m:
        yield m


async def _replicas(m: Mesh, n: int) -> bool:
    return await ready_replicas(m.services["router"].address, "demo") >= n


class Faulty:
    """Reads a stream through the router; after ``after`` tokens, ``fault(node)`` hits the agent
    serving it. Records tokens, text, the longest gap between messages and the trailers."""

    def __init__(self, mesh: Mesh, request: inference_pb2.GenerateRequest) -> None:
        self.mesh = mesh
        self.request = request
        self.ids: list[int] = []
        self.text = ""
        self.node = ""
        self.gap_after_fault = 0.0
        self.trailers: dict[str, str] = {}
        self.final: inference_pb2.GenerateResponse | None = None

    async def run(self, after: int, fault: object) -> None:
        address = self.mesh.services["router"].address
        async with grpc.aio.insecure_channel(address) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(self.request, timeout=60)
            faulted_at = 0.0
            async for msg in call:
                now = time.monotonic()
                if faulted_at and not self.gap_after_fault and msg.token_ids:
                    self.gap_after_fault = now - faulted_at
                self.ids += msg.token_ids
                self.text += msg.text
                if msg.finish_reason:
                    self.final = msg
                if not self.node:
                    self.node = dict(await call.initial_metadata())["meshserve-node"]
                if not faulted_at and len(self.ids) >= after:
                    fault(self.node)  # type: ignore[operator]
                    faulted_at = time.monotonic()
            self.trailers = {k: str(v) for k, v in (await call.trailing_metadata() or ())}


async def baseline(mesh: Mesh, request: inference_pb2.GenerateRequest) -> list[int]:
    out = await generate(mesh.services["router"].address, request, timeout=60)
    assert len(out.token_ids) == request.sampling.max_tokens
    return out.token_ids


async def restore(mesh: Mesh, node: str) -> None:
    """The faulted agent back, with its replica READY, for the next test."""
    if not mesh.services[node].alive():
        mesh.start_agent(node, extra=AGENT_FLAGS)
    await eventually(lambda: _replicas(mesh, 2), 120, "both replicas READY again")


async def test_kill_9_mid_stream_completes_the_stream_exactly(mesh: Mesh) -> None:
    expected = await baseline(mesh, greedy())
    s = Faulty(mesh, greedy())
    await s.run(after=40, fault=lambda node: mesh.kill(node))
    assert len(s.ids) == TOKENS and s.ids == expected  # nothing lost, nothing repeated
    assert s.final is not None and s.final.usage.output_tokens == TOKENS
    assert s.trailers.get("meshserve-failovers") == "1"
    await restore(mesh, s.node)


async def test_sigstop_mid_stream_moves_on_within_the_lease(mesh: Mesh) -> None:
    expected = await baseline(mesh, greedy())
    s = Faulty(mesh, greedy())
    stopped: list[str] = []

    def freeze(node: str) -> None:
        mesh.send(node, signal.SIGSTOP)
        stopped.append(node)

    try:
        await s.run(after=40, fault=freeze)
    finally:
        for node in stopped:
            mesh.send(node, signal.SIGCONT)
    assert s.ids == expected
    # The frozen agent's lease expires (TTL), its replica leaves the table, and the stream goes
    # on elsewhere at once, not after the 30 s inter-token timeout.
    assert s.gap_after_fault < LEASE_S + 1.5, f"stalled {s.gap_after_fault:.2f} s"
    assert s.trailers.get("meshserve-failovers") == "1"
    await restore(mesh, s.node)


async def exit_time(mesh: Mesh, node: str, since: float, timeout: float) -> tuple[int, float]:
    """(exit code, seconds from ``since`` until the process ended), polled while streams run."""
    proc = mesh.services[node].proc
    await eventually(lambda: proc.poll() is not None, timeout, f"{node} to exit")
    return proc.returncode, time.monotonic() - since


async def test_sigterm_lets_a_stream_that_fits_the_grace_finish_where_it_is(mesh: Mesh) -> None:
    """The draining agent keeps serving what it has: a stream that ends within the grace never
    moves, and the agent exits 0 once it is done."""
    request = greedy(max_tokens=120)
    expected = await baseline(mesh, request)
    s = Faulty(mesh, request)
    exited: list[asyncio.Task[tuple[int, float]]] = []

    def term(node: str) -> None:
        mesh.send(node, signal.SIGTERM)
        exited.append(asyncio.create_task(exit_time(mesh, node, time.monotonic(), 30)))

    await s.run(after=40, fault=term)
    assert s.ids == expected
    assert s.trailers.get("meshserve-failovers") == "0"  # finished on the draining agent
    code, took = await exited[0]
    assert code == 0, mesh.tail(s.node)
    assert took < GRACE_S + STOP_BUDGET_S, took
    await restore(mesh, s.node)


async def test_sigterm_moves_a_stream_that_outlasts_the_grace(mesh: Mesh) -> None:
    """At the end of the grace the agent ends its streams; the router continues each on the
    other replica from what the client has: one failover, the exact uninterrupted greedy
    stream, and the agent exits 0 within its grace and stop budget, not when the stream ends."""
    expected = await baseline(mesh, greedy(LONG))
    s = Faulty(mesh, greedy(LONG))
    exited: list[asyncio.Task[tuple[int, float]]] = []
    termed = 0.0

    def term(node: str) -> None:
        nonlocal termed
        mesh.send(node, signal.SIGTERM)
        termed = time.monotonic()
        exited.append(asyncio.create_task(exit_time(mesh, node, termed, 60)))

    await s.run(after=40, fault=term)
    ended = time.monotonic() - termed
    assert ended > GRACE_S + 0.5, f"the stream ended {ended:.2f} s after SIGTERM: no test"
    assert len(s.ids) == LONG and s.ids == expected  # nothing lost, nothing repeated
    assert s.trailers.get("meshserve-failovers") == "1"
    assert s.final is not None and s.final.usage.output_tokens == LONG
    code, took = await exited[0]
    assert code == 0, mesh.tail(s.node)
    assert took < GRACE_S + STOP_BUDGET_S, f"exited {took:.2f} s after SIGTERM"
    await restore(mesh, s.node)


async def test_seeded_sampling_continues_identically_after_kill_9(mesh: Mesh) -> None:
    request = greedy()
    request.sampling.temperature = 0.8
    request.sampling.seed = 1234
    expected = await baseline(mesh, request)
    s = Faulty(mesh, request)
    await s.run(after=25, fault=lambda node: mesh.kill(node))
    assert s.ids == expected  # the torch engine replays the seeded generator's draws
    await restore(mesh, s.node)


async def test_saturation_queues_instead_of_failing(mesh: Mesh, demo_model: Path) -> None:
    """200 concurrent streams on one replica that admits 64: all succeed; the rest queue."""
    router = mesh.services["router"].address
    await apply(mesh, model_spec("solo", demo_model, min_replicas=1, max_replicas=1))
    await eventually(lambda: ready_replicas(router, "solo"), 120, "solo READY")
    request = greedy(max_tokens=16, prompt="Hello")
    request.model = "solo"
    results = await asyncio.gather(
        *(generate(router, request, timeout=120) for _ in range(200)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert all(len(r.token_ids) == 16 for r in done)
    # Those that arrived while all 64 slots were taken waited for one (how many depends on how
    # fast the first ones finish); none was refused.
    assert any("meshserve-queued-ms" in r.headers for r in done)


async def test_burst_on_a_scaled_to_zero_model_loads_it_once(mesh: Mesh, demo_model: Path) -> None:
    """100 concurrent requests for a cold model: one EnsureModel flight, one load, none lost;
    those that waited say how long."""
    router = mesh.services["router"].address
    await apply(mesh, model_spec("cold", demo_model, min_replicas=0, max_replicas=1))
    request = greedy(max_tokens=4, prompt="Hello")
    request.model = "cold"
    await eventually(lambda: _known(router, "cold"), 10, "the router to see 'cold'")
    results = await asyncio.gather(
        *(generate(router, request, timeout=120) for _ in range(100)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    done = [r for r in results if not isinstance(r, BaseException)]
    # Those that came before the replica was READY waited for it, and say how long.
    assert sum("meshserve-queued-ms" in r.headers for r in done) >= 1
    trace_dir = mesh.data_dir / "traces"

    def agent_spans() -> list[dict[str, Any]]:
        return [
            s for s in read_spans(trace_dir)
            if s["attributes"].get("gen_ai.request.model") == "cold"
            and s["resource"]["attributes"].get("service.name") == "meshserve-nodeagent"
        ]  # fmt: skip

    # Spans reach the files in batches, in the order they ended. Every load span ended before
    # the replica served its first request, so once the agents' spans of all 100 requests are
    # there, so is every load that finished meanwhile; a load still running would show in etcd.
    await eventually(
        lambda: sum(s["name"].endswith("/Generate") for s in agent_spans()) >= 100,
        30,
        "the agents' spans of the 100 requests to be exported",
    )
    loads = [s for s in agent_spans() if s["name"] == "model.load"]
    assert len(loads) == 1, [s["attributes"].get("meshserve.node") for s in loads]
    replicas = [r for r in await replica_records(mesh) if r.model == "cold"]
    assert [r.state for r in replicas] == [cluster_pb2.REPLICA_STATE_READY], replicas


async def _known(router: str, model: str) -> bool:
    async with grpc.aio.insecure_channel(router) as ch:
        listing = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    return any(m.name == model for m in listing.models)


def breaker_row(text: str, address: str) -> str:
    return next((line for line in text.splitlines() if address in line and "demo" in line), "")


async def test_breaker_opens_for_a_dead_replica_then_half_opens(mesh: Mesh) -> None:
    """Requests that meet a kill -9'd agent before its lease ends open its breaker (each still
    succeeds elsewhere); `meshserve status` shows it open, then half-open after the cool-down."""
    router = mesh.services["router"].address
    victim = "agent-0"
    address = mesh.services[victim].address
    mesh.kill(victim)
    request = greedy(max_tokens=4, prompt="Hello")
    results = await asyncio.gather(*(generate(router, request, timeout=30) for _ in range(12)))
    assert all(len(r.token_ids) == 4 for r in results)  # none lost
    assert any(int(r.headers["meshserve-attempts"]) > 1 for r in results)
    await eventually(
        lambda: "OPEN" in breaker_row(status_text(mesh), address), 15, "the breaker to show open"
    )
    await eventually(
        lambda: "HALF_OPEN" in breaker_row(status_text(mesh), address),
        20,
        "the breaker to half-open after its cool-down",
    )
    await restore(mesh, victim)


async def _embed(router: str) -> inference_pb2.EmbedResponse:
    async with grpc.aio.insecure_channel(router) as ch:
        reply: inference_pb2.EmbedResponse = await inference_pb2_grpc.InferenceStub(ch).Embed(
            inference_pb2.EmbedRequest(model="demo", inputs=["a probe"]), timeout=30
        )
    return reply


async def test_embed_calls_open_a_breaker_and_an_embed_probe_closes_it(mesh: Mesh) -> None:
    """Unary calls share Generate's attempt policy: Embeds that meet a kill -9'd agent open its
    breaker (each still answered by the other replica); the agent comes back on the same
    address, the breaker half-opens, and an Embed that probes it closes it (unary calls used
    to take a half-open breaker's probe and never report, leaving it half-open for good)."""
    router = mesh.services["router"].address
    victim = "agent-1"
    address = mesh.services[victim].address
    mesh.kill(victim)
    replies = await asyncio.gather(*(_embed(router) for _ in range(12)))
    assert all(len(r.embeddings) == 1 and r.embeddings[0].values for r in replies)
    await eventually(
        lambda: "OPEN" in breaker_row(status_text(mesh), address), 15, "the breaker to open"
    )
    mesh.start_agent(victim, extra=(*AGENT_FLAGS, "--listen", address))
    await eventually(lambda: _replicas(mesh, 2), 120, "the agent back, its replica READY")
    await eventually(
        lambda: "HALF_OPEN" in breaker_row(status_text(mesh), address), 70, "a half-open breaker"
    )

    async def closed() -> bool:
        await _embed(router)  # one of these lands on the half-open replica: the probe
        return "CLOSED" in breaker_row(status_text(mesh), address)

    await eventually(closed, 30, "an Embed probe to close the breaker")


async def test_explain_route_shows_the_last_decision_with_every_candidates_scores(
    mesh: Mesh,
) -> None:
    """The routing pipeline's decision for one request, as `meshserve explain-route demo` and
    the request's router.pick span show it: both replicas scored, the chosen one the one whose
    agent served the request (its meshserve-node header)."""
    await eventually(lambda: _replicas(mesh, 2), 120, "both replicas READY")
    request = greedy(max_tokens=2, prompt="Hello")
    request.request_id = f"explain-{time.monotonic_ns()}"
    out = await generate(mesh.services["router"].address, request)
    served = out.headers["meshserve-node"]
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshserve", "explain-route", "demo", "--etcd", mesh.etcd.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert request.request_id in text and f"→ {served}" in text, text
    rows = {line.split("│")[2].strip(): line for line in text.splitlines() if "127.0.0.1:" in line}
    assert set(rows) == {"agent-0", "agent-1"}, text  # every candidate, each with its scores
    for node, line in rows.items():
        cells = [c.strip() for c in line.split("│")]
        assert cells[4] == "passed" and float(cells[5]) > 0, line
        assert (cells[1] == "*") == (node == served), line
    trace_dir = mesh.data_dir / "traces"

    def pick_span() -> dict[str, Any] | None:
        spans = read_spans(trace_dir)
        ours = {
            s["context"]["trace_id"]
            for s in spans
            if s["attributes"].get("meshserve.request_id") == request.request_id
        }
        picks = [s for s in spans if s["name"] == "router.pick"]
        return next((s for s in picks if s["context"]["trace_id"] in ours), None)

    await eventually(lambda: pick_span() is not None, 30, "the request's router.pick span")
    span = pick_span()
    assert span is not None
    candidates = span["attributes"]["meshserve.pick.candidates"]
    assert len(candidates) == 2 and any(c.startswith(f"*{served} total=") for c in candidates)


async def test_a_load_longer_than_the_deadline_fails_fast(mesh: Mesh, demo_model: Path) -> None:
    """The scheduler estimates the load (never loaded: its declared 3 GiB over the source's
    bandwidth, ≈ 18 s); a request with 6 s left fails at once, and the load goes on."""
    router = mesh.services["router"].address
    await apply(mesh, model_spec("heavy", demo_model, min_replicas=0, memory="3GiB"))
    await eventually(lambda: _known(router, "heavy"), 10, "the router to see 'heavy'")
    request = greedy(max_tokens=4, prompt="Hello")
    request.model = "heavy"
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(router, request, timeout=6)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "needs about" in (e.value.details() or ""), e.value.details()
    assert time.monotonic() - started < 3.0
    out = await generate(router, request, timeout=60)  # the load went on
    assert len(out.token_ids) == 4


async def _replica_status(mesh: Mesh, model: str, node: str) -> cluster_pb2.ReplicaStatus | None:
    return await _etcd_get(mesh, Keyspace().replica(model, node), cluster_pb2.ReplicaStatus)


async def _revision(mesh: Mesh) -> int:
    """etcd's current revision."""
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        return int((await client.get_prefix(Keyspace().prefix.encode())).header.revision)
    finally:
        await client.close()


async def _first_status(
    mesh: Mesh, model: str, node: str, wanted: int, since: int
) -> cluster_pb2.ReplicaStatus:
    """The first write of the replica's status in state ``wanted`` after revision ``since`` (a
    watch, so a state that lasts a moment is seen too)."""
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    watch = await client.watch(Keyspace().replica(model, node), start_revision=since + 1)
    try:
        async for event in watch:
            if event.kind != "PUT":
                continue
            status = cluster_pb2.ReplicaStatus.FromString(event.kv.value)
            if status.state == wanted:
                return status
        raise AssertionError("the watch ended")
    finally:
        await watch.cancel()
        await client.close()


async def _etcd_get(mesh: Mesh, key: bytes, kind: type[M]) -> M | None:
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        return await Store(client, Keyspace()).get(key, kind)
    finally:
        await client.close()


async def test_device_oom_fails_one_request_and_repeated_oom_moves_the_model(
    mesh: Mesh, demo_model: Path
) -> None:
    """Injected device OOM (no GPU here; the CUDA error type) at every 6th decode step:
    RESOURCE_EXHAUSTED for that request, the agent serves the next one, its measured memory
    rises in etcd; at the third OOM the replica gives up and the scheduler moves the model."""
    router = mesh.services["router"].address
    spec = model_spec("oomy", demo_model, min_replicas=1, max_replicas=1)
    spec.engine_args["inject_oom_every"] = "6"
    await apply(mesh, spec)
    await eventually(lambda: ready_replicas(router, "oomy"), 60, "oomy READY")
    request = greedy(max_tokens=4, prompt="Hello")
    request.model = "oomy"
    # Warm-up took steps 1-4; this one OOMs at 6 and the router retries it on the same replica
    # with what was delivered (RESOURCE_EXHAUSTED is not a failure): the client sees no error.
    first = await generate(router, request)
    assert len(first.token_ids) == 4
    node = first.headers["meshserve-node"]
    agent = mesh.services[node].address
    before = await _replica_status(mesh, "oomy", node)
    assert before is not None
    codes = []
    for _ in range(2):
        try:
            await generate(agent, request)
            codes.append("OK")
        except grpc.aio.AioRpcError as e:
            codes.append(e.code().name)
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes  # one OOM, then served
    assert mesh.services[node].alive()

    async def grew() -> bool:
        now = await _replica_status(mesh, "oomy", node)
        return now is not None and now.memory_bytes > before.memory_bytes

    await eventually(grew, 10, "the measured memory to rise in etcd")
    # FAILED may last only until the scheduler moves the model and this agent drops the record
    # (CI once polled past it): watch the key's every write instead of polling its latest value.
    since = await _revision(mesh)
    failed_seen = asyncio.create_task(
        _first_status(mesh, "oomy", node, cluster_pb2.REPLICA_STATE_FAILED, since)
    )
    for _ in range(6):  # more OOMs: at the third the replica is given up here
        with contextlib.suppress(grpc.aio.AioRpcError):
            await generate(agent, request)

    async def state(on: str, wanted: int) -> cluster_pb2.ReplicaStatus | None:
        r = await _replica_status(mesh, "oomy", on)
        return r if r is not None and r.state == wanted else None

    try:
        async with asyncio.timeout(30):
            failed = await failed_seen
    except TimeoutError:
        raise AssertionError(f"oomy never written FAILED on {node} within 30 s") from None
    ooms = re.fullmatch(r"out of device memory (\d+) times", failed.error)
    assert ooms is not None and int(ooms.group(1)) >= 3, failed.error
    other = next(n for n in ("agent-0", "agent-1") if n != node)
    await eventually(
        lambda: state(other, cluster_pb2.REPLICA_STATE_READY), 60, f"oomy READY on {other}"
    )
    served = await generate(router, request)  # the router follows it there
    assert served.headers["meshserve-node"] == other


async def _node_status(mesh: Mesh, node: str) -> cluster_pb2.NodeStatus | None:
    return await _etcd_get(mesh, Keyspace().node(node), cluster_pb2.NodeStatus)


async def test_agents_publish_measured_decode_throughput(mesh: Mesh, demo_model: Path) -> None:
    """A model whose engine takes one stream at a time, sent four long streams at once: the
    replica publishes its decode tokens/s and the node its device's measured capacity (streams
    were queued in the engine), both near what the clients counted."""
    router = mesh.services["router"].address
    spec = model_spec("narrow", demo_model, min_replicas=1, max_replicas=1)
    spec.engine_args["max_batch"] = "1"
    await apply(mesh, spec)
    await eventually(lambda: ready_replicas(router, "narrow"), 60, "narrow READY")
    request = greedy(max_tokens=900, prompt="Throughput")
    request.model = "narrow"
    first = await generate(router, request)  # one alone: which node, and its rate
    node = first.headers["meshserve-node"]
    agent = mesh.services[node].address
    started = time.monotonic()
    runs = [asyncio.create_task(generate(agent, request, timeout=120)) for _ in range(4)]

    async def measured() -> cluster_pb2.NodeStatus | None:
        n = await _node_status(mesh, node)
        ok = n is not None and any(t.measured for t in n.throughput)
        return n if ok else None

    async def rate() -> cluster_pb2.ReplicaStatus | None:
        r = await _replica_status(mesh, "narrow", node)
        return r if r is not None and r.decode_tokens_per_s > 0 else None

    # The node's and the replica's records are separate writes: wait on each, not one after
    # reading the other (CI once read the replica a moment before its rate was written).
    await eventually(measured, 60, "a measured capacity in the node's status")
    replica = await eventually(rate, 30, "the replica's decode tokens/s in etcd")
    outs = await asyncio.gather(*runs)
    client_rate = sum(len(o.token_ids) for o in outs) / (time.monotonic() - started)
    # The capacity as measured over the whole run (the first one published may come from the
    # run's first second, before the queue formed: CI once read 34 tokens/s of ~700).
    status = await eventually(measured, 10, "the node's measured capacity after the run")
    assert replica.decode_tokens_per_s > 0
    (device,) = [t for t in status.throughput if t.measured]
    assert device.device_id == ""  # a CPU node's one device
    # The engine's counter over ~1 s samples against what the clients counted end to end:
    # the same work, so within a factor of 3 either way (noisy shared CI machines).
    assert client_rate / 3 < device.capacity_tokens_per_s < client_rate * 3, (
        device,
        client_rate,
    )
    assert device.capacity_tokens_per_s >= device.decode_tokens_per_s * 0.99


async def test_a_sim_model_fails_over_like_a_real_one(mesh: Mesh) -> None:
    """`engine: sim` in a real mesh: two replicas (one per agent) give the same greedy text, the
    replica publishes its engine's load, and a kill -9 mid-stream completes the stream exactly."""
    spec = model_spec("simmy", "sim://tiny", engine="sim", memory="64MiB", min_replicas=2)
    spec.engine_args.update(ttft_ms="5", itl_ms="4")
    await apply(mesh, spec)
    router = mesh.services["router"].address
    await eventually(lambda: _sim_replicas(router, 2), 60, "two simmy replicas READY")
    request = greedy(max_tokens=300, prompt="Simulated")
    request.model = "simmy"
    direct = [
        await generate(mesh.services[node].address, request, timeout=30)
        for node in ("agent-0", "agent-1")
    ]
    assert direct[0].token_ids == direct[1].token_ids and len(direct[0].token_ids) == 300
    s = Faulty(mesh, request)
    await s.run(after=60, fault=lambda node: mesh.kill(node))
    assert s.ids == direct[0].token_ids  # nothing lost, nothing repeated
    assert s.trailers.get("meshserve-failovers") == "1"
    await restore(mesh, s.node)
    await eventually(lambda: _sim_replicas(router, 2), 60, "simmy back on two agents")


async def _sim_replicas(router: str, n: int) -> bool:
    return await ready_replicas(router, "simmy") >= n


async def test_coalesced_stream_has_the_same_tokens_in_fewer_messages(mesh: Mesh) -> None:
    """stream_interval_ms packs tokens after the first (which goes alone) into fewer messages,
    through the router, without changing a token."""
    router = mesh.services["router"].address
    plain = await generate(router, greedy(200), timeout=60)
    packed = greedy(200)
    packed.stream_interval_ms = 50
    sizes: list[int] = []
    ids: list[int] = []
    async with grpc.aio.insecure_channel(router) as ch:
        async for m in inference_pb2_grpc.InferenceStub(ch).Generate(packed, timeout=60):
            sizes.append(len(m.token_ids))
            ids += m.token_ids
    assert ids == plain.token_ids
    assert sizes[0] == 1  # the first token alone
    assert len(sizes) < plain.messages / 3, (len(sizes), plain.messages)
