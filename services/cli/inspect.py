"""Talking to a mesh: `meshserve generate`, `model apply` and `explain` (`status`: status.py)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from meshserve.cli.common import SERVICE, Etcd, Prefix, console, default_etcd, err, fail, state
from meshserve.router.config import DEFAULT_LISTEN
from meshserve.tls import open_channel
from meshserve.traceui import trace_link
from rich.table import Table

app = typer.Typer()
model_app = typer.Typer(help="Register and inspect models.", no_args_is_help=True)


async def apply_spec(etcd: str, prefix: str, spec: Any) -> str:
    """Writes ``spec`` (a ModelSpec) to ``models/<name>``; for an adapter, returns what is
    wrong with its base as registered now ("" when nothing is)."""
    from meshserve.cluster.keys import Keyspace
    from meshserve.cluster.store import EtcdConfig, Store, connect
    from meshserve.v1 import cluster_pb2

    client = connect(EtcdConfig(etcd))
    try:
        store = Store(client, Keyspace(prefix))
        for name in [spec.name, *spec.aliases]:
            if await store.get(Keyspace(prefix).route(name), cluster_pb2.RouteSpec) is None:
                continue
            raise fail(
                f"model {spec.name!r}: a route is named {name!r} (`meshserve route delete` it "
                "first, or pick another name)"
            )
        await store.put(Keyspace(prefix).model(spec.name), spec)
        if not spec.base:
            return ""
        base = await store.get(Keyspace(prefix).model(spec.base), cluster_pb2.ModelSpec)
    finally:
        await client.close()
    if base is None:
        return f"its base {spec.base!r} is not registered: requests for it fail until it is"
    if not base.max_adapters:
        return f"its base {spec.base!r} has max_adapters 0: set it, or requests for it fail"
    return ""


async def stream_completion(
    address: str,
    model: str,
    prompt: str,
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    timeout: float,
    session: str,
    api_key: str = "",
    priority: int = 0,
    trace_ui: str = "",
) -> None:
    """Streams to stdout; the summary, the trace id and (with ``trace_ui``) its page to
    stderr."""
    import grpc
    from meshserve.rpc.errors import decode_details, error_reason
    from meshserve.v1 import inference_pb2, inference_pb2_grpc

    req = inference_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        session_key=session,
        priority=priority,  # type: ignore[arg-type]
    )
    if max_tokens is not None:
        req.sampling.max_tokens = max_tokens
    if temperature is not None:
        req.sampling.temperature = temperature
    if seed is not None:
        req.sampling.seed = seed
    start = time.perf_counter()
    first = None
    async with open_channel(address) as ch:
        call = inference_pb2_grpc.InferenceStub(ch).Generate(
            req, timeout=timeout, metadata=bearer(api_key)
        )
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
                    say_trace(headers, trace_ui)
        except grpc.aio.AioRpcError as e:
            why = error_reason(decode_details(e.trailing_metadata()))
            say_trace(dict(e.trailing_metadata() or ()), trace_ui)  # failures have one too
            raise fail(f"{e.code().name}: {e.details()}" + (f" [{why}]" if why else "")) from None


def say_trace(metadata: dict[str, Any], trace_ui: str) -> None:
    """Prints the trace id a response's ``traceresponse`` names, with its UI page if known."""
    value = metadata.get("traceresponse", "")
    if trace_id := trace_id_of(value if isinstance(value, str) else ""):
        link = trace_link(trace_ui, trace_id) if trace_ui else ""
        err.print(f"[dim]trace {trace_id}[/dim] {link}".rstrip(), highlight=False, soft_wrap=True)


def trace_id_of(traceresponse: str) -> str:
    """The trace id in a W3C ``traceresponse`` header ("" when absent or malformed)."""
    parts = traceresponse.split("-")
    ok = len(parts) == 4 and len(parts[1]) == 32 and parts[1].strip("0")
    return parts[1] if ok else ""


def bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries an API key (none without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


ApiKey = Annotated[
    str,
    typer.Option(envvar="MESHSERVE_API_KEY", help="API key (when the router has tenants)"),
]


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
    api_key: ApiKey = "",
    priority: Annotated[
        str, typer.Option(help="low (sheddable batch), normal, high, critical")
    ] = "",
) -> None:
    """Stream a completion from MODEL (through the router `meshserve up` started, by default)."""
    from meshserve.router.tenancy.tenants import parse_priority

    try:
        level = parse_priority(priority, "--priority") if priority else 0
    except ValueError as e:
        raise fail(str(e)) from None
    local = state()
    # The trace UI of the `meshserve up` whose router this is (none for another router).
    ui = local.get("trace_ui", "") if address in ("", local.get("router")) else ""
    address = address or local.get("router") or DEFAULT_LISTEN
    asyncio.run(
        stream_completion(
            address,
            model,
            prompt,
            max_tokens,
            temperature,
            seed,
            timeout,
            session,
            api_key,
            level,
            trace_ui=ui,
        )
    )


@model_app.command("apply")
def model_apply(file: Path, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Register or update the model(s) in a YAML file (one mapping, or a list)."""
    import yaml
    from meshserve.modelspec import spec_from_dict

    try:
        docs = yaml.safe_load(file.read_text())
        items = docs if isinstance(docs, list) else [docs]
        specs = [spec_from_dict(asyncio.run(pin_registry(d)), base=file.parent) for d in items]
    except (OSError, ValueError, yaml.YAMLError, TypeError) as e:
        raise fail(f"{file}: {e}") from None
    for spec in specs:
        warning = asyncio.run(apply_spec(default_etcd(etcd), prefix, spec))
        pinned = f", revision {spec.revision[:12]}" if spec.revision else ""
        kind = f"adapter of {spec.base}, " if spec.base else ""
        console.print(
            f"applied model [bold]{spec.name}[/bold] "
            f"({kind}{spec.memory_bytes / 2**20:.1f} MiB{pinned})"
        )
        if warning:
            console.print(f"[yellow]warning[/yellow]: {spec.name}: {warning}")


async def pin_registry(d: Any) -> Any:
    """A registry (s3://) model's document with its revision pinned — the registry's manifest
    now, which must equal a revision the document names — and its memory from the manifest's
    weights when not given. Other documents pass unchanged."""
    from meshserve.artifacts.s3 import Location, is_registry, read_manifest, reason

    if not isinstance(d, dict) or not is_registry(str(d.get("source", ""))):
        return d
    loc = Location.parse(str(d["source"]), str(d.get("endpoint", "")), str(d.get("region", "")))
    try:
        manifest, _raw = await read_manifest(loc)
    except FileNotFoundError:
        raise ValueError(f"{loc.url}: no manifest there (`meshserve model push` first)") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{loc.url}: the registry failed: {reason(e)}") from None
    if d.get("revision") and d["revision"] != manifest.revision:
        raise ValueError(
            f"revision: {loc.url} holds {manifest.revision}, not the {d['revision']} pinned here"
        )
    return {"memory": str(manifest.weights_bytes()), **d, "revision": manifest.revision}


@model_app.command("push")
def model_push(
    directory: Path,
    destination: Annotated[str, typer.Argument(help="s3://bucket/prefix")],
    endpoint: Annotated[str, typer.Option(help="the registry's URL; default AWS S3")] = "",
    region: Annotated[str, typer.Option(help="default $AWS_REGION, else us-east-1")] = "",
) -> None:
    """Upload a model directory to an S3-compatible registry with its manifest (every file's
    size and sha256); prints the revision that pins it. Credentials: the AWS_* variables."""
    from meshserve.artifacts.s3 import Location, push, reason
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    try:
        loc = Location.parse(destination, endpoint, region)
        if not directory.is_dir():
            raise ValueError(f"{directory}: not a directory")
        started = time.monotonic()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(f"hashing, then uploading to {loc.url}", total=None)

            def uploaded(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            manifest = asyncio.run(push(directory, loc, uploaded))
    except Exception as e:
        raise fail(f"push: {reason(e)}") from None
    seconds = time.monotonic() - started
    console.print(
        f"pushed {len(manifest.files)} files ({manifest.total_bytes / 2**20:.1f} MiB) to "
        f"{loc.url} in {seconds:.1f} s\nrevision {manifest.revision}"
    )


@app.command()
def explain(model: str, etcd: Etcd = "", prefix: Prefix = SERVICE.prefix) -> None:
    """Why MODEL sits where it does: each node's rejecting filter, or its scores (last round)."""
    asyncio.run(_explain(default_etcd(etcd), prefix, model))


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
        raise fail(f"cannot read etcd at {etcd}: {type(e).__name__}: {e}") from None
    finally:
        await client.close()
    if not got:
        raise fail("no scheduler is running (nobody campaigns for leadership)")
    address = cluster_pb2.SchedulerCandidate.FromString(got[0].value).address
    async with open_channel(address) as ch:
        try:
            out = await scheduler_pb2_grpc.SchedulerStub(ch).Explain(
                scheduler_pb2.ExplainRequest(model=model), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise fail(f"{e.code().name}: {e.details()}") from None
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
