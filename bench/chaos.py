"""Chaos: faults at the worst moment, under load, against a real local mesh (etcd, a scheduler,
two agents each holding a replica of the demo model, a router).

    python bench/chaos.py [--runs 3] [--load 4] [--tokens 320] [--long-tokens 1900]
                          [--drain-grace 1.0] [--fleet-runs 2] [--only process|fleet]
                          [--json PATH]

Each fault hits the agent serving a greedy stream mid-way while background clients keep
streaming: kill -9, SIGSTOP (frozen: only its lease expiry tells), SIGTERM (graceful drain: the
agents' --drain-grace is 1 s and this stream is --long-tokens long, so it outlasts the grace and
must move), and a client cancel. Per fault: requests lost (any error, or a stream not equal to
the uninterrupted greedy output), duplicated tokens, failovers (router trailers), time from the
fault to the next token the client got (p50/p99), and for a cancel the tokens the engine
generated after it.
Then the fleet's faults (bench/chaos_fleet.py; root: each service a host of its own, a cut is
silent): partitions router-agent, agent-etcd and scheduler leader-etcd, an etcd member lost, the
etcd leader member cut off, etcd without quorum for 30 s, an engine that dies, a GPU marked
failed; with the time to detect each and what tells.
The contract: 0 lost and 0 duplicated for every fault.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.demo_model import build_demo_model
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.v1 import inference_pb2, inference_pb2_grpc, nodeagent_pb2, nodeagent_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root
from bench.chaos_fleet import run_fleet

MODEL = "demo"


@dataclass
class FaultResult:
    fault: str
    runs: int = 0
    requests: int = 0  # faulted streams + background requests during the faults
    lost: int = 0
    duplicated_tokens: int = 0
    failovers: int = 0
    recover_ms: list[float] = field(default_factory=list)
    tokens_after_cancel: list[int] = field(default_factory=list)

    def row(self) -> dict[str, object]:
        d = asdict(self)
        rec = sorted(self.recover_ms)
        d["recover_p50_ms"] = round(statistics.median(rec), 1) if rec else None
        d["recover_p99_ms"] = (
            round(rec[min(len(rec) - 1, int(len(rec) * 0.99))], 1) if rec else None
        )
        d["recover_ms"] = [round(x, 1) for x in rec]
        return d


def request(tokens: int, prompt: str = "The scheduler decided") -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=MODEL, prompt=prompt)
    r.sampling.max_tokens = tokens
    r.sampling.temperature = 0.0
    r.sampling.ignore_eos = True
    return r


async def stream(router: str, req: inference_pb2.GenerateRequest) -> list[int]:
    async with grpc.aio.insecure_channel(router) as ch:
        ids: list[int] = []
        async for msg in inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60):
            ids += msg.token_ids
        return ids


async def ready(router: str) -> int:
    async with grpc.aio.insecure_channel(router) as ch:
        out = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    return sum(m.ready_replicas for m in out.models if m.name == MODEL)


async def until(probe: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
        except Exception:  # not there yet
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


async def generated(mesh: Mesh, node: str) -> int:
    async with grpc.aio.insecure_channel(mesh.services[node].address) as ch:
        st = await nodeagent_pb2_grpc.NodeAgentStub(ch).GetNodeStatus(
            nodeagent_pb2.GetNodeStatusRequest(), timeout=5
        )
    return sum(load.generated_tokens for load in st.load if load.model == MODEL)


class Load:
    """Background clients streaming short requests until stopped; counts their outcomes."""

    def __init__(self, router: str, clients: int) -> None:
        self.router, self.clients = router, clients
        self.done = self.failed = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        while not self._stop.is_set():
            try:
                ids = await stream(self.router, request(16, "Hello"))
                self.failed += len(ids) != 16
            except grpc.aio.AioRpcError:
                self.failed += 1
            self.done += 1

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def faulted_stream(
    mesh: Mesh, expected: list[int], fault: str, after: int, res: FaultResult
) -> str:
    """One greedy stream through the router; ``fault`` hits its agent after ``after`` tokens.
    Returns the faulted node."""
    router = mesh.services["router"].address
    ids: list[int] = []
    node, faulted_at, recovered = "", 0.0, 0.0
    async with grpc.aio.insecure_channel(router) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(request(len(expected)), timeout=60)
        try:
            async for msg in call:
                if faulted_at and not recovered and msg.token_ids:
                    recovered = time.monotonic()
                ids += msg.token_ids
                if not node:
                    node = dict(await call.initial_metadata())["meshserve-node"]
                if not faulted_at and len(ids) >= after:
                    faulted_at = time.monotonic()
                    if fault == "kill -9":
                        mesh.kill(node)
                    elif fault == "SIGSTOP":
                        mesh.send(node, signal.SIGSTOP)
                    elif fault == "SIGTERM":
                        mesh.send(node, signal.SIGTERM)
                    elif fault == "client cancel":
                        before = await generated(mesh, node)
                        call.cancel()
                        await asyncio.sleep(1.0)  # let anything still running show up
                        res.tokens_after_cancel.append(await generated(mesh, node) - before)
                        return node
            trailers = dict(await call.trailing_metadata() or ())
            res.failovers += int(trailers.get("meshserve-failovers", 0))
        except grpc.aio.AioRpcError:
            res.lost += 1
            return node
        finally:
            if fault == "SIGSTOP" and node:
                mesh.send(node, signal.SIGCONT)
    res.lost += ids[: len(expected)] != expected or len(ids) < len(expected)
    res.duplicated_tokens += max(0, len(ids) - len(expected))
    if recovered:
        res.recover_ms.append((recovered - faulted_at) * 1000)
    return node


async def restore(mesh: Mesh, node: str, flags: list[str]) -> None:
    """The faulted agent back with its replica READY. Started from this (the main) thread:
    services die with the thread that started them (meshserve.lifeline)."""
    if node and not mesh.services[node].alive():
        mesh.start_agent(node, extra=flags)
    await until(lambda: _two(mesh), 120, "both replicas READY again")


async def _two(mesh: Mesh) -> bool:
    return await ready(mesh.services["router"].address) >= 2


async def run(args: argparse.Namespace, root: Path) -> list[FaultResult]:
    model_dir = build_demo_model(root / "model")
    mesh = Mesh(root, lease_ttl_s=2)
    flags = ["--drain-grace", str(args.drain_grace)]
    try:
        mesh.start_etcd()
        mesh.start_scheduler()
        for name in ("agent-0", "agent-1"):
            mesh.start_agent(name, extra=flags)
        mesh.start_router()
        client = connect(EtcdConfig(mesh.etcd.endpoint))
        spec = spec_from_dict(
            {"name": MODEL, "source": str(model_dir), "min_replicas": 2, "max_model_len": 2048}
        )
        await Store(client, Keyspace()).put(Keyspace().model(MODEL), spec)
        await client.close()
        router = mesh.services["router"].address
        await until(lambda: _two(mesh), 120, "two replicas READY")
        expected = await stream(router, request(args.tokens))
        long = await stream(router, request(args.long_tokens))  # outlasts the drain grace
        results = []
        for fault in ("kill -9", "SIGSTOP", "SIGTERM", "client cancel"):
            res = FaultResult(fault)
            want = long if fault == "SIGTERM" else expected
            for _ in range(args.runs):
                load = Load(router, args.load if fault != "client cancel" else 0)
                load.start()
                node = await faulted_stream(mesh, want, fault, args.tokens // 8, res)
                await load.stop()
                res.runs += 1
                res.requests += 1 + load.done
                res.lost += load.failed
                if node and fault in ("kill -9", "SIGTERM"):
                    await until(lambda n=node: not mesh.services[n].alive(), 30, "agent exit")  # type: ignore[misc]
                await restore(mesh, node, flags)
            results.append(res)
        return results
    finally:
        mesh.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="times each fault is injected")
    p.add_argument("--load", type=int, default=4, help="background streaming clients")
    p.add_argument("--tokens", type=int, default=320, help="tokens in the faulted stream")
    p.add_argument(
        "--long-tokens", type=int, default=1900, help="the SIGTERM stream: outlasts the grace"
    )
    p.add_argument("--drain-grace", type=float, default=1.0, help="the agents' --drain-grace")
    p.add_argument("--fleet-runs", type=int, default=2, help="times each fleet fault is injected")
    p.add_argument("--only", choices=("process", "fleet"), help="one of the two sets")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    results: list[FaultResult] = []
    fleet: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="meshserve-chaos-") as tmp:
        if args.only != "fleet":
            results = asyncio.run(run(args, Path(tmp) / "process"))
        if args.only != "process":
            done = asyncio.run(run_fleet(Path(tmp) / "fleet", args.fleet_runs, args.load, 300))
            fleet = [r.row() for r in done]
    rows = [r.row() for r in results]
    if rows:
        print_process(rows, args)
    if fleet:
        print_fleet(fleet, args)
    if args.json:
        meta = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"faults": rows, "fleet": fleet, "args": meta}, indent=2))
    # A SIGTERM'd stream that never moved proves nothing: it ended within the grace.
    bad = [r for r in rows + fleet if r["lost"] or r["duplicated_tokens"]] + [
        r for r in results if r.fault == "SIGTERM" and r.failovers < r.runs
    ]
    sys.exit(1 if bad else 0)


def print_fleet(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    t = Table(title=f"chaos — the fleet's faults, {args.fleet_runs} runs each, {args.load} "
              "background clients (3 etcd members, every service a host)")  # fmt: skip
    for c in ("fault", "requests", "lost", "duplicated tokens", "failovers", "detect p50 ms",
              "recover p50 ms", "recover p99 ms", "detected by"):  # fmt: skip
        t.add_column(c, justify="right" if c != "detected by" else "left")
    for r in rows:
        t.add_row(
            str(r["fault"]), str(r["requests"]), str(r["lost"]), str(r["duplicated_tokens"]),
            str(r["failovers"]), _ms(r["detect_p50_ms"]), _ms(r["recover_p50_ms"]),
            _ms(r["recover_p99_ms"]), str(r["detected_by"]),
        )  # fmt: skip
    Console(width=max(160, Console().width)).print(t)


def _ms(value: object) -> str:
    return "-" if value is None else str(value)


def print_process(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    t = Table(title=f"chaos — {args.runs} runs per fault, {args.load} background clients")
    for c in ("fault", "requests", "lost", "duplicated tokens", "failovers", "recover p50 ms",
              "recover p99 ms", "tokens after cancel"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            str(r["fault"]), str(r["requests"]), str(r["lost"]), str(r["duplicated_tokens"]),
            str(r["failovers"]), str(r["recover_p50_ms"] or "-"), str(r["recover_p99_ms"] or "-"),
            ", ".join(map(str, r["tokens_after_cancel"])) or "-",  # type: ignore[call-overload]
        )  # fmt: skip
    Console(width=max(120, Console().width)).print(t)


if __name__ == "__main__":
    main()
