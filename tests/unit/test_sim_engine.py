"""The simulated engine (`engine: sim`): the Engine contract without weights — streaming,
determinism and failover resume, the device model (steps, shared tokens/s, KV cache, batch),
stop strings, cancellation, failure hooks, tiers, unload, embeddings, and its arguments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from meshserve.modelspec import spec_from_dict
from meshserve.nodeagent.engines import make_engine
from meshserve.nodeagent.engines.base import Chunk, EngineConfig, Resume
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.sim_engine import SimEngine
from meshserve.nodeagent.engines.sim_settings import SimSettings
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2, inference_pb2

S = cluster_pb2


def params(max_tokens: int = 8, **kw: object) -> GenerationParams:
    return replace(GenerationParams(max_tokens, 0.0, 1.0, 0, None, (), False), **kw)  # type: ignore[arg-type]


async def loaded(**args: str) -> SimEngine:
    spec = spec_from_dict(
        {"name": "sim", "source": "sim://tiny", "engine": "sim", "memory": "2GiB",
         "kv_headroom": "1GiB", "engine_args": {"ttft_ms": "1", "itl_ms": "1", **args}}
    )  # fmt: skip
    engine = make_engine(spec, EngineConfig())
    assert isinstance(engine, SimEngine)
    await engine.load(spec)
    return engine


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in chunks]


async def test_streams_tokens_with_usage_and_is_deterministic() -> None:
    e = await loaded()
    a = await collect(e.generate("Once upon a time", [], params(8)))
    b = await collect(e.generate("Once upon a time", [], params(8)))
    other = await collect(e.generate("Something else", [], params(8)))
    assert len(a) == 8 and all(len(c.token_ids) == 1 for c in a)
    assert a[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert not any(c.finish_reason for c in a[:-1])
    # The sim engine counts a token per 4 bytes of prompt: "Once upon a time" is 16 bytes.
    assert a[-1].output_tokens == 8 and a[-1].input_tokens == 4
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # greedy: same prompt, same text
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    seeded = [
        await collect(e.generate("x", [], params(6, temperature=1.0, seed=s))) for s in (1, 1, 2)
    ]
    ids = [[c.token_ids for c in run] for run in seeded]
    assert ids[0] == ids[1] != ids[2]
    assert e.stats().generated_tokens == 8 * 3 + 6 * 3
    await e.unload()


async def test_resume_continues_the_same_generation() -> None:
    e = await loaded()
    whole = await collect(e.generate("Resume me", [], params(10)))
    head = whole[:4]
    rest = await collect(
        e.generate(
            "Resume me",
            [],
            params(10),
            Resume(tuple(t for c in head for t in c.token_ids), "".join(c.text for c in head)),
        )
    )
    assert [c.token_ids for c in rest] == [c.token_ids for c in whole[4:]]
    assert rest[-1].output_tokens == 10
    await e.unload()


async def test_steps_follow_itl_and_the_shared_device_rate() -> None:
    e = await loaded(itl_ms="5", ttft_ms="0")
    t0 = time.monotonic()
    await collect(e.generate("p", [], params(10)))
    assert time.monotonic() - t0 >= 10 * 0.005 * 0.9  # one step per token, each >= itl
    await e.unload()
    e = await loaded(itl_ms="1", ttft_ms="0", device_tokens_per_s="200")
    t0 = time.monotonic()
    await asyncio.gather(*(collect(e.generate(f"p{i}", [], params(10))) for i in range(4)))
    # 40 tokens at 200 tokens/s across the device: at least 0.2 s, whatever the itl
    assert time.monotonic() - t0 >= 0.18
    await e.unload()


async def test_kv_cache_and_batch_limits_queue_streams() -> None:
    e = await loaded(kv_tokens="40", itl_ms="20")
    first = asyncio.create_task(collect(e.generate("aaaa bbbb", [], params(30))))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(collect(e.generate("cccc dddd", [], params(30))))
    await asyncio.sleep(0.05)
    st = e.stats()
    assert (st.running, st.waiting) == (1, 1)  # 2 + 30 tokens reserved of 40: no room for more
    assert 0.7 < st.kv_cache_usage <= 1.0
    await asyncio.gather(first, second)
    assert e.stats().running == 0 and e.stats().kv_cache_usage == 0
    await e.unload()
    e = await loaded(max_batch="2", itl_ms="20")
    tasks = [asyncio.create_task(collect(e.generate(f"s{i}", [], params(5)))) for i in range(5)]
    await asyncio.sleep(0.05)
    assert (e.stats().running, e.stats().waiting) == (2, 3)
    await asyncio.gather(*tasks)
    await e.unload()


async def test_stop_strings_cut_the_text() -> None:
    e = await loaded()
    free = await collect(e.generate("stop test", [], params(12)))
    text = "".join(c.text for c in free)
    stop = text.split()[3]
    cut = await collect(e.generate("stop test", [], params(12, stop=(stop,))))
    got = "".join(c.text for c in cut)
    assert cut[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
    assert stop not in got and text.startswith(got)
    await e.unload()


async def test_cancel_frees_the_slot_and_oom_hook_fails_the_stream() -> None:
    e = await loaded(itl_ms="5")
    gen = e.generate("long", [], params(1000))
    await gen.__anext__()
    await gen.aclose()  # type: ignore[attr-defined]  # the client went away
    await asyncio.sleep(0.03)
    assert e.stats().running == 0 and e.in_flight == 0
    await e.unload()
    e = await loaded(inject_oom_every="3")
    with pytest.raises(ServiceError) as err:
        await collect(e.generate("oom", [], params(10)))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.stats().out_of_memory == 1
    await e.unload()


async def test_a_crashed_engine_fails_its_streams_and_says_it_is_dead() -> None:
    e = await loaded(inject_crash_at_step="5")
    assert e.health() == ""
    runs = await asyncio.gather(
        *(collect(e.generate(p, [], params(100))) for p in ("a", "b")), return_exceptions=True
    )
    for r in runs:  # both in flight when it died: UNAVAILABLE at once, not a hang
        assert isinstance(r, ServiceError) and r.code == grpc.StatusCode.UNAVAILABLE, r
        assert r.reason == "ENGINE_DIED"
    assert "injected crash at step 5" in e.health()
    with pytest.raises(ServiceError, match="engine died"):
        await collect(e.generate("later", [], params(2)))
    await e.unload()


async def test_tiers_memory_and_unload() -> None:
    e = await loaded(host_gbps="1000", disk_gbps="1000")
    device = e.memory_bytes()
    assert device == 3 * 2**30 and e.tier == S.TIER_DEVICE
    await e.offload(S.TIER_HOST)
    assert (e.memory_bytes(), e.host_bytes(), e.tier) == (0, device, S.TIER_HOST)
    with pytest.raises(ServiceError) as err:
        await collect(e.generate("x", [], params(2)))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    await e.offload(S.TIER_DISK)
    assert (e.host_bytes(), e.disk_bytes()) == (0, device)
    await e.restore()
    assert e.memory_bytes() == device and len(await collect(e.generate("x", [], params(2)))) == 2
    slow = await loaded(itl_ms="50")
    waiting = asyncio.create_task(collect(slow.generate("x", [], params(100))))
    await asyncio.sleep(0.02)
    await slow.unload()
    with pytest.raises(ServiceError) as err:
        await waiting
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    await e.unload()


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    e = await loaded()
    a, b, c = await e.embed(["one", "two", "one"])
    assert a == c and a != b and abs(sum(x * x for x in a) - 1) < 1e-9
    await e.unload()


async def test_failure_hooks_and_bad_arguments() -> None:
    with pytest.raises(RuntimeError, match="simulated load failure"):
        await loaded(fail_load="true")
    with pytest.raises(ValueError, match="itl_ms"):
        SimSettings.from_args({"itl_ms": "0"})
    with pytest.raises(ValueError, match="kv_tokens must be a number"):
        SimSettings.from_args({"kv_tokens": "lots"})
    e = await loaded()
    with pytest.raises(ServiceError) as err:  # past the context
        await collect(e.generate("x" * 20000, [], params(10)))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await e.unload()


def test_a_sim_spec_keeps_its_source_label() -> None:
    spec = spec_from_dict(
        {"name": "m", "source": "sim://llama-70b", "engine": "sim", "memory": "140GB"}
    )
    assert spec.engine == S.ENGINE_KIND_SIM and spec.source == "sim://llama-70b"
