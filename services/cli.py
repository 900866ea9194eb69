"""The ``meshserve`` command: run a service, run the whole mesh locally, and talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="meshserve: serve many models on a fleet of GPU hosts.", no_args_is_help=True
)
model_app = typer.Typer(help="Register and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()
err = Console(stderr=True)

HOME = Path(os.environ.get("MESHSERVE_HOME", Path.home() / ".meshserve"))
STATE = "state.json"

Etcd = Annotated[str, typer.Option("--etcd", envvar="MESHSERVE_ETCD", help="etcd host:port")]
Prefix = Annotated[str, typer.Option("--prefix", envvar="MESHSERVE_PREFIX", help="etcd key prefix")]
ReadyFile = Annotated[str, typer.Option("--ready-file", help="write JSON here once serving")]
MetricsPort = Annotated[
    int,
    typer.Option(
        "--metrics-port", envvar="MESHSERVE_METRICS_PORT", help="Prometheus port; 0 = off"
    ),
]
LeaseTtl = Annotated[
    int, typer.Option("--lease-ttl", envvar="MESHSERVE_LEASE_TTL", help="etcd lease TTL, s")
]


def _state() -> dict[str, str]:
    path = HOME / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _default_etcd(value: str) -> str:
    return value or _state().get("etcd", "127.0.0.1:2379")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


# --- services ------------------------------------------------------------------------------------


@app.command()
def agent(
    node_id: Annotated[str, typer.Option("--node-id", envvar="MESHSERVE_NODE_ID")] = "",
    listen: Annotated[str, typer.Option(envvar="MESHSERVE_LISTEN")] = "127.0.0.1:0",
    advertise_host: Annotated[str, typer.Option(envvar="MESHSERVE_ADVERTISE_HOST")] = "",
    etcd: Etcd = "127.0.0.1:2379",
    prefix: Prefix = "/meshserve/v1/",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    memory_limit: Annotated[
        str, typer.Option(envvar="MESHSERVE_MEMORY_LIMIT", help="cap on model memory, e.g. 2GiB")
    ] = "",
    host_memory_limit: Annotated[
        str, typer.Option(help="CPU RAM for offloaded models, e.g. 64GiB; default half the host's")
    ] = "",
    cache_dir: Annotated[
        str, typer.Option(envvar="MESHSERVE_CACHE_DIR", help="disk tier; ~/.cache/meshserve/<node>")
    ] = "",
    lease_ttl: LeaseTtl = 5,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    max_in_flight: int = 64,
    label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    metrics_port: MetricsPort = 0,
    ready_file: ReadyFile = "",
) -> None:
    """Run a node agent: report devices, load what the scheduler places here, serve inference."""
    from meshserve.nodeagent.config import AgentConfig
    from meshserve.nodeagent.main import serve
    from meshserve.runtime import run
    from meshserve.sizes import parse_bytes

    try:
        pairs = [x.split("=", 1) for x in label or []]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("--label takes key=value")
        labels = tuple((k, v) for k, v in pairs)
        kwargs: dict[str, Any] = {"node_id": node_id} if node_id else {}
        config = AgentConfig(
            listen=listen,
            advertise_host=advertise_host,
            etcd=etcd,
            prefix=prefix,
            device=device,
            memory_limit_bytes=parse_bytes(memory_limit) if memory_limit else 0,
            host_memory_limit_bytes=parse_bytes(host_memory_limit) if host_memory_limit else 0,
            cache_dir=cache_dir,
            lease_ttl_s=lease_ttl,
            threads=threads,
            max_in_flight=max_in_flight,
            labels=labels,
            metrics_port=metrics_port,
            ready_file=ready_file,
            **kwargs,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise _fail(str(e)) from None
    run(serve(config))


@app.command()
def scheduler(
    scheduler_id: Annotated[str, typer.Option("--id", envvar="MESHSERVE_SCHEDULER_ID")] = "",
    listen: Annotated[str, typer.Option(envvar="MESHSERVE_LISTEN")] = "127.0.0.1:0",
    advertise_host: Annotated[str, typer.Option(envvar="MESHSERVE_ADVERTISE_HOST")] = "",
    etcd: Etcd = "127.0.0.1:2379",
    prefix: Prefix = "/meshserve/v1/",
    lease_ttl: LeaseTtl = 5,
    resync: Annotated[float, typer.Option(help="full round at least every N s")] = 5.0,
    profile: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_SCHEDULER_PROFILE",
            help="YAML: filters, scorers (weights), strategy, eviction (see README)",
        ),
    ] = "",
    metrics_port: MetricsPort = 0,
    ready_file: ReadyFile = "",
) -> None:
    """Run a scheduler (leader-elected; standbys take over when the leader's lease ends)."""
    import yaml
    from meshserve.runtime import run
    from meshserve.scheduler.config import SchedulerConfig
    from meshserve.scheduler.main import serve
    from meshserve.scheduler.profile import load_profile

    try:
        kwargs: dict[str, Any] = {"scheduler_id": scheduler_id} if scheduler_id else {}
        if profile:
            with open(profile) as f:
                kwargs["profile"] = load_profile(yaml.safe_load(f))
        config = SchedulerConfig(
            listen=listen,
            advertise_host=advertise_host,
            etcd=etcd,
            prefix=prefix,
            lease_ttl_s=lease_ttl,
            resync_s=resync,
            metrics_port=metrics_port,
            ready_file=ready_file,
            **kwargs,
        )
    except (ValueError, OSError, yaml.YAMLError) as e:
        raise _fail(str(e)) from None
    run(serve(config))


@app.command()
def router(
    router_id: Annotated[str, typer.Option("--id", envvar="MESHSERVE_ROUTER_ID")] = "",
    listen: Annotated[str, typer.Option(envvar="MESHSERVE_LISTEN")] = "127.0.0.1:50051",
    etcd: Etcd = "127.0.0.1:2379",
    prefix: Prefix = "/meshserve/v1/",
    lease_ttl: LeaseTtl = 5,
    max_attempts: int = 3,
    queue_per_model: int = 256,
    queue_timeout: Annotated[float, typer.Option(help="longest cold-start wait, s")] = 120.0,
    metrics_port: MetricsPort = 0,
    ready_file: ReadyFile = "",
) -> None:
    """Run a router: the one Inference endpoint clients call."""
    from meshserve.router.config import RouterConfig
    from meshserve.router.main import serve
    from meshserve.runtime import run

    try:
        kwargs: dict[str, Any] = {"router_id": router_id} if router_id else {}
        config = RouterConfig(
            listen=listen,
            etcd=etcd,
            prefix=prefix,
            lease_ttl_s=lease_ttl,
            max_attempts=max_attempts,
            queue_per_model=queue_per_model,
            queue_timeout_s=queue_timeout,
            metrics_port=metrics_port,
            ready_file=ready_file,
            **kwargs,
        )
    except ValueError as e:
        raise _fail(str(e)) from None
    run(serve(config))


# --- local mesh ----------------------------------------------------------------------------------


@app.command()
def up(
    agents: Annotated[int, typer.Option(help="node agents to start")] = 2,
    port: Annotated[int, typer.Option(help="router port")] = 50051,
    data_dir: Annotated[Path, typer.Option(help="etcd data, logs, traces, the demo model")] = HOME,
    memory_limit: Annotated[str, typer.Option(help="per-agent model memory cap, e.g. 1GiB")] = "",
    prompt: Annotated[
        str, typer.Option(help="demo completion streamed once the model is READY")
    ] = "Once upon a time",
    max_tokens: int = 32,
    exit_after_demo: Annotated[
        bool, typer.Option(help="stop the mesh after the demo completion")
    ] = False,
) -> None:
    """Start etcd, a scheduler, node agents and a router here, serve the tiny demo model, stream a
    completion, and run until Ctrl-C."""
    _stop_on_signals()  # first: a SIGTERM during start-up must still stop what was started
    if agents < 1:
        raise _fail("--agents must be >= 1")
    try:
        _up(agents, port, data_dir, memory_limit, prompt, max_tokens, exit_after_demo)
    except _Stop as stop:
        raise typer.Exit(128 + stop.signum) from None


def _up(
    agents: int,
    port: int,
    data_dir: Path,
    memory_limit: str,
    prompt: str,
    max_tokens: int,
    exit_after_demo: bool,
) -> None:
    from meshserve.local import Mesh

    started = time.monotonic()
    data_dir = data_dir.expanduser().resolve()
    mesh = Mesh(data_dir, trace_dir=data_dir / "traces")
    try:
        with console.status("building the tiny demo model (random weights, local tokenizer)…"):
            from meshserve.demo_model import build_demo_model

            model_dir = build_demo_model(data_dir / "models" / "demo")
        with console.status("starting etcd, scheduler, agents, router…"):
            mesh.start_etcd()
            mesh.start_scheduler()
            for i in range(agents):
                mesh.start_agent(f"agent-{i}", memory_limit=memory_limit)
            router_address = mesh.start_router(listen=f"127.0.0.1:{port}").address
        (data_dir / STATE).write_text(
            json.dumps({"router": router_address, "etcd": mesh.etcd.endpoint})
        )
        from meshserve.modelspec import demo_spec

        asyncio.run(_apply(mesh.etcd.endpoint, "/meshserve/v1/", demo_spec(model_dir)))
        with console.status("waiting for model 'demo' to be READY…"):
            asyncio.run(_wait_ready(router_address, "demo", 120.0))
        console.print(
            f"[green]mesh up[/green] in {time.monotonic() - started:.1f} s — "
            f"router {router_address}, "
            f"etcd {mesh.etcd.endpoint}, logs {data_dir / 'logs'}, traces {data_dir / 'traces'}"
        )
        console.print(f"[bold]demo>[/bold] {prompt}", end="")
        asyncio.run(_generate(router_address, "demo", prompt, max_tokens, None, None, 30.0, ""))
        if exit_after_demo:
            return
        console.print(
            "\nTry, in another terminal:\n"
            '  meshserve generate demo "Once upon a time" --max-tokens 64\n'
            "  meshserve status\n"
            "Ctrl-C stops the mesh."
        )
        _watch(mesh)
    except (RuntimeError, TimeoutError) as e:
        raise _fail(str(e)) from None
    finally:
        with console.status("stopping… (again to force)"):
            mesh.stop()
        (data_dir / STATE).unlink(missing_ok=True)


class _Stop(BaseException):
    """SIGTERM or SIGINT reached `meshserve up`: unwind into its clean-up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT stop the mesh in order, whatever dispositions we inherited (a
    background job of a non-interactive shell starts with SIGINT ignored). A second signal exits
    at once; the services die with us anyway (meshserve.lifeline)."""

    def first(signum: int, _frame: object) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: os._exit(128 + signum))
        raise _Stop(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, first)


def _watch(mesh: Any) -> None:
    """Until a signal: say so when a service exits on its own (its log has why)."""
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        for name, service in mesh.services.items():
            if name not in reported and not service.alive():
                reported.add(name)
                err.print(
                    f"[red]{name} exited with {service.proc.returncode}[/red]; see {service.log}"
                )


async def _apply(etcd: str, prefix: str, spec: Any) -> None:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect

    client = connect(EtcdConfig(etcd))
    try:
        await Store(client, Keyspace(prefix)).put(Keyspace(prefix).model(spec.name), spec)
    finally:
        await client.close()


async def _wait_ready(address: str, model: str, timeout_s: float) -> None:
    import grpc
    from meshserve.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        while time.monotonic() < deadline:
            with_models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            if any(m.name == model and m.ready_replicas for m in with_models.models):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"model {model!r} not READY in {timeout_s} s")


# --- clients -------------------------------------------------------------------------------------


async def _generate(
    address: str,
    model: str,
    prompt: str,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    timeout: float,
    session: str,
) -> None:
    import grpc
    from meshserve.rpc.errors import decode_details, error_reason
    from meshserve.v1 import inference_pb2, inference_pb2_grpc

    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, session_key=session)
    if max_tokens is not None:
        req.sampling.max_tokens = max_tokens
    if temperature is not None:
        req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    start = time.perf_counter()
    first = None
    async with grpc.aio.insecure_channel(address) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(req, timeout=timeout)
        try:
            async for msg in call:
                if first is None:
                    first = time.perf_counter() - start
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    headers = dict(await call.initial_metadata())
                    elapsed = time.perf_counter() - start
                    n = msg.usage.output_tokens
                    node = headers.get("meshserve-node", "?")
                    reason = inference_pb2.FinishReason.Name(msg.finish_reason)
                    err.print(
                        f"\n[dim]{n} tokens from {node}, first token {first * 1000:.0f} ms, "
                        f"{n / elapsed:.0f} tokens/s, {reason}[/dim]"
                    )
        except grpc.aio.AioRpcError as e:
            why = error_reason(decode_details(e.trailing_metadata()))
            raise _fail(f"{e.code().name}: {e.details()}" + (f" [{why}]" if why else "")) from None


@app.command()
def generate(
    model: str,
    prompt: str,
    max_tokens: Annotated[int | None, typer.Option(help="tokens to generate")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy")] = None,
    seed: int | None = None,
    session: Annotated[str, typer.Option(help="session key (replica affinity)")] = "",
    address: Annotated[str, typer.Option(envvar="MESHSERVE_ROUTER", help="router host:port")] = "",
    timeout: Annotated[float, typer.Option(help="deadline, s")] = 60.0,
) -> None:
    """Stream a completion from MODEL (through the router `meshserve up` started, by default)."""
    address = address or _state().get("router") or "127.0.0.1:50051"
    asyncio.run(_generate(address, model, prompt, max_tokens, temperature, seed, timeout, session))


@model_app.command("apply")
def model_apply(file: Path, etcd: Etcd = "", prefix: Prefix = "/meshserve/v1/") -> None:
    """Register or update the model(s) in a YAML file (one mapping, or a list)."""
    import yaml
    from meshserve.modelspec import spec_from_dict

    try:
        docs = yaml.safe_load(file.read_text())
        items = docs if isinstance(docs, list) else [docs]
        specs = [spec_from_dict(d, base=file.parent) for d in items]
    except (OSError, ValueError, yaml.YAMLError, TypeError) as e:
        raise _fail(f"{file}: {e}") from None
    for spec in specs:
        asyncio.run(_apply(_default_etcd(etcd), prefix, spec))
        console.print(
            f"applied model [bold]{spec.name}[/bold] ({spec.memory_bytes / 2**20:.1f} MiB)"
        )


@app.command()
def status(etcd: Etcd = "", prefix: Prefix = "/meshserve/v1/") -> None:
    """Nodes, devices, memory, replicas and placements, as tables."""
    asyncio.run(_status(_default_etcd(etcd), prefix))


async def _status(etcd: str, prefix: str) -> None:
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2, common_pb2

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    store = Store(client, keys)
    try:
        nodes, _ = await store.list(keys.nodes(), cluster_pb2.NodeStatus)
        replicas, _ = await store.list(keys.replicas(), cluster_pb2.ReplicaStatus)
        placements, _ = await store.list(keys.placements(), cluster_pb2.Placement)
        models, _ = await store.list(keys.models(), cluster_pb2.ModelSpec)
    except Exception as e:
        raise _fail(f"cannot read etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await client.close()
    mib = 2**20
    t = Table(title="nodes")
    for c in ("node", "address", "device", "GPUs", "capacity MiB", "used MiB", "draining"):
        t.add_column(c)
    for entry in nodes:
        n = entry.value
        gpus = (
            ", ".join(
                f"{g.name} {g.memory_used_bytes / mib:.0f}/{g.memory_total_bytes / mib:.0f} MiB "
                f"{g.utilization:.0%}"
                for g in n.gpus
            )
            or "-"
        )
        t.add_row(
            n.node_id,
            n.address,
            n.device_kind,
            gpus,
            f"{n.capacity_bytes / mib:.0f}",
            f"{n.used_bytes / mib:.1f}",
            "yes" if n.draining else "",
        )
    console.print(t)
    t = Table(title="models")
    for c in ("model", "aliases", "memory MiB", "min", "priority"):
        t.add_column(c)
    for model_entry in models:
        m = model_entry.value
        t.add_row(
            m.name,
            ", ".join(m.aliases),
            f"{m.memory_bytes / mib:.1f}",
            str(m.min_replicas),
            common_pb2.Priority.Name(m.priority).removeprefix("PRIORITY_"),
        )
    console.print(t)
    t = Table(title="replicas")
    for c in ("model", "node", "state", "tier", "memory MiB", "load s", "running", "KV", "note"):
        t.add_column(c)
    for replica_entry in replicas:
        r = replica_entry.value
        t.add_row(
            r.model,
            r.node_id,
            cluster_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_"),
            cluster_pb2.Tier.Name(r.tier).removeprefix("TIER_"),
            f"{r.memory_bytes / mib:.1f}",
            f"{r.load_seconds:.2f}",
            f"{r.running}+{r.waiting}",
            f"{r.kv_cache_usage:.0%}",
            (r.error or r.tier_note)[:60],
        )
    console.print(t)
    t = Table(title="placements")
    for c in ("node", "model", "tier", "GPUs", "epoch", "reason"):
        t.add_column(c)
    for placement_entry in placements:
        p = placement_entry.value
        t.add_row(
            p.node_id,
            p.model,
            cluster_pb2.Tier.Name(p.tier).removeprefix("TIER_"),
            ", ".join(d[-12:] for d in p.devices) or "-",
            str(p.epoch),
            p.reason,
        )
    console.print(t)


@app.command()
def explain(model: str, etcd: Etcd = "", prefix: Prefix = "/meshserve/v1/") -> None:
    """Why MODEL sits where it does: each node's rejecting filter, or its scores (last round)."""
    asyncio.run(_explain(_default_etcd(etcd), prefix, model))


async def _explain(etcd: str, prefix: str, model: str) -> None:
    import grpc
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, connect
    from meshserve.v1 import cluster_pb2, scheduler_pb2, scheduler_pb2_grpc

    keys = Keyspace(prefix)
    client = connect(EtcdConfig(etcd))
    try:
        got = list(
            await client.get_prefix(keys.election(), sort_order="ascend", sort_target="create")
        )
    except Exception as e:
        raise _fail(f"cannot read etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await client.close()
    if not got:
        raise _fail("no scheduler is running (nobody campaigns for leadership)")
    address = cluster_pb2.SchedulerCandidate.FromString(got[0].value).address
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            out = await scheduler_pb2_grpc.SchedulerStub(ch).Explain(
                scheduler_pb2.ExplainRequest(model=model), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise _fail(f"{e.code().name}: {e.details()}") from None
    console.print(
        f"[bold]{out.model}[/bold]: {out.summary} (wanted replicas: {out.wanted_replicas})"
    )
    t = Table(title="nodes, as the last round saw them")
    for c in ("node", "feasible", "filter / reason", "score", "scores", "evicts"):
        t.add_column(c)
    for v in out.verdicts:
        t.add_row(
            v.node_id,
            "yes" if v.feasible else ("never" if v.unresolvable else "no"),
            f"{v.filter}: {v.reason}" if v.filter else v.reason,
            f"{v.score:.3f}" if v.feasible else "",
            " ".join(f"{k}={x:.2f}" for k, x in sorted(v.scores.items())),
            ", ".join(v.evicts),
        )
    console.print(t)


def main() -> None:
    app()
