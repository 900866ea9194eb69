"""A replica's adapter set (nodeagent.adapters) over the real torch engine with the demo model:
loads competing for the last slot all complete (each load's waiters take it before another load
may evict it), an adapter re-applied with other weights is loaded again under a new engine key,
and a closed set (a tier change coming) refuses new loads with UNAVAILABLE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from meshserve.nodeagent.adapters import Adapters
from meshserve.nodeagent.engines.base import EngineConfig
from meshserve.nodeagent.engines.torch_engine import TorchEngine
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2 as S


@pytest.fixture
async def engine(demo_model: Path) -> AsyncIterator[TorchEngine]:
    e = TorchEngine(EngineConfig(device="cpu", threads=1))
    await e.load(S.ModelSpec(name="base", source=str(demo_model), max_adapters=1))
    yield e
    await e.unload()


@pytest.fixture(scope="module")
def adapter_dirs(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from meshserve.demo_model import build_demo_adapter

    root = tmp_path_factory.mktemp("set")
    return [build_demo_adapter(demo_model, root / f"a{i}", seed=i + 1) for i in range(2)]


def _set(engine: TorchEngine, published: list[list[str]]) -> Adapters:
    async def files(spec: S.ModelSpec) -> Path:
        return Path(spec.source)

    base = S.ModelSpec(name="base", max_adapters=1)
    return Adapters(base, engine, files, published.append)


async def test_adapter_loads_competing_for_the_last_slot_all_complete(
    engine: TorchEngine, adapter_dirs: list[Path]
) -> None:
    published: list[list[str]] = []
    adapters = _set(engine, published)
    specs = [
        S.ModelSpec(name=f"x{i}", base="base", source=str(d)) for i, d in enumerate(adapter_dirs)
    ]

    async def one(spec: S.ModelSpec) -> str:
        key = await adapters.acquire(spec, timeout=10)
        await asyncio.sleep(0)
        adapters.release(spec.name)
        return key

    timed = _load_timings()
    keys = await asyncio.gather(*(one(specs[i % 2]) for i in range(8)))
    assert all(k.startswith(("x0#", "x1#")) for k in keys)
    assert adapters.loads <= 4, f"{adapters.loads} loads for 8 requests: loads evicting each other"
    assert published and len(published[-1]) == 1
    # Each load timed in meshserve_adapter_load_seconds{model=base} (what a request waits).
    count, total = (a - b for a, b in zip(_load_timings(), timed, strict=True))
    assert count == adapters.loads and 0 < total < 10 * adapters.loads


def _load_timings() -> tuple[float, float]:
    """meshserve_adapter_load_seconds of the base "base": (count, sum) so far in this process."""
    from prometheus_client import REGISTRY

    def get(suffix: str) -> float:
        name = f"meshserve_adapter_load_seconds_{suffix}"
        return REGISTRY.get_sample_value(name, {"model": "base"}) or 0.0

    return get("count"), get("sum")


async def test_adapter_reapplied_gets_a_new_engine_key_and_a_closed_set_refuses(
    engine: TorchEngine, adapter_dirs: list[Path]
) -> None:
    adapters = _set(engine, [])
    old = S.ModelSpec(name="x", base="base", source=str(adapter_dirs[0]))
    key = await adapters.acquire(old)
    adapters.release("x")
    new = S.ModelSpec(name="x", base="base", source=str(adapter_dirs[1]))
    again = await adapters.acquire(new)
    adapters.release("x")
    assert again != key and adapters.evictions == 1 and adapters.names() == ["x"]
    adapters.close("is changing tier")
    with pytest.raises(ServiceError) as err:
        await adapters.acquire(S.ModelSpec(name="y", base="base", source=str(adapter_dirs[0])))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    await adapters.clear()
    assert adapters.names() == []
