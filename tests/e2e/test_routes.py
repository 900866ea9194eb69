"""Routes through a real mesh (etcd, a scheduler, a simulated agent of two nodes, a router):
`meshserve route apply` reaches the router; a 10/90 canary splits 2,000 sessions by weight
through the router, each session sticking to its target; a metadata rule picks its target; a
target that fails every request, and one whose only slot is taken past the hop's bound, hand the
request to the next hop in the chain's order, counted as a fallback in usage; a shadow copy's
answer never reaches the client and shows in `meshserve route status`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial

import grpc
import pytest
from meshserve.localmesh import Mesh
from meshserve.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

from tests.e2e.conftest import apply, model_spec, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
FAST = {"ttft_ms": "1", "itl_ms": "1"}
MODELS = {
    "chat-v1": FAST,
    "chat-v2": FAST,
    "chat-small": FAST,
    "chat-broken": {**FAST, "inject_fail_after_step": "4"},  # fails every request after warm-up
    "chat-slow": {"ttft_ms": "1", "itl_ms": "20"},
}
ROUTES = """
- name: chat
  targets: {chat-v2: 10, chat-v1: 90}
  rules:
    - {name: canary-header, metadata: {x-canary: "yes"}, target: chat-v2}
- name: mirror
  targets: {chat-v1: 1}
  shadows: {chat-small: 1.0}
- name: errs
  targets: {chat-broken: 1}
  fallbacks: [chat-v1, chat-small]
  max_wait_s: 0.5
- name: busy
  targets: {chat-slow: 1}
  fallbacks: [chat-small]
  max_wait_s: 0.3
- name: smart
  targets: {chat-v1: 1}
  cascade: {model: chat-small, min_mean_logprob: -0.45, tokens: 6}
"""
THRESHOLD, HEAD = -0.45, 6


def cli(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshserve", *args, "--etcd", mesh.etcd.endpoint],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip


@pytest.fixture(scope="module")
def rmesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("routes")
    mesh = Mesh(root / "mesh", lease_ttl_s=3)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        mesh.start_agent("fleet", device="cpu", extra=["--simulate", "2", "--memory-limit", "4GiB",
                                                       "--max-in-flight", "1"])  # fmt: skip
        router = mesh.start_router()

        async def setup() -> None:
            for name, args in MODELS.items():
                spec = model_spec(name, f"sim://{name}", engine="sim", memory="64MiB",
                                  min_replicas=1, engine_args=args)  # fmt: skip
                await apply(mesh, spec)
            for name in MODELS:
                await eventually(partial(ready_replicas, router.address, name), 60, f"{name} READY")

        asyncio.run(setup())
        (root / "routes.yaml").write_text(ROUTES)
        applied = cli(mesh, "route", "apply", str(root / "routes.yaml"))
        assert applied.returncode == 0 and "applied route chat" in applied.stdout, applied
        yield mesh
    finally:
        mesh.stop()


async def ask(ch: grpc.aio.Channel, model: str, session: str = "", tokens: int = 1,
              metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, str]:  # fmt: skip
    """(the model that served it, the text)."""
    req = inference_pb2.GenerateRequest(model=model, prompt="hello", session_key=session)
    req.sampling.max_tokens, req.sampling.ignore_eos, req.sampling.temperature = tokens, True, 0.0
    call = inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=30, metadata=metadata)
    text = "".join([m.text async for m in call])
    headers = dict(await call.initial_metadata() or ())
    return str(headers.get("meshserve-model", "")), text


async def served_by_route(router: str, route: str) -> bool:
    async with grpc.aio.insecure_channel(router) as ch:
        try:
            return bool((await ask(ch, route))[0])
        except grpc.aio.AioRpcError:
            return False


@pytest.mark.asyncio
async def test_canary_splits_2000_sessions_by_weight_and_each_sticks(rmesh: Mesh) -> None:
    router = rmesh.services["router"].address
    await eventually(lambda: served_by_route(router, "chat"), 10, "route chat known")
    async with grpc.aio.insecure_channel(router) as ch:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with sem:
                return (await ask(ch, "chat", f"user-{i}"))[0]

        served = await asyncio.gather(*(one(i) for i in range(2000)))
        counts = Counter(served)
        assert set(counts) == {"chat-v1", "chat-v2"}, counts
        assert 0.085 <= counts["chat-v2"] / 2000 <= 0.115, counts  # 10 % ± 1.5 points
        again = await asyncio.gather(*(one(i) for i in range(100)))
        assert again == served[:100]  # each session keeps its target
        # The header rule wins over the weights for a session the weights give to chat-v1.
        v1_user = next(f"user-{i}" for i, m in enumerate(served) if m == "chat-v1")
        got = await ask(ch, "chat", v1_user, metadata=(("x-canary", "yes"),))
        assert got[0] == "chat-v2"


@pytest.mark.asyncio
async def test_canary_fallback_on_error_and_on_saturation_in_chain_order(rmesh: Mesh) -> None:
    router = rmesh.services["router"].address
    await eventually(lambda: served_by_route(router, "errs"), 10, "route errs known")
    async with grpc.aio.insecure_channel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        async def errs() -> dict[tuple[str, str], router_pb2.TargetStatus]:
            s = await stub.RouteStatus(router_pb2.RouteStatusRequest(route="errs"), timeout=5)
            return {(t.model, t.role): t for t in s.targets}

        before = await errs()  # the probe above went this way once
        # chat-broken fails every stream before its first token: the chain's next, chat-v1.
        for _ in range(3):
            assert (await ask(ch, "errs"))[0] == "chat-v1"
        # chat-slow's only slot is held by a long stream: after 0.3 s queued, chat-small.
        started = asyncio.Event()
        long = asyncio.create_task(hold(ch, "chat-slow", 150, started))  # 3 s at 20 ms a token
        await asyncio.wait_for(started.wait(), 10)
        assert (await ask(ch, "busy"))[0] == "chat-small"
        assert await long == "chat-slow"
        usage = await stub.Usage(router_pb2.UsageRequest(), timeout=5)
        rows = {r.model: r for r in usage.rows}
        assert rows["chat-v1"].fallbacks >= 3 and rows["chat-small"].fallbacks >= 1
        by = await errs()
        fell = by[("chat-broken", "target")].fell_back - before[("chat-broken", "target")].fell_back
        assert fell == 3
        served = by[("chat-v1", "fallback")].requests - before[("chat-v1", "fallback")].requests
        assert served == 3
        assert ("chat-small", "fallback") not in by  # the chain stopped at its first good hop


async def hold(ch: grpc.aio.Channel, model: str, tokens: int, started: asyncio.Event) -> str:
    """A stream of ``tokens`` tokens on ``model``; sets ``started`` at its first message."""
    req = inference_pb2.GenerateRequest(model=model, prompt="hold")
    req.sampling.max_tokens, req.sampling.ignore_eos = tokens, True
    call = inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=30)
    async for _ in call:
        started.set()
    return str(dict(await call.initial_metadata() or ()).get("meshserve-model", ""))


@pytest.mark.asyncio
async def test_canary_shadow_copy_never_reaches_the_client_and_is_recorded(rmesh: Mesh) -> None:
    router = rmesh.services["router"].address
    async with grpc.aio.insecure_channel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        async def shadows() -> int:
            s = await stub.RouteStatus(router_pb2.RouteStatusRequest(route="mirror"), timeout=5)
            rows = [t for t in s.targets if t.role == "shadow"]
            assert not any(t.errors for t in rows), rows  # every copy served by the candidate
            return sum(t.requests for t in rows)

        await eventually(lambda: served_by_route(router, "mirror"), 10, "route mirror known")
        await eventually(lambda: _at_least(shadows, 1), 10, "the probe's shadow copy recorded")
        before = await shadows()
        got = [await ask(ch, "mirror", "shadowed-user", tokens=5) for _ in range(5)]
        direct = await ask(ch, got[0][0], "shadowed-user", tokens=5)
        assert all(g == direct for g in got), (got, direct)  # the target's answer, only it
        await eventually(lambda: _at_least(shadows, before + 5), 10, "5 shadow copies recorded")
        shown = cli(rmesh, "route", "status", "mirror")
        assert shown.returncode == 0 and "shadow" in shown.stdout and "chat-small" in shown.stdout
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.RouteStatus(router_pb2.RouteStatusRequest(route="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "mirror" in (e.value.details() or "")


async def _at_least(f: object, n: int) -> bool:
    return await f() >= n  # type: ignore[operator,no-any-return]


async def small_confidence(ch: grpc.aio.Channel, prompt: str) -> tuple[float, str]:
    """chat-small's own greedy answer to ``prompt`` (10 tokens): the mean log probability of
    its first HEAD tokens, and its text."""
    req = inference_pb2.GenerateRequest(model="chat-small", prompt=prompt)
    req.sampling.max_tokens, req.sampling.ignore_eos, req.sampling.temperature = 10, True, 0.0
    req.sampling.logprobs = True
    lps, text = [], ""
    async for m in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=30):
        lps += [lp.logprob for lp in m.logprobs]
        text += m.text
    return sum(lps[:HEAD]) / HEAD, text


@pytest.mark.asyncio
async def test_cascade_escalates_exactly_when_the_threshold_says(rmesh: Mesh) -> None:
    """Forty prompts through the cascade route: each is answered by chat-small exactly when
    chat-small's own first six tokens average a log probability at or above the threshold
    (read from chat-small directly), and then with chat-small's text and no log probabilities
    (the client did not ask); else by chat-v1. Both outcomes occur."""
    router = rmesh.services["router"].address
    await eventually(lambda: served_by_route(router, "smart"), 10, "route smart known")
    async with grpc.aio.insecure_channel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)

        async def roles() -> Counter[tuple[str, str]]:
            s = await stub.RouteStatus(router_pb2.RouteStatusRequest(route="smart"), timeout=5)
            return Counter({(t.model, t.role): t.requests for t in s.targets})

        before = await roles()  # the probe above went this way once
        outcomes: Counter[str] = Counter()
        for i in range(40):
            prompt = f"question {i}"
            mean, small_text = await small_confidence(ch, prompt)
            req = inference_pb2.GenerateRequest(model="smart", prompt=prompt)
            req.sampling.max_tokens, req.sampling.ignore_eos = 10, True
            req.sampling.temperature = 0.0
            call = inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=30)
            messages = [m async for m in call]
            served = dict(await call.initial_metadata() or ()).get("meshserve-model")
            trailers = [k for k, _v in (await call.trailing_metadata() or ())]
            assert trailers.count("meshserve-failovers") == 1, trailers  # the answering model's
            expected = "chat-small" if mean >= THRESHOLD else "chat-v1"
            assert served == expected, (prompt, mean, served)
            assert sum(len(m.token_ids) for m in messages) == 10
            assert not any(m.logprobs for m in messages)
            if served == "chat-small":
                assert "".join(m.text for m in messages) == small_text
            outcomes[served] += 1
        assert outcomes["chat-small"] and outcomes["chat-v1"], outcomes
        after = await roles()
        after.subtract(before)
        assert after[("chat-small", "cascade")] == 40
        assert after[("chat-v1", "escalated")] == outcomes["chat-v1"]
