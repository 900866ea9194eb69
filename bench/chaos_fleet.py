"""The fleet's faults, for bench/chaos.py: partitions, etcd members lost, an engine that dies, a
GPU that fails. Needs root: every service is a host of its own (meshserve.netns: a network
namespace on a bridge; a cut is silent, as in a fleet), etcd is a three-member cluster whose
members are hosts too, and the two agents run on stand-in GPU hosts (tests/standins/pynvml.py:
the GPUs are what is absent) serving sim models.

Each fault hits mid-way through a greedy stream while background clients stream another model;
per fault: requests, lost (an error, or a stream not equal to the uninterrupted output),
duplicated tokens, failovers, time to detect (what tells, seen from outside: the replica gone
from etcd, another scheduler or etcd member leading, the replica FAILED, the device FAILED) and
time to recover (from the fault to the next token the faulted stream got).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
from meshserve.cluster.etcd_process import EtcdCluster
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect
from meshserve.localmesh import Mesh
from meshserve.modelspec import spec_from_dict
from meshserve.netns import Hosts, available
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2, inference_pb2_grpc

STANDINS = Path(__file__).resolve().parents[1] / "tests" / "standins"
ETCD = ("etcd-0", "etcd-1", "etcd-2")
AGENTS = {"agent-0": "GPU-A0", "agent-1": "GPU-B0"}
HOSTS = (*ETCD, "scheduler-0", "scheduler-1", *AGENTS, "router")
QUORUM_LOSS_S = 30.0
GAP_S = 0.03  # a silence worth recording in a stream of 10 ms tokens
Fault = Callable[[str], Awaitable[None]]  # hits the node serving the faulted stream


@dataclass
class FleetResult:
    fault: str
    runs: int = 0
    requests: int = 0
    lost: int = 0
    duplicated_tokens: int = 0
    failovers: int = 0
    detect_ms: list[float] = field(default_factory=list)
    recover_ms: list[float] = field(default_factory=list)
    detected_by: str = ""

    def row(self) -> dict[str, object]:
        def p(xs: list[float], q: float) -> float | None:
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(len(xs) * q))], 1) if xs else None

        return {
            "fault": self.fault, "runs": self.runs, "requests": self.requests,
            "lost": self.lost, "duplicated_tokens": self.duplicated_tokens,
            "failovers": self.failovers, "detected_by": self.detected_by,
            "detect_p50_ms": round(statistics.median(self.detect_ms), 1)
            if self.detect_ms else None,
            "recover_p50_ms": p(self.recover_ms, 0.5), "recover_p99_ms": p(self.recover_ms, 0.99),
            "detect_ms": [round(x, 1) for x in self.detect_ms],
            "recover_ms": [round(x, 1) for x in self.recover_ms],
            "tokens_after_cancel": [],
        }  # fmt: skip


def request(model: str, tokens: int) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=model, prompt="a fleet fails")
    r.sampling.max_tokens, r.sampling.temperature, r.sampling.ignore_eos = tokens, 0.0, True
    return r


async def until(probe: Callable[[], Awaitable[object]], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := await probe():
                return value
        except Exception:  # not there yet (etcd may be partitioned from us too)
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


def describe(path: Path, uuid: str, **faults: object) -> None:
    path.write_text(json.dumps({"gpus": [{"uuid": uuid, "total": 80 << 30, **faults}]}))


class Fleet:
    def __init__(self, root: Path, tokens: int) -> None:
        self.root = root
        self.tokens = tokens
        self.hosts = Hosts()
        for name in HOSTS:
            self.hosts.add(name)
        self.mesh = Mesh(root, lease_ttl_s=2, etcd_members=3, hosting=self.hosts)
        self.expected: dict[str, list[int]] = {}

    @property
    def router(self) -> str:
        return self.mesh.services["router"].address

    @property
    def cluster(self) -> EtcdCluster:
        assert isinstance(self.mesh.etcd, EtcdCluster)
        return self.mesh.etcd

    def start(self) -> None:
        m = self.mesh
        m.start_etcd()
        m.start_scheduler()
        m.start_scheduler("scheduler-1")
        path = os.pathsep.join(p for p in (str(STANDINS), os.environ.get("PYTHONPATH")) if p)
        for node, uuid in AGENTS.items():
            describe(self.root / f"{node}.json", uuid)
            env = {"MESHSERVE_STANDIN_NVML": str(self.root / f"{node}.json"), "PYTHONPATH": path}
            m.start_agent(node, device="cuda", env=env, extra=["--load-retry", "2"])
        m.start_router()

    async def apply(self, name: str, replicas: int, **engine: str) -> None:
        spec = spec_from_dict(
            {"name": name, "source": f"sim://{name}", "engine": "sim", "memory": "1GiB",
             "min_replicas": replicas, "max_model_len": 4096,
             "engine_args": {"ttft_ms": "5", "itl_ms": "10", **engine}}
        )  # fmt: skip
        await self.store_call(lambda s: s.put(Keyspace().model(name), spec))
        await until(lambda: self.ready(name, replicas), 120, f"{name}: {replicas} READY")
        self.expected[name] = await self.stream_once(name)

    async def store_call(self, call: Callable[[Store], Awaitable[object]]) -> object:
        async def once() -> object:
            client = connect(EtcdConfig(self.mesh.etcd.endpoint))
            try:
                return await call(Store(client, Keyspace())) or True
            finally:
                await client.close()

        return await until(once, 60, "an etcd call")

    async def records(self) -> list[S.ReplicaStatus]:
        client = connect(EtcdConfig(self.mesh.etcd.endpoint))
        try:
            entries, _ = await Store(client, Keyspace()).list(
                Keyspace().replicas(), S.ReplicaStatus
            )
        finally:
            await client.close()
        return [e.value for e in entries]

    async def ready(self, model: str, n: int) -> bool:
        states = [r.state for r in await self.records() if r.model == model]
        return states.count(S.REPLICA_STATE_READY) >= n

    async def stream_once(self, model: str) -> list[int]:
        async with grpc.aio.insecure_channel(self.router) as ch:
            ids: list[int] = []
            call = inference_pb2_grpc.InferenceStub(ch).Generate(
                request(model, self.tokens), timeout=120
            )
            async for msg in call:
                ids += msg.token_ids
            return ids

    async def leader(self) -> str:
        client = connect(EtcdConfig(self.mesh.etcd.endpoint))
        try:
            got = await client.get_prefix(
                Keyspace().election(), sort_order="ascend", sort_target="create"
            )
            return next(S.SchedulerCandidate.FromString(kv.value).scheduler_id for kv in got)
        finally:
            await client.close()

    async def etcd_leader(self) -> int:
        return await asyncio.to_thread(self.cluster.leader)

    async def faulted(
        self, model: str, fault: Fault, res: FleetResult, after: int = 40
    ) -> list[tuple[float, float]]:
        """One greedy stream of ``model``; ``fault(node)`` after ``after`` tokens (the fault
        time; with none, the first token's). Records the longest silence after it (the client's
        view of the recovery). Returns its silences over GAP_S: (when each began, how long)."""
        ids: list[int] = []
        node, faulted_at = "", 0.0
        last, gaps = time.monotonic(), []
        async with grpc.aio.insecure_channel(self.router) as ch:
            call = inference_pb2_grpc.InferenceStub(ch).Generate(
                request(model, self.tokens), timeout=120
            )
            try:
                async for msg in call:
                    now = time.monotonic()
                    if ids and now - last > GAP_S:
                        gaps.append((last, now - last))
                    last = now
                    ids += msg.token_ids
                    if not node:
                        node = dict(await call.initial_metadata())["meshserve-node"]
                    if not faulted_at and len(ids) >= after:
                        faulted_at = time.monotonic()
                        await fault(node)
                trailers = dict(await call.trailing_metadata() or ())
                res.failovers += int(trailers.get("meshserve-failovers", 0))
            except grpc.aio.AioRpcError as e:
                print(f"  {res.fault}: lost: {e.code().name} {e.details()}", file=sys.stderr)
                res.lost += 1
                return gaps
        want = self.expected[model]
        res.lost += ids[: len(want)] != want or len(ids) < len(want)
        res.duplicated_tokens += max(0, len(ids) - len(want))
        after_fault = [g for began, g in gaps if began + g > faulted_at]
        res.recover_ms.append(max(after_fault, default=0.0) * 1000)
        return gaps


class Background:
    """Clients streaming short requests of one model until stopped; counts outcomes."""

    def __init__(self, router: str, model: str, clients: int) -> None:
        self.router, self.model, self.clients = router, model, clients
        self.done = self.failed = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def __enter__(self) -> Background:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def wait(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self) -> None:
        async with grpc.aio.insecure_channel(self.router) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            while not self._stop.is_set():
                try:
                    n = 0
                    async for msg in stub.Generate(request(self.model, 16), timeout=30):
                        n += len(msg.token_ids)
                    self.failed += n != 16
                except grpc.aio.AioRpcError as e:
                    print(f"  background: {e.code().name} {e.details()}", file=sys.stderr)
                    self.failed += 1
                self.done += 1


async def detect(probe: Callable[[], Awaitable[bool]], since: float, res: FleetResult) -> None:
    """Records when ``probe`` first holds, from ``since``."""
    await until(probe, 60, res.fault)
    res.detect_ms.append((time.monotonic() - since) * 1000)


async def run_fleet(root: Path, runs: int, load: int, tokens: int) -> list[FleetResult]:
    why = available()
    if why:
        raise PermissionError(f"the fleet's faults need network namespaces: {why}")
    f = Fleet(root, tokens)
    try:
        f.start()
        await f.apply("fleet", 2)  # the faulted streams
        await f.apply("steady", 2)  # the background clients'
        await f.apply("gpu1", 1)
        await f.apply("crashy", 2, inject_crash_at_step=str(tokens * 2 // 3))
        return [await scenario(f, name, runs, load) for name in SCENARIOS]
    finally:
        f.mesh.stop()
        f.hosts.close()


async def scenario(f: Fleet, name: str, runs: int, load: int) -> FleetResult:
    res = FleetResult(name, detected_by=SCENARIOS[name])
    for _ in range(runs):
        healers: list[Callable[[], object]] = []
        watchers: list[asyncio.Task[None]] = []

        fault = functools.partial(_hit, f, name, res, healers, watchers)
        model = {"GPU marked failed": "gpu1", "engine death": "crashy"}.get(name, "fleet")
        with Background(f.router, "steady", load) as bg:
            if name == "engine death":  # the engine dies by itself, at its step N
                logs = {n: _log_size(f, n) for n in AGENTS}
                await f.faulted(model, _nothing, res, after=0)
                await until(functools.partial(_verdicts, f, logs), 60, "an engine death judged")
                res.detect_ms += _death_to_failed(f, logs)
                # engine deaths count against their device (3 and it is FAILED): the drill's
                # deaths are not the device's, so the operator clears them after each run
                healers += [functools.partial(_clear_gpu, f, n) for n in AGENTS]
            else:
                await f.faulted(model, fault, res)
            if name == "etcd quorum loss":  # hold it a while under load: serve throughout
                await asyncio.sleep(QUORUM_LOSS_S)
            await bg.wait()
        res.runs += 1
        res.requests += 1 + bg.done
        res.lost += bg.failed
        for w in watchers:
            try:
                await w
            except TimeoutError:
                w.cancel()
        for heal in healers:
            heal()
        await _settled(f)
    return res


async def _hit(
    f: Fleet,
    name: str,
    res: FleetResult,
    healers: list[Callable[[], object]],
    watchers: list[asyncio.Task[None]],
    node: str,
) -> None:
    """Fault ``name`` on ``node``: what undoes it goes to ``healers``, what times its
    detection to ``watchers``."""
    hosts, mesh = f.hosts, f.mesh
    now = time.monotonic()
    if name == "partition router-agent":
        hosts.cut("router", node)
        healers.append(lambda: hosts.heal("router", node))
    elif name == "partition agent-etcd":
        for m in ETCD:
            hosts.cut(m, node)
            healers.append(lambda m=m: hosts.heal(m, node))  # type: ignore[misc]

        async def gone() -> bool:
            return not any(r.node_id == node and r.model == "fleet"
                           for r in await f.records())  # fmt: skip

        watchers.append(asyncio.create_task(detect(gone, now, res)))
    elif name == "partition scheduler leader-etcd":
        old = await f.leader()
        for m in ETCD:
            hosts.cut(m, old)
            healers.append(lambda m=m, old=old: hosts.heal(m, old))  # type: ignore[misc]

        async def led() -> bool:
            return await f.leader() != old

        watchers.append(asyncio.create_task(detect(led, now, res)))
    elif name == "etcd member loss":
        member = f.cluster.members[0]  # the first address every client was given
        member.kill()
        healers.append(member.start)
    elif name == "etcd leader partition":
        lost = await f.etcd_leader()
        hosts.isolate(ETCD[lost])
        healers.append(lambda: hosts.rejoin(ETCD[lost]))

        async def new_leader() -> bool:
            return (await f.etcd_leader()) not in (-1, lost)

        watchers.append(asyncio.create_task(detect(new_leader, now, res)))
    elif name == "etcd quorum loss":
        for member in f.cluster.members[1:]:
            member.kill()
            healers.append(member.start)
    elif name == "GPU marked failed":
        describe(mesh.data_dir / f"{node}.json", AGENTS[node], xids=[79])
        healers.append(lambda: _clear_gpu(f, node))

        async def judged() -> bool:
            got = await f.store_call(lambda s: s.get(Keyspace().node(node), S.NodeStatus))
            return isinstance(got, S.NodeStatus) and any(
                g.health == S.DEVICE_HEALTH_FAILED for g in got.gpus
            )

        watchers.append(asyncio.create_task(detect(judged, now, res)))


async def _nothing(node: str) -> None:
    pass


def _log_size(f: Fleet, node: str) -> int:
    path = f.mesh.data_dir / "logs" / f"{node}.log"
    return path.stat().st_size if path.exists() else 0


def _death_to_failed(f: Fleet, since: dict[str, int]) -> list[float]:
    """ms from each engine death to its replica marked FAILED, from the agents' logs (their
    timestamps: the death is logged where it happens, the verdict where the health check
    gives it)."""
    out = []
    for node, offset in since.items():
        with open(f.mesh.data_dir / "logs" / f"{node}.log", "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        died = None
        for line in lines:
            stamp = _stamp(line)
            if stamp is None:
                continue
            if "the simulated engine died" in line and "giving the replica up" not in line:
                died = stamp
            elif "giving the replica up here" in line and died is not None:
                out.append((stamp - died) * 1000)
                died = None
    return out


def _stamp(line: str) -> float | None:
    """The time of a log line ("2026-12-04 09:13:03,759 LEVEL …"), in seconds."""
    try:
        when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return when.timestamp()


async def _verdicts(f: Fleet, logs: dict[str, int]) -> bool:
    return bool(_death_to_failed(f, logs))


def _clear_gpu(f: Fleet, node: str) -> None:
    describe(f.mesh.data_dir / f"{node}.json", AGENTS[node])
    subprocess.run(
        [sys.executable, "-m", "meshserve", "node", "uncordon", node, "--device", AGENTS[node],
         "--etcd", f.mesh.etcd.endpoint],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip


async def _settled(f: Fleet) -> None:
    """Every model back to its replicas, every scheduler a candidate, three etcd members."""
    for model, n in (("fleet", 2), ("steady", 2), ("gpu1", 1), ("crashy", 2)):
        await until(lambda model=model, n=n: f.ready(model, n), 180, f"{model} READY again")  # type: ignore[misc]

    async def two_candidates() -> bool:
        got = await f.store_call(lambda s: s.client.get_prefix(Keyspace().election()))
        return len(list(got)) == 2  # type: ignore[call-overload]

    await until(two_candidates, 60, "both schedulers candidates")
    await until(lambda: _members_up(f), 60, "three etcd members")


async def _members_up(f: Fleet) -> bool:
    return all([await asyncio.to_thread(m.healthy) for m in f.cluster.members])


SCENARIOS = {  # the fault → what tells (the detect column)
    "partition router-agent": "the router's stall watch (the stream's pace)",
    "partition agent-etcd": "its lease expiring: replica gone from etcd",
    "partition scheduler leader-etcd": "its lease expiring: the standby leads",
    "etcd member loss": "-",
    "etcd leader partition": "etcd's election: another member leads",
    "etcd quorum loss": "-",
    "engine death": "the agent's engine health check: replica FAILED",
    "GPU marked failed": "NVML Xid event: device FAILED in NodeStatus",
}
