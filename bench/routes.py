"""What a route adds to each request in the router, in CPU time (issue 27's goal: ≤ 50 µs).

    python -m bench.routes [--requests 200000] [--mesh-requests 1500] [--rounds 4] [--json PATH]

Measured in-process, side by side in one run, on the work the router core does for a route's
request beyond a plain model's (core/service.py `_routed`): the facts of the request, the
route's plan (rules in order, then the weighted sticky pick by rendezvous hashing, the fallback
chain, the shadow draw), the pristine copy of the request kept for later hops, and the target's
statistics. Rows: a plain model (none of it), a 10/90 canary, the canary with three rules
(none matching: all checked), and with a fallback chain of two and a 10 % shadow.
Process CPU time (time.process_time) per request; distinct session keys per request.

Then the same under load through a real router (etcd, a scheduler, a sim agent with two fast
models, a router, 16 concurrent streams of 4 tokens): the router process's CPU time (utime +
stime from /proc) per request for the plain model vs the 10/90 canary route over the same two
models, in alternating rounds (ABAB…: the machine's drift hits both); the median round of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from meshserve.localmesh import Mesh
from meshserve.router.core.routes import Routes
from meshserve.router.routing.routes import Facts
from meshserve.routespec import route_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from rich.console import Console
from rich.table import Table

ROUTES: dict[str, dict[str, Any] | None] = {
    "plain model (no route)": None,
    "canary 10/90": {"targets": {"chat-v2": 10, "chat-v1": 90}},
    "canary + 3 rules": {
        "targets": {"chat-v2": 10, "chat-v1": 90},
        "rules": [
            {"tenants": ["team-a"], "target": "chat-v2"},
            {"metadata": {"x-canary": "yes"}, "target": "chat-v2"},
            {"min_prompt_chars": 100000, "target": "chat-long"},
        ],
    },
    "canary + rules + 2 fallbacks + 10 % shadow": {
        "targets": {"chat-v2": 10, "chat-v1": 90},
        "rules": [{"tenants": ["team-a"], "target": "chat-v2"}],
        "fallbacks": ["chat-small", "hosted"],
        "shadows": {"chat-v3": 0.1},
    },
}


def measure(doc: dict[str, Any] | None, n: int) -> float:
    """CPU µs per request of the route's work."""
    routes = Routes()
    if doc is not None:
        routes.put(route_from_dict({"name": "chat", **doc}))
    request = inference_pb2.GenerateRequest(model="chat", prompt="Once upon a time " * 8)
    metadata = {"x-canary": "no", "user-agent": "bench"}
    keys = [f"user-{i}" for i in range(4096)]
    started = time.process_time()
    for i in range(n):
        policy = routes.get("chat")
        if policy is None:
            continue
        chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
        key = keys[i & 4095]
        plan = policy.plan(Facts("team-b", key, f"r{i}", 2, chars, metadata))
        pristine = inference_pb2.GenerateRequest()
        pristine.CopyFrom(request)
        stats = routes.target(plan.route, plan.hops[0].model, plan.hops[0].role)
        stats.ended(True, 0.01, 0.1, 16)
    return (time.process_time() - started) / n * 1e6


def router_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(router: str, model: str, n: int, concurrency: int = 16) -> None:
    import grpc

    async with grpc.aio.insecure_channel(router) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        left = iter(range(n))

        async def worker() -> None:
            for i in left:
                req = inference_pb2.GenerateRequest(
                    model=model, prompt="hello", session_key=f"u{i}"
                )
                req.sampling.max_tokens, req.sampling.ignore_eos = 4, True
                async for _ in stub.Generate(req, timeout=60):
                    pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def through_router(n: int, rounds: int) -> dict[str, Any]:
    """Router CPU µs per request: plain model vs the canary route, median of alternating rounds."""
    from tests.e2e.conftest import apply, model_spec, ready_replicas
    from tests.waiting import eventually

    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp) / "mesh", lease_ttl_s=5)
        try:
            mesh.start_etcd()
            mesh.start_scheduler()
            mesh.start_agent(
                "fleet", device="cpu", extra=["--simulate", "1", "--memory-limit", "4GiB"]
            )
            router = mesh.start_router()
            pid = router.proc.pid

            async def setup() -> None:
                for name in ("chat-v1", "chat-v2"):
                    await apply(
                        mesh,
                        model_spec(
                            name,
                            f"sim://{name}",
                            engine="sim",
                            memory="64MiB",
                            min_replicas=1,
                            engine_args={"ttft_ms": "1", "itl_ms": "1"},
                        ),
                    )
                    ready = partial(ready_replicas, router.address, name)
                    await eventually(ready, 60, f"{name} READY")
                from meshserve.cluster.keys import Keyspace
                from meshserve.cluster.store import EtcdConfig, Store, connect

                client = connect(EtcdConfig(mesh.etcd.endpoint))
                try:
                    spec = route_from_dict({"name": "chat", **(ROUTES["canary 10/90"] or {})})
                    await Store(client, Keyspace()).put(Keyspace().route("chat"), spec)
                finally:
                    await client.close()
                await load(router.address, "chat", 200)  # warm both paths
                await load(router.address, "chat-v1", 200)

            asyncio.run(setup())
            got: dict[str, list[float]] = {"chat-v1": [], "chat": []}
            for _ in range(rounds):
                for model in ("chat-v1", "chat"):
                    before = router_cpu_s(pid)
                    asyncio.run(load(router.address, model, n))
                    got[model].append((router_cpu_s(pid) - before) / n * 1e6)
        finally:
            mesh.stop()
    plain, routed = statistics.median(got["chat-v1"]), statistics.median(got["chat"])
    return {
        "plain_us": plain,
        "route_us": routed,
        "added_us": routed - plain,
        "plain_rounds": got["chat-v1"],
        "route_rounds": got["chat"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--mesh-requests", type=int, default=1500, help="per round; 0: skip")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("routes.json"))
    args = parser.parse_args()
    measured = [(name, measure(doc, args.requests)) for name, doc in ROUTES.items()]
    t = Table("route", "CPU µs / request", "goal ≤ 50 µs", title="What a route adds per request")
    for name, us in measured:
        t.add_row(name, f"{us:.2f}", "yes" if us <= 50 else "no")
    rows = [{"route": name, "cpu_us_per_request": us} for name, us in measured]
    Console().print(t)
    mesh = through_router(args.mesh_requests, args.rounds) if args.mesh_requests else {}
    if mesh:
        m = Table(
            "through a router under load", "router CPU µs / request", title="Route vs plain model"
        )
        m.add_row("plain model (chat-v1)", f"{mesh['plain_us']:.0f}")
        m.add_row("canary route 10/90 (chat)", f"{mesh['route_us']:.0f}")
        m.add_row("added by the route", f"{mesh['added_us']:+.0f}")
        Console().print(m)
    args.json.write_text(
        json.dumps({"rows": rows, "requests": args.requests, "through_router": mesh}, indent=2)
    )


if __name__ == "__main__":
    main()
