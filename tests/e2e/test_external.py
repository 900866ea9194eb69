"""External OpenAI-compatible backends (`engine: external`) through a real mesh: vLLM's own
OpenAI server (the CPU build in .venv-vllm, started here with an API key) serves the tiny model
behind the name `hosted`; the router streams a completion through it with the same text as
vLLM gives directly, usage counted for the tenant, the key taken from the router's environment;
a bad key is PERMISSION_DENIED; and once the server is killed, a route whose target it is
hands its requests to the next hop before the first token."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import grpc
import psutil
import pytest
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

from tests.e2e.conftest import apply, free_port, model_spec, ready_replicas
from tests.e2e.test_routes import cli
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
KEY_ENV, KEY = "MESHSERVE_TEST_EXTERNAL_KEY", "sk-external-test"
ROUTE = """
name: overflow
targets: {hosted: 1}
fallbacks: [local]
"""


@pytest.fixture(scope="module")
def xmesh(
    tmp_path_factory: pytest.TempPathFactory, vllm_python: str
) -> Iterator[tuple[Mesh, int, subprocess.Popen[bytes]]]:
    from meshserve.demo_model import build_demo_model

    root = tmp_path_factory.mktemp("external")
    model = build_demo_model(root / "model")
    port = free_port()
    log = (root / "vllm-server.log").open("wb")
    server = subprocess.Popen(
        [
            vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--api-key",
            KEY,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    os.environ[KEY_ENV] = KEY  # the router's environment (a Secret mounted as a variable)
    mesh = Mesh(root / "mesh", lease_ttl_s=5)
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        mesh.start_agent("fleet", device="cpu", extra=["--simulate", "1", "--memory-limit", "4GiB"])
        router = mesh.start_router()

        async def setup() -> None:
            await apply(
                mesh,
                model_spec(
                    "local",
                    "sim://local",
                    engine="sim",
                    memory="64MiB",
                    min_replicas=1,
                    engine_args={"ttft_ms": "1", "itl_ms": "1"},
                ),
            )
            for name, env in (("hosted", KEY_ENV), ("hosted-badkey", "PATH")):
                await apply(
                    mesh,
                    spec_from_dict(
                        {
                            "name": name,
                            "engine": "external",
                            "url": f"http://127.0.0.1:{port}/v1",
                            "api_key_env": env,
                            "served_model": "tiny",
                        }
                    ),
                )
            await eventually(lambda: ready_replicas(router.address, "local"), 60, "local READY")

        asyncio.run(setup())
        asyncio.run(eventually(lambda: _health(port, server), 300, "vLLM's OpenAI server up"))
        (root / "route.yaml").write_text(ROUTE)
        assert cli(mesh, "route", "apply", str(root / "route.yaml")).returncode == 0
        yield mesh, port, server
    finally:
        os.environ.pop(KEY_ENV, None)
        server.kill()
        server.wait(30)
        log.close()
        mesh.stop()


async def _health(port: int, server: subprocess.Popen[bytes]) -> bool:
    import urllib.request

    assert server.poll() is None, "vLLM's server exited"
    try:
        with await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{port}/health", timeout=2
        ) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _request(model: str) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=model, prompt="Once upon a time")
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = 12, 0.0, True
    return req


async def _direct(port: int) -> str:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    got = await client.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    await client.close()
    return str(got.choices[0].text)


@pytest.mark.asyncio
async def test_external_backend_streams_through_the_router_with_usage(
    xmesh: tuple[Mesh, int, subprocess.Popen[bytes]],
) -> None:
    mesh, port, _server = xmesh
    router = mesh.services["router"].address
    async with grpc.aio.insecure_channel(router) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(_request("hosted"), timeout=60)
        messages = [m async for m in call]
        text = "".join(m.text for m in messages)
        assert (
            len(messages) > 1 and messages[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        )
        assert messages[-1].usage.output_tokens == 12
        assert text == await _direct(port)  # greedy, float32: vLLM's own answer
        usage = await router_pb2_grpc.RouterStub(ch).Usage(router_pb2.UsageRequest(), timeout=5)
        rows = {r.model: r for r in usage.rows}
        assert rows["hosted"].requests >= 1 and rows["hosted"].output_tokens >= 12
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the key in $PATH is not the server's
            await (
                inference_pb2_grpc.InferenceStub(ch)
                .Generate(_request("hosted-badkey"), timeout=30)
                .read()
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "401" in (
            e.value.details() or ""
        )


@pytest.mark.asyncio
async def test_external_backend_killed_fails_over_to_the_next_hop_before_the_first_token(
    xmesh: tuple[Mesh, int, subprocess.Popen[bytes]],
) -> None:
    mesh, _port, server = xmesh
    router = mesh.services["router"].address
    async with grpc.aio.insecure_channel(router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        call = stub.Generate(_request("overflow"), timeout=60)
        assert [m async for m in call]
        assert dict(await call.initial_metadata() or ()).get("meshserve-model") == "hosted"
        engine = psutil.Process(server.pid).children(recursive=True)  # vLLM's engine core …
        assert engine
        server.kill()
        server.wait(30)
        # … goes with it (our vLLM plugin: a spawned vLLM process dies with its parent)
        await eventually(lambda: not any(map(_alive, engine)), 20, "vLLM's engine core gone")
        call = stub.Generate(_request("overflow"), timeout=60)
        messages = [m async for m in call]
        assert (
            messages[-1].finish_reason
            and dict(await call.initial_metadata() or ()).get("meshserve-model") == "local"
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the model itself: UNAVAILABLE, saying why
            await stub.Generate(_request("hosted"), timeout=30).read()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "hosted" in (
            e.value.details() or ""
        )
        usage = await router_pb2_grpc.RouterStub(ch).Usage(router_pb2.UsageRequest(), timeout=5)
        assert {r.model: r for r in usage.rows}["local"].fallbacks >= 1


def _alive(p: psutil.Process) -> bool:
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
