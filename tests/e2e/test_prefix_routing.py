"""Prefix-cache-aware routing against a real mesh (issue 24): etcd, a scheduler, two simulated
nodes (`meshserve agent --simulate 2`, the sim engine with its prefix cache and KV events) and a
router. Requests that share a long prefix go to the replica that cached it, known from the
agents' block events (the router's own sends expire first); prompts that share nothing spread;
another tenant's salt shares nothing; a saturated replica passes the overflow on; the router
exports how far its TTFT predictions were off; and agents that restart lose their blocks in the
router's index, which learns again from the new replicas' events."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.router.routing.prefix import PENDING_TTL_S
from meshserve.v1 import inference_pb2, router_pb2, router_pb2_grpc

from tests.e2e.conftest import apply, free_port, generate, ready_replicas
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
MODEL = "p-sim"
SYSTEM = "You are the mesh's assistant: answer briefly, and say which node you ran on. " * 12
SLOTS = 3  # --max-in-flight of each simulated node


async def ask(address: str, prompt: str, salt: str = "", tokens: int = 2) -> str:
    """The node that served ``prompt``."""
    req = inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, cache_salt=salt)
    req.sampling.max_tokens, req.sampling.temperature = tokens, 0.0
    req.sampling.ignore_eos = True
    got = await generate(address, req, timeout=60)
    return got.headers["meshserve-node"]


async def last_decision(address: str) -> router_pb2.RouteDecision:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await router_pb2_grpc.RouterStub(ch).ExplainRoute(
            router_pb2.ExplainRouteRequest(model=MODEL, limit=1), timeout=5
        )
    d: router_pb2.RouteDecision = reply.decisions[-1]
    return d


def test_shared_prefixes_go_where_they_are_cached(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "mesh", lease_ttl_s=3)
    metrics_port = free_port()
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        fleet_flags = ["--simulate", "2", "--memory-limit", "4GiB", "--max-in-flight", str(SLOTS)]
        mesh.start_agent("fleet", device="cpu", extra=fleet_flags)
        router = mesh.start_router(extra=["--metrics-port", str(metrics_port)])
        spec = spec_from_dict(
            {"name": MODEL, "source": "sim://p", "engine": "sim", "memory": "256MiB",
             "min_replicas": 2, "max_model_len": 4096,
             "engine_args": {"ttft_ms": "2", "itl_ms": "20", "prefill_ms_per_token": "0.5",
                             "block_tokens": "16"}}
        )  # fmt: skip

        async def two_ready() -> bool:
            return await ready_replicas(router.address, MODEL) >= 2

        async def scenario() -> None:
            await apply(mesh, spec)
            await eventually(two_ready, 60, "2 READY replicas", 0.2)
            home = await ask(router.address, SYSTEM + "Question 0?")
            # The router's own record of that send expires: from here on only the agent's
            # block events can say where the prefix is cached.
            await asyncio.sleep(PENDING_TTL_S + 0.5)
            nodes = [await ask(router.address, SYSTEM + f"Question {i}?") for i in range(1, 7)]
            assert nodes == [home] * 6
            d = await last_decision(router.address)
            scores = {c.node_id: c.scores for c in d.candidates}
            assert d.chosen_node == home
            assert (
                scores[home]["ttft"] == 1.0 > max(s["ttft"] for n, s in scores.items() if n != home)
            )

            # Prompts that share nothing spread over both replicas.
            spread = Counter(
                [await ask(router.address, f"{i} " * 400 + "unrelated") for i in range(6)]
            )
            assert len(spread) == 2, spread

            # Another salt: the same text is another prefix, cached nowhere (the router counts
            # no cached token for it, and scores both replicas alike).
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            cached = _metric(await asyncio.to_thread(_read, url), "cached_prompt_tokens_total")
            await ask(router.address, SYSTEM + "Question 1?", salt="tenant-b")
            d = await last_decision(router.address)
            assert len({round(c.scores["ttft"], 6) for c in d.candidates}) == 1, d
            assert (
                _metric(await asyncio.to_thread(_read, url), "cached_prompt_tokens_total") == cached
            )

            # A burst one larger than the cached replica's slots: it takes all it can, the
            # other replica takes the one left (a load balancer would split it 2:2).
            burst = await asyncio.gather(
                *(ask(router.address, SYSTEM + f"Burst {i}?", tokens=40) for i in range(SLOTS + 1))
            )
            assert Counter(burst) == {home: SLOTS, next(n for n in spread if n != home): 1}

            text = await asyncio.to_thread(_read, url)
            # one observed prediction per request sent (1 + 6 + 6 + 1 + the burst)
            assert _metric(text, "ttft_prediction_error_ratio_count") == 14 + SLOTS + 1
            assert _metric(text, "prefix_index_blocks") > 0

            # The agents restart (their caches are gone): the router forgets their blocks,
            # follows the new replicas from their (empty) snapshots, and learns anew.
            mesh.kill("fleet")
            mesh.start_agent("fleet", device="cpu", extra=fleet_flags)
            await eventually(two_ready, 60, "2 READY replicas again", 0.2)

            async def forgotten() -> bool:
                text = await asyncio.to_thread(_read, url)
                return _metric(text, "prefix_index_blocks") == 0

            await eventually(forgotten, 30, "the old replicas' blocks dropped", 0.2)
            again = await ask(router.address, SYSTEM + "Question 99?")
            await asyncio.sleep(PENDING_TTL_S + 0.5)  # the router's own send expires again
            assert await ask(router.address, SYSTEM + "Question 100?") == again

        asyncio.run(scenario())
    finally:
        mesh.stop()


def _metric(text: str, name: str) -> float:
    """The router's ``meshserve_router_<name>`` for the model."""
    return sum(
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith(f"meshserve_router_{name}{{") and MODEL in ln
    )


def _read(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())
