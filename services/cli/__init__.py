"""The ``meshserve`` command: run a service (serve.py), run the whole mesh here (local.py), and
talk to a mesh (inspect.py, status.py, top.py …)."""

from __future__ import annotations

from meshserve import lifeline

# First thing in a process the agent spawned for vLLM (its engine core and workers re-import the
# agent's main module, hence this one, before anything else): die with the parent.
lifeline.watch_if_asked()

import typer  # noqa: E402
from meshserve.cli import (  # noqa: E402
    inspect,
    local,
    nodes,
    probe,
    route,
    routes,
    serve,
    status,
    tenancy,
    top,
)

app = typer.Typer(
    help="meshserve: serve many models on a fleet of GPU hosts.", no_args_is_help=True
)
for part in (
    serve.app,
    local.app,
    inspect.app,
    status.app,
    tenancy.app,
    probe.app,
    top.app,
    route.app,
):
    app.registered_commands += part.registered_commands
app.add_typer(inspect.model_app, name="model")
app.add_typer(tenancy.tenant_app, name="tenant")
app.add_typer(nodes.node_app, name="node")
app.add_typer(routes.route_app, name="route")


def main() -> None:
    import os

    from meshserve.cli.common import state

    # After `meshserve up --tls`, commands reach that mesh with its certificates by default.
    for name, value in (state().get("tls") or {}).items():
        os.environ.setdefault(name, value)
    app()
