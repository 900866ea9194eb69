"""What every `meshserve` command shares: consoles, the local mesh's state file, errors, and the
options whose defaults come from the configs (never restated here)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from meshserve.config import ServiceConfig
from rich.console import Console

console = Console()
err = Console(stderr=True)

HOME = Path(os.environ.get("MESHSERVE_HOME", Path.home() / ".meshserve"))
STATE = "state.json"  # written by `meshserve up`: where its router and etcd are
SERVICE = ServiceConfig()  # the shared block's defaults

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
Listen = Annotated[str, typer.Option(envvar="MESHSERVE_LISTEN", help="host:port to serve on")]
AdvertiseHost = Annotated[
    str, typer.Option(envvar="MESHSERVE_ADVERTISE_HOST", help="host others dial; default listen's")
]


TlsCert = Annotated[
    str,
    typer.Option(envvar="MESHSERVE_TLS_CERT", help="PEM certificate: mutual TLS on (with key, CA)"),
]
TlsKey = Annotated[str, typer.Option(envvar="MESHSERVE_TLS_KEY", help="PEM private key")]
TlsCa = Annotated[
    str, typer.Option(envvar="MESHSERVE_TLS_CA", help="PEM CA bundle peers must chain to")
]


def state() -> dict[str, Any]:
    path = HOME / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def default_etcd(value: str) -> str:
    """``--etcd`` as given, else the local mesh's, else the default."""
    return value or state().get("etcd", SERVICE.etcd)


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)
