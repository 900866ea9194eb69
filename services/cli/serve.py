"""`meshserve agent | scheduler | router`: run one service. Every option's default is its
config's; flags also read ``MESHSERVE_*`` variables."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from meshserve.cli.common import (
    SERVICE,
    AdvertiseHost,
    Etcd,
    LeaseTtl,
    Listen,
    MetricsPort,
    Prefix,
    ReadyFile,
    TlsCa,
    TlsCert,
    TlsKey,
    fail,
)
from meshserve.config import ServiceConfig
from meshserve.nodeagent.config import AgentConfig
from meshserve.router.config import DEFAULT_LISTEN, RouterConfig
from meshserve.scheduler.config import SchedulerConfig

app = typer.Typer()


def configure_tls(cert: str, key: str, ca: str, client_auth: str = "") -> None:
    """Mutual TLS for the process and its children (meshserve.tls); ValueError/OSError on bad
    files, at start-up."""
    from meshserve import tls

    tls.configure(cert, key, ca, client_auth)


def service(
    listen: str,
    advertise_host: str,
    etcd: str,
    prefix: str,
    lease_ttl: int,
    metrics_port: int,
    ready_file: str,
) -> ServiceConfig:
    """The shared block from the shared options (validated there)."""
    return ServiceConfig(listen, advertise_host, etcd, prefix, lease_ttl, metrics_port, ready_file)


@app.command()
def agent(
    node_id: Annotated[str, typer.Option("--node-id", envvar="MESHSERVE_NODE_ID")] = "",
    listen: Listen = SERVICE.listen,
    advertise_host: AdvertiseHost = SERVICE.advertise_host,
    etcd: Etcd = SERVICE.etcd,
    prefix: Prefix = SERVICE.prefix,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = AgentConfig.device,
    memory_limit: Annotated[
        str, typer.Option(envvar="MESHSERVE_MEMORY_LIMIT", help="cap on model memory, e.g. 2GiB")
    ] = "",
    host_memory_limit: Annotated[
        str, typer.Option(help="CPU RAM for offloaded models, e.g. 64GiB; default half the host's")
    ] = "",
    cache_dir: Annotated[
        str, typer.Option(envvar="MESHSERVE_CACHE_DIR", help="disk tier; ~/.cache/meshserve/<node>")
    ] = AgentConfig.cache_dir,
    artifact_cache_size: Annotated[
        str,
        typer.Option(
            help="bytes of registry weights cached here, e.g. 200GiB; default half the disk"
        ),
    ] = "",
    lease_ttl: LeaseTtl = SERVICE.lease_ttl_s,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = AgentConfig.threads,
    max_in_flight: Annotated[
        int, typer.Option(help="streams per model before RESOURCE_EXHAUSTED")
    ] = AgentConfig.max_in_flight,
    drain_grace: Annotated[
        float,
        typer.Option(
            envvar="MESHSERVE_DRAIN_GRACE",
            help="seconds a stopping agent lets its streams run; then routers move them",
        ),
    ] = AgentConfig.drain_grace_s,
    load_retry: Annotated[
        float,
        typer.Option(
            envvar="MESHSERVE_LOAD_RETRY",
            help="seconds before a FAILED replica that is still placed here is loaded again",
        ),
    ] = AgentConfig.load_retry_s,
    label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    decode_tokens_per_s: Annotated[
        float,
        typer.Option(
            help="each device's decode tokens/s at full load, until measured here; 0 = unknown"
        ),
    ] = AgentConfig.decode_tokens_per_s,
    simulate: Annotated[
        int,
        typer.Option(
            help="run N simulated agents in this process (for engine: sim models): node ids "
            "<node-id>-0..N-1, each with its own lease and port; --memory-limit is each one's"
        ),
    ] = 0,
    metrics_port: MetricsPort = SERVICE.metrics_port,
    ready_file: ReadyFile = SERVICE.ready_file,
    tls_cert: TlsCert = "",
    tls_key: TlsKey = "",
    tls_ca: TlsCa = "",
) -> None:
    """Run a node agent: report devices, load what the scheduler places here, serve inference."""
    from meshserve.lifecycle.runtime import run_loop
    from meshserve.nodeagent.main import run
    from meshserve.sizes import parse_bytes

    try:
        configure_tls(tls_cert, tls_key, tls_ca)
        pairs = [x.split("=", 1) for x in label or []]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("--label takes key=value")
        kwargs: dict[str, Any] = {"node_id": node_id} if node_id else {}
        config = AgentConfig(
            service=service(
                listen, advertise_host, etcd, prefix, lease_ttl, metrics_port, ready_file
            ),
            device=device,
            memory_limit_bytes=parse_bytes(memory_limit) if memory_limit else 0,
            host_memory_limit_bytes=parse_bytes(host_memory_limit) if host_memory_limit else 0,
            cache_dir=cache_dir,
            artifact_cache_bytes=parse_bytes(artifact_cache_size) if artifact_cache_size else 0,
            threads=threads,
            max_in_flight=max_in_flight,
            drain_grace_s=drain_grace,
            load_retry_s=load_retry,
            labels=tuple((k, v) for k, v in pairs),
            decode_tokens_per_s=decode_tokens_per_s,
            **kwargs,
        )
        if simulate < 0 or (simulate and not memory_limit):
            raise ValueError("--simulate N needs N >= 0 and --memory-limit (each agent's memory)")
    except (ValueError, OSError) as e:
        raise fail(str(e)) from None
    run_loop(run(config, simulate))


@app.command()
def scheduler(
    scheduler_id: Annotated[str, typer.Option("--id", envvar="MESHSERVE_SCHEDULER_ID")] = "",
    listen: Listen = SERVICE.listen,
    advertise_host: AdvertiseHost = SERVICE.advertise_host,
    etcd: Etcd = SERVICE.etcd,
    prefix: Prefix = SERVICE.prefix,
    lease_ttl: LeaseTtl = SERVICE.lease_ttl_s,
    resync: Annotated[
        float, typer.Option(help="full round at least every N s")
    ] = SchedulerConfig.resync_s,
    profile: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_SCHEDULER_PROFILE",
            help="YAML: filters, scorers (weights), strategy, eviction (see README)",
        ),
    ] = "",
    metrics_port: MetricsPort = SERVICE.metrics_port,
    ready_file: ReadyFile = SERVICE.ready_file,
    tls_cert: TlsCert = "",
    tls_key: TlsKey = "",
    tls_ca: TlsCa = "",
) -> None:
    """Run a scheduler (leader-elected; standbys take over when the leader's lease ends)."""
    import yaml
    from meshserve.lifecycle.runtime import run_loop
    from meshserve.scheduler.main import run
    from meshserve.scheduler.profile import load_profile

    try:
        configure_tls(tls_cert, tls_key, tls_ca)
        kwargs: dict[str, Any] = {"scheduler_id": scheduler_id} if scheduler_id else {}
        if profile:
            with open(profile) as f:
                kwargs["profile"] = load_profile(yaml.safe_load(f))
        config = SchedulerConfig(
            service=service(
                listen, advertise_host, etcd, prefix, lease_ttl, metrics_port, ready_file
            ),
            resync_s=resync,
            **kwargs,
        )
    except (ValueError, OSError, yaml.YAMLError) as e:
        raise fail(str(e)) from None
    run_loop(run(config))


def parse_weights(text: str) -> dict[str, float]:
    """``affinity=4,kv=2,load=1`` → a mapping (checked by RouterConfig); raises ValueError."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--routing-weights: {part!r} is not scorer=weight")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--routing-weights: {part!r}: the weight is not a number") from None
    return out


@app.command()
def router(
    router_id: Annotated[str, typer.Option("--id", envvar="MESHSERVE_ROUTER_ID")] = "",
    listen: Listen = DEFAULT_LISTEN,
    advertise_host: AdvertiseHost = SERVICE.advertise_host,
    etcd: Etcd = SERVICE.etcd,
    prefix: Prefix = SERVICE.prefix,
    lease_ttl: LeaseTtl = SERVICE.lease_ttl_s,
    max_attempts: Annotated[
        int, typer.Option(help="replicas tried before the first token")
    ] = RouterConfig.max_attempts,
    queue_per_model: Annotated[
        int, typer.Option(help="requests held per model while it cold-starts")
    ] = RouterConfig.queue_per_model,
    queue_timeout: Annotated[
        float, typer.Option(help="longest cold-start wait, s")
    ] = RouterConfig.queue_timeout_s,
    stall_floor: Annotated[
        float,
        typer.Option(
            help="a paced stream moves to another replica after this much silence at least, s "
            "(raise it on shared or CPU hosts, where a replica may pause for seconds)",
        ),
    ] = RouterConfig.stall_floor_s,
    tenants: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_TENANTS",
            help="tenants YAML (watched): turns auth on; see `meshserve tenant --help`",
        ),
    ] = "",
    tenants_from_etcd: Annotated[
        bool, typer.Option(help="tenants from etcd's config/tenants (auth on)")
    ] = False,
    http_listen: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_HTTP_LISTEN", help="OpenAI-compatible HTTP on host:port; '' = off"
        ),
    ] = RouterConfig.http_listen,
    fair_queueing: Annotated[
        bool, typer.Option(help="queue by priority, then fair shares across tenants; off: FIFO")
    ] = RouterConfig.fair_queueing,
    routing_weights: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_ROUTING_WEIGHTS",
            help="routing profile: scorer=weight,... of affinity, kv, load (default 4, 2, 1); "
            "a model's `routing:` wins",
        ),
    ] = "",
    workers: Annotated[
        int,
        typer.Option(
            envvar="MESHSERVE_ROUTER_WORKERS",
            help="router processes sharing the port (SO_REUSEPORT); worker i's metrics on "
            "metrics-port + i",
        ),
    ] = 1,
    metrics_port: MetricsPort = SERVICE.metrics_port,
    ready_file: ReadyFile = SERVICE.ready_file,
    tls_cert: TlsCert = "",
    tls_key: TlsKey = "",
    tls_ca: TlsCa = "",
    tls_client_auth: Annotated[
        str,
        typer.Option(
            envvar="MESHSERVE_TLS_CLIENT_AUTH",
            help="require: clients need a certificate; optional: TLS, API keys authenticate",
        ),
    ] = "",
) -> None:
    """Run a router: the one Inference endpoint clients call."""
    from pathlib import Path

    from meshserve.lifecycle.runtime import run_loop
    from meshserve.router.main import run
    from meshserve.router.tenancy.tenants import parse_book

    try:
        configure_tls(tls_cert, tls_key, tls_ca, tls_client_auth)
        if tenants:
            parse_book(Path(tenants).read_bytes())  # a bad file stops here, with its problem
        kwargs: dict[str, Any] = {"router_id": router_id} if router_id else {}
        config = RouterConfig(
            service=service(
                listen, advertise_host, etcd, prefix, lease_ttl, metrics_port, ready_file
            ),
            max_attempts=max_attempts,
            queue_per_model=queue_per_model,
            queue_timeout_s=queue_timeout,
            stall_floor_s=stall_floor,
            tenants_file=tenants,
            tenants_from_etcd=tenants_from_etcd,
            fair_queueing=fair_queueing,
            http_listen=http_listen,
            routing_weights=parse_weights(routing_weights),
            **kwargs,
        )
    except (ValueError, OSError) as e:
        raise fail(f"{tenants}: {e}" if tenants else str(e)) from None
    if not 1 <= workers <= 256:
        raise fail(f"--workers must be in 1..256, got {workers}")
    if workers > 1:
        from meshserve.router.workers import run_workers

        try:
            run_loop(run_workers(config, workers))
        except (OSError, RuntimeError) as e:
            raise fail(str(e)) from None
        return
    run_loop(run(config))
