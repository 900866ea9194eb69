"""LoRA adapters as models (ModelSpec.base) through a real mesh: etcd, a scheduler, an agent
serving the demo model with the torch engine (peft), a router. Adapters have no replicas of
their own: a request naming one loads it into a replica of its base on demand; each adapter's
answer equals the adapter applied offline with peft (never the base's, never another
adapter's); past the base's ``max_adapters`` the least recently used one is evicted, and a
burst over more adapters than slots is served whole, exactly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import cluster_pb2, inference_pb2, inference_pb2_grpc

from tests.e2e.conftest import apply, generate, model_spec, ready_replicas, replica_records
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
PROMPT = "Once upon a time"
TOKENS = 12
ADAPTERS = ("tone-a", "tone-b", "tone-c")


@pytest.fixture(scope="module")
def adapter_dirs(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from meshserve.demo_model import build_demo_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_demo_adapter(demo_model, root / name, seed=i + 1)
        for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def offline(demo_model: Path, adapter_dirs: dict[str, Path]) -> dict[str, list[int]]:
    """Greedy tokens of the base and of each adapter applied with peft in this process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = list(tok(PROMPT, add_special_tokens=True)["input_ids"])

    def greedy(model: object) -> list[int]:
        x, out = torch.tensor([ids]), []
        with torch.inference_mode():
            for _ in range(TOKENS):
                t = int(model(input_ids=x).logits[0, -1].argmax())  # type: ignore[operator]
                out.append(t)
                x = torch.cat([x, torch.tensor([[t]])], 1)
        return out

    out = {"adapted-base": greedy(AutoModelForCausalLM.from_pretrained(demo_model))}
    for name, path in adapter_dirs.items():
        base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
        out[name] = greedy(PeftModel.from_pretrained(base, str(path)).eval())
    return out


@pytest.fixture(scope="module")
def amesh(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path, adapter_dirs: dict[str, Path]
) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("amesh")
    m = Mesh(root, lease_ttl_s=2)
    try:
        m.start_etcd()
        m.start_scheduler()
        m.start_agent("agent-0")
        m.start_router()
        base = model_spec("adapted-base", demo_model, min_replicas=1, max_adapters=2)
        asyncio.run(apply(m, base))
        for name, path in adapter_dirs.items():
            doc = {"name": name, "kind": "adapter", "base": "adapted-base", "source": str(path)}
            asyncio.run(apply(m, spec_from_dict(doc)))
        router = m.services["router"].address
        asyncio.run(eventually(lambda: ready_replicas(router, "adapted-base"), 90, "base READY"))
        yield m
    finally:
        m.stop()


def _request(model: str) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt=PROMPT)
    r.sampling.max_tokens = TOKENS
    r.sampling.temperature = 0.0
    r.sampling.ignore_eos = True
    return r


async def _loaded(mesh: Mesh) -> list[str]:
    for r in await replica_records(mesh):
        if r.model == "adapted-base":
            return list(r.adapters)
    return []


async def test_adapter_outputs_equal_peft_offline_and_load_on_demand(
    amesh: Mesh, offline: dict[str, list[int]]
) -> None:
    router = amesh.services["router"].address
    assert await _loaded(amesh) == []  # nothing loaded until asked
    for name in ("adapted-base", "tone-a", "tone-b"):
        got = await generate(router, _request(name))
        assert got.token_ids == offline[name], name
    # Each its own: no adapter answers as the base or as the other one.
    assert len({tuple(offline[n]) for n in ("adapted-base", "tone-a", "tone-b")}) == 3
    await eventually(lambda: _has(amesh, {"tone-a", "tone-b"}), 10, "both in ReplicaStatus")
    # The base again, after adapters ran beside it: still the base's answer.
    assert (await generate(router, _request("adapted-base"))).token_ids == offline["adapted-base"]


async def _has(mesh: Mesh, names: set[str]) -> bool:
    return set(await _loaded(mesh)) == names


async def test_adapter_eviction_under_max_adapters_and_a_burst_over_the_slots(
    amesh: Mesh, offline: dict[str, list[int]]
) -> None:
    router = amesh.services["router"].address
    for name in ("tone-a", "tone-b"):
        await generate(router, _request(name))
    await generate(router, _request("tone-a"))  # tone-b is now the least recently used
    got = await generate(router, _request("tone-c"))
    assert got.token_ids == offline["tone-c"]
    await eventually(lambda: _has(amesh, {"tone-a", "tone-c"}), 10, "tone-b evicted (LRU)")
    # Three adapters, two slots, and the base, twelve streams at once: each adapter waits for a
    # slot, none fails, and every answer is its own model's.
    names = [n for n in ("adapted-base", *ADAPTERS) for _ in range(3)]
    results = await asyncio.gather(*(generate(router, _request(n), timeout=90) for n in names))
    for name, got in zip(names, results, strict=True):
        assert got.token_ids == offline[name], name


async def test_adapter_loads_competing_for_one_slot_all_complete(
    amesh: Mesh, demo_model: Path, adapter_dirs: dict[str, Path], offline: dict[str, list[int]]
) -> None:
    """One slot, two adapters asked at once through the router, again and again: all answered,
    each by its own adapter (the livelock of loads evicting each other is reproduced
    deterministically in tests/integration/test_adapter_set.py)."""
    router = amesh.services["router"].address
    await apply(amesh, model_spec("one-slot", demo_model, min_replicas=1, max_adapters=1))
    for name in ("tone-a", "tone-b"):
        doc = {"name": f"one-{name}", "kind": "adapter", "base": "one-slot",
               "source": str(adapter_dirs[name])}  # fmt: skip
        await apply(amesh, spec_from_dict(doc))
    await eventually(lambda: ready_replicas(router, "one-slot"), 90, "one-slot READY")
    names = ["one-tone-a", "one-tone-b"] * 4
    results = await asyncio.gather(*(generate(router, _request(n), timeout=60) for n in names))
    for name, got in zip(names, results, strict=True):
        assert got.token_ids == offline[name.removeprefix("one-")], name


async def test_adapter_reapplied_with_other_weights_serves_the_new_ones(
    amesh: Mesh, adapter_dirs: dict[str, Path], offline: dict[str, list[int]]
) -> None:
    router = amesh.services["router"].address
    doc = {"name": "moving", "kind": "adapter", "base": "adapted-base"}
    await apply(amesh, spec_from_dict({**doc, "source": str(adapter_dirs["tone-a"])}))
    assert (await generate(router, _request("moving"))).token_ids == offline["tone-a"]
    await apply(amesh, spec_from_dict({**doc, "source": str(adapter_dirs["tone-b"])}))

    async def new_weights() -> bool:  # once the agent's watch has the new spec
        return (await generate(router, _request("moving"))).token_ids == offline["tone-b"]

    await eventually(new_weights, 10, "the re-applied adapter's new weights")


async def test_adapter_refusals_are_clear(amesh: Mesh, demo_model: Path, tmp_path: Path) -> None:
    router = amesh.services["router"].address
    async with grpc.aio.insecure_channel(router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Embed(inference_pb2.EmbedRequest(model="tone-a", inputs=["hi"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "adapter" in (err.value.details() or ""), err.value.details()
    # An adapter whose base serves none: said so, not the base's answer.
    await apply(amesh, model_spec("plain-base", demo_model, min_replicas=1))
    from meshserve.demo_model import build_demo_adapter

    lone = build_demo_adapter(demo_model, tmp_path / "lone", seed=9)
    doc = tmp_path / "lone.yaml"
    doc.write_text(f"name: lone\nkind: adapter\nbase: plain-base\nsource: {lone}\n")
    applied = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshserve", "model", "apply", str(doc), "--etcd",
         amesh.etcd.endpoint],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert "adapter of plain-base" in applied.stdout and "max_adapters 0" in applied.stdout
    # An adapter whose weights file is garbage: refused with the reason, the base serves on.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    await apply(amesh, spec_from_dict(
        {"name": "broken", "kind": "adapter", "base": "adapted-base", "source": str(broken)}
    ))  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(router, _request("broken"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert "could not be loaded" in (err.value.details() or ""), err.value.details()
    assert (await generate(router, _request("adapted-base"))).final is not None
    await eventually(lambda: ready_replicas(router, "plain-base"), 90, "plain base READY")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(router, _request("lone"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert "max_adapters" in (err.value.details() or ""), err.value.details()


def test_adapter_spec_fields() -> None:
    with pytest.raises(ValueError, match="base"):
        spec_from_dict({"name": "x", "kind": "adapter", "source": "/nowhere"})
    with pytest.raises(ValueError, match="min_replicas"):
        spec_from_dict(
            {"name": "x", "kind": "adapter", "base": "b", "source": "/x", "min_replicas": 1}
        )
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        spec_from_dict({"name": "x", "kind": "adapter", "base": "b", "source": "/nowhere"})
    assert cluster_pb2.ModelSpec(base="b").base == "b"
