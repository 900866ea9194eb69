"""The trace UI's pieces that need no Phoenix: its pin, its links, its ports, its exporter env."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
from meshserve import traceui

ROOT = Path(__file__).resolve().parents[2]


def test_the_environment_is_built_from_the_trace_ui_extra_pin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(traceui.ENV_DIR, raising=False)  # the default place, named by version
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = extras["optional-dependencies"]["trace-ui"]
    assert traceui.requirement() == pin
    assert traceui.env_dir().name == "phoenix-" + pin.partition("==")[2]


def test_trace_links_only_for_trace_ids() -> None:
    ui = "http://127.0.0.1:6006"
    good = "0af7651916cd43dd8448eb211c80319c"
    assert traceui.trace_link(ui, good) == f"{ui}/redirects/traces/{good}"
    assert traceui.trace_link(ui, "../../etc") == ""
    assert traceui.trace_link(ui, good.upper()) == ""


def test_exporter_env_names_the_project_and_the_port() -> None:
    env = traceui.otel_env(4999)
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:4999"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == "openinference.project.name=meshserve"


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not traceui._free(port)
        with pytest.raises(RuntimeError, match=f"port {port} is in use.*--trace-ui-port"):
            traceui.TraceUI.start(tmp_path, ui_port=port, otlp_port=port + 1)
    # A port whose last connection lingers in TIME_WAIT is free to listen on again.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its port goes to TIME_WAIT
        client.close()
    assert traceui._free(port)
