"""The OpenAI-compatible HTTP front of a real router (tenants on), driven by the official `openai`
SDK: streaming chat with usage, completions, embeddings, model listing, typed errors (400, 401,
403, 404, 429 with Retry-After), and a client that disconnects cancelling the generation."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import meshserve.v1.nodeagent_pb2_grpc as nodeagent_pb2_grpc
import openai
import pytest
from meshserve.localmesh import Mesh
from meshserve.router.tenancy.tenants import hash_key, new_key
from meshserve.v1 import nodeagent_pb2

from tests.e2e.conftest import apply, model_spec, read_spans
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
KEYS = {name: new_key() for name in ("app", "other", "limited")}


@pytest.fixture(scope="module")
def hmesh(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("openai")
    tenants = root / "tenants.yaml"
    tenants.write_text(
        "tenants:\n"
        f"  - name: app\n    keys: [{hash_key(KEYS['app'])}]\n"
        f"  - name: other\n    keys: [{hash_key(KEYS['other'])}]\n    models: [their-*]\n"
        f"  - name: limited\n    keys: [{hash_key(KEYS['limited'])}]\n"
        "    limits: {requests_per_s: 1}\n"
    )
    m = Mesh(root, lease_ttl_s=2, trace_dir=root / "traces")
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_router(extra=["--tenants", str(tenants), "--http-listen", "127.0.0.1:0"])
        asyncio.run(apply(m, model_spec("demo", demo_model, min_replicas=1)))

        def ready() -> bool:
            got = client(m, "app").models.list()
            return any(x.id == "demo" for x in got.data)

        deadline = time.monotonic() + 90
        while not ready():
            assert time.monotonic() < deadline, "demo not listed"
            time.sleep(0.2)

        async def serving() -> bool:
            try:
                client(m, "app").completions.create(model="demo", prompt="x", max_tokens=1)
                return True
            except openai.APIStatusError:
                return False

        asyncio.run(eventually(serving, 90, "demo to serve over HTTP"))
        yield m
    finally:
        m.stop()


def base_url(mesh: Mesh) -> str:
    return f"http://{mesh.services['router'].info['http']}/v1"


def client(mesh: Mesh, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(mesh), api_key=KEYS.get(tenant, tenant), max_retries=0)


def test_the_sdk_streams_a_chat_completion_with_usage(hmesh: Mesh) -> None:
    stream = client(hmesh, "app").chat.completions.create(
        model="demo",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert finish == "length" and usage is not None
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 0
    whole = client(hmesh, "app").chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 12


def test_completions_embeddings_and_models(hmesh: Mesh) -> None:
    c = client(hmesh, "app")
    # Greedy: sampled, a random model says EOS within 5 tokens about once in 100 runs
    done = c.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5  # type: ignore[union-attr]
    emb = c.embeddings.create(model="demo", input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    assert [m.id for m in c.models.list().data] == ["demo"]
    assert [m.id for m in client(hmesh, "other").models.list().data] == []


def test_errors_arrive_as_the_sdks_typed_exceptions(hmesh: Mesh) -> None:
    c = client(hmesh, "app")
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="demo", prompt="x", max_tokens=0)
    assert "max_tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo", messages=[], max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client(hmesh, "msk-wrong").completions.create(model="demo", prompt="x", max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError):
        client(hmesh, "other").completions.create(model="demo", prompt="x", max_tokens=1)
    limited = client(hmesh, "limited")
    limited.completions.create(model="demo", prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as slow:
        limited.completions.create(model="demo", prompt="x", max_tokens=1)
    assert slow.value.response.headers["retry-after"] == "1"
    assert slow.value.code == "REQUESTS_PER_S_LIMIT"


async def test_a_client_that_disconnects_cancels_the_generation(hmesh: Mesh) -> None:
    agent = nodeagent_pb2_grpc.NodeAgentStub(
        grpc.aio.insecure_channel(hmesh.services["agent-0"].address)
    )

    async def in_flight() -> int:
        got = await agent.GetNodeStatus(nodeagent_pb2.GetNodeStatusRequest(), timeout=5)
        return sum(x.in_flight for x in got.load)

    async def generated() -> int:
        got = await agent.GetNodeStatus(nodeagent_pb2.GetNodeStatusRequest(), timeout=5)
        return sum(x.generated_tokens for x in got.load)

    before = await generated()

    # Greedy and past end-of-text: left alone, it generates exactly 1900 tokens (seconds), so
    # fewer can only mean the disconnect cancelled it.
    body = json.dumps(
        {"model": "demo", "prompt": "Once upon a time", "max_tokens": 1900, "stream": True,
         "temperature": 0, "ignore_eos": True}
    ).encode()  # fmt: skip
    host, port = hmesh.services["router"].info["http"].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {KEYS['app']}\r\n".encode()
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    status = await reader.readline()
    assert b" 200 " in status, status
    while not (await asyncio.wait_for(reader.readline(), 30)).startswith(b"data: "):
        pass  # headers, then the first chunk: the agent is generating
    assert await in_flight() == 1
    writer.close()  # the client goes away mid-stream
    # Disconnected long before 1900 tokens: the agent's stream is cancelled.
    await eventually(lambda: _none(in_flight), 10, "the agent's stream to end")
    assert await generated() - before < 1900  # it ended early: cancelled, not finished
    # Its HTTP span ends as a cancel, not as a success (the stream was closed mid-way).
    trace_dir = hmesh.trace_dir
    assert trace_dir is not None

    def cancelled() -> list[dict[str, Any]]:
        return [
            s
            for s in read_spans(trace_dir)
            if s["name"] == "POST /v1/completions"
            and s["status"].get("description") == "cancelled by the client"
        ]

    [span] = await eventually(cancelled, 10, "the disconnected request's span")
    assert span["status"]["status_code"] == "ERROR"


async def test_http_requests_are_traced_and_answer_their_trace_id(hmesh: Mesh) -> None:
    """The caller's traceparent is the HTTP span's parent; router and agent spans nest under it;
    the response (success or error) carries traceresponse; OK and ERROR as the outcome was."""
    import urllib.error
    import urllib.request

    trace_dir = hmesh.trace_dir
    assert trace_dir is not None
    caller = "0af7651916cd43dd8448eb211c80319c"

    def post(body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            f"{base_url(hmesh)}/chat/completions",
            data=json.dumps(body).encode(),
            headers={
                "content-type": "application/json",
                "authorization": f"Bearer {KEYS['app']}",
                "traceparent": f"00-{caller}-b7ad6b7169203331-01",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, headers, body = post({"model": "demo", "stream": True, **chat})
    assert status == 200 and b"[DONE]" in body
    _version, trace_id, span_id, _flags = headers["traceresponse"].split("-")
    assert trace_id == caller  # the caller's trace goes on through the mesh
    status, missing, _ = post({"model": "no-such-model", **chat})
    assert status == 404 and missing["traceresponse"].split("-")[1] == caller

    def spans() -> dict[str, list[dict[str, Any]]] | None:
        mine = [s for s in read_spans(trace_dir) if s["context"]["trace_id"] == "0x" + caller]
        http = [s for s in mine if s["name"] == "POST /v1/chat/completions"]
        by_id = {s["context"]["span_id"]: s for s in mine}
        agent = [
            s
            for s in mine
            if s["name"] == "meshserve.v1.Inference/Generate" and s["parent_id"] in by_id
        ]
        return {"http": http, "agent": agent, "all": mine} if len(http) == 2 and agent else None

    found = await eventually(spans, 15, "the HTTP requests' spans")
    ok = next(s for s in found["http"] if "0x" + span_id == s["context"]["span_id"])
    failed = next(s for s in found["http"] if s is not ok)
    assert ok["kind"] == "SpanKind.SERVER" and ok["parent_id"] == "0xb7ad6b7169203331"
    assert ok["status"]["status_code"] == "OK"
    assert ok["attributes"]["gen_ai.usage.output_tokens"] == 4
    assert failed["status"]["status_code"] == "ERROR"
    assert failed["status"]["description"].startswith("NOT_FOUND")
    names = {s["name"] for s in found["all"]}
    assert {"router.pick", "router.attempt", "engine.generate"} <= names


async def _none(in_flight: object) -> bool:
    return await in_flight() == 0  # type: ignore[operator, no-any-return]


def test_hostile_bodies_get_clear_statuses(hmesh: Mesh) -> None:

    def post(body: bytes) -> tuple[int, dict[str, Any]]:
        return post_bytes(hmesh, "/completions", body)

    status, body = post(b"garbage{")
    assert status == 400 and "not valid JSON" in str(body["error"])
    status, body = post(b'{"model": 5, "prompt": "x"}')
    assert status == 400 and "model" in str(body["error"])
    # 17 MiB announced: answered 413 at once, before the body is sent (it is never read).
    host, port = hmesh.services["router"].info["http"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {17 << 20}\r\n\r\n".encode()
        )
        answer = b""
        while b"BODY_TOO_LARGE" not in answer and (part := s.recv(4096)):
            answer += part  # headers and body may come in separate packets
    assert answer.startswith(b"HTTP/1.1 413") and b"BODY_TOO_LARGE" in answer, answer


def post_json(hmesh: Mesh, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return post_bytes(hmesh, path, json.dumps(body).encode())


def post_bytes(hmesh: Mesh, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) of a POST to the OpenAI front as tenant `app`."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{base_url(hmesh)}{path}",
        data=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {KEYS['app']}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(hmesh: Mesh, path: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    url = f"http://{hmesh.services['router'].info['http']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_ping_answer_as_load_generators_expect(hmesh: Mesh) -> None:
    """guidellm (and other tools) call GET /health before any load; /ping is liveness."""
    status, body = get(hmesh, "/health")
    assert status == 200 and body["status"] == "ok", body
    assert body["models"] >= 1 and body["ready_replicas"] >= 1
    assert get(hmesh, "/ping") == (200, {"status": "alive"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("n", 2),
        ("logit_bias", {"5": 10}),
        ("frequency_penalty", 0.5),
        ("no_such_field", 1),
    ],
)
def test_parameters_the_front_does_not_implement_are_refused_by_name(
    hmesh: Mesh, field: str, value: object
) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, answer = post_json(hmesh, "/chat/completions", {**body, field: value})
    assert status == 400, answer
    error = answer["error"]
    assert error["message"] == f"unsupported parameter '{field}'", error
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:  # the SDK raises it, naming the field
        client(hmesh, "app").chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            extra_body={field: value},
        )  # fmt: skip
    assert field in e.value.message


def test_neutral_values_of_unimplemented_parameters_are_accepted(hmesh: Mesh) -> None:
    """What real clients send by default changes nothing, so it is not refused."""
    neutral = {
        "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
        "response_format": {"type": "text"}, "user": "u-1", "metadata": {"team": "a"},
        "store": False, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True, "max_completion_tokens": 3, "stop": None, "stream": True,
        "seed": None, "logprobs": None, "top_logprobs": None, "temperature": None,
    }  # fmt: skip
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], **neutral}
    events = sse(hmesh, "/v1/chat/completions", body)
    assert events[-1]["usage"]["completion_tokens"] == 3


def sse(hmesh: Mesh, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of a streamed answer (without [DONE]), read over a raw connection."""
    import http.client

    host, port = hmesh.services["router"].info["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(
        "POST", path, json.dumps(body),
        {"content-type": "application/json", "authorization": f"Bearer {KEYS['app']}"},
    )  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200, response.read()
    lines = response.read().decode().splitlines()
    conn.close()
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_one_token_per_sse_chunk_unless_coalescing_is_asked(hmesh: Mesh) -> None:
    body = {"model": "demo", "prompt": "Once upon", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse(hmesh, "/v1/completions", body)
    tokens = events[-1]["usage"]["completion_tokens"]
    assert tokens == 40  # ignore_eos: no early end
    content = [e for e in events if e["choices"]]
    assert len(content) == tokens  # clients count chunks as tokens
    packed = sse(hmesh, "/v1/completions", {**body, "stream_interval_tokens": 8})
    text = "".join(e["choices"][0]["text"] for e in content)
    assert "".join(e["choices"][0]["text"] for e in packed if e["choices"]) == text
    assert len([e for e in packed if e["choices"]]) < tokens / 3


def test_logprobs_come_back_in_each_apis_shape(hmesh: Mesh, demo_model: Path) -> None:
    """Greedy decoding: each sampled token is the most likely one, so it heads its top list
    with the same logprob; the first position's logprobs equal the model's own, computed here
    with transformers on the same weights."""
    c = client(hmesh, "app")
    chat = c.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert [t.logprob for t in lp.top_logprobs] == sorted(
            (t.logprob for t in lp.top_logprobs), reverse=True
        )
        assert lp.top_logprobs[0].token == lp.token
        assert lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        assert lp.bytes == list(lp.token.encode())
    prompt = "Once upon a time"
    done = c.completions.create(
        model="demo", prompt=prompt, max_tokens=4, temperature=0, logprobs=2
    )
    legacy = done.choices[0].logprobs
    assert legacy is not None and legacy.tokens is not None and len(legacy.tokens) == 4
    assert legacy.text_offset == sorted(legacy.text_offset or [])
    first_top = (legacy.top_logprobs or [{}])[0]
    assert 1 <= len(first_top) <= 2

    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    best = int(expected.argmax())
    assert legacy.tokens[0] == tok.decode([best])
    assert (legacy.token_logprobs or [0.0])[0] == pytest.approx(float(expected[best]), abs=1e-4)
    # streamed: each chunk carries its token's logprobs
    events = sse(hmesh, "/v1/chat/completions", {
        "model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "temperature": 0, "logprobs": True, "stream": True,
    })  # fmt: skip
    assert [len(e["choices"][0]["logprobs"]["content"]) for e in events] == [1] * 5
    bad, answer = post_json(hmesh, "/chat/completions", {
        "model": "demo", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2,
    })  # fmt: skip
    assert bad == 400 and "top_logprobs" in answer["error"]["message"]


def test_embeddings_in_base64_as_the_sdk_asks_by_default(hmesh: Mesh) -> None:
    import base64
    import struct

    status, floats = post_json(hmesh, "/embeddings", {"model": "demo", "input": "one"})
    assert status == 200
    status, packed = post_json(
        hmesh, "/embeddings", {"model": "demo", "input": "one", "encoding_format": "base64"}
    )
    assert status == 200
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)
    sdk = client(hmesh, "app").embeddings.create(model="demo", input="one")  # base64 underneath
    assert sdk.data[0].embedding == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)
