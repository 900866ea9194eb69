"""The ``meshserve`` command: run a service (serve.py), run the whole mesh here (local.py), and
talk to a mesh (inspect.py)."""

from __future__ import annotations

import typer
from meshserve.cli import inspect, local, serve, tenancy

app = typer.Typer(
    help="meshserve: serve many models on a fleet of GPU hosts.", no_args_is_help=True
)
for part in (serve.app, local.app, inspect.app, tenancy.app):
    app.registered_commands += part.registered_commands
app.add_typer(inspect.model_app, name="model")
app.add_typer(tenancy.tenant_app, name="tenant")


def main() -> None:
    app()
