"""A local trace UI for `meshserve up --trace-ui`: Arize Phoenix (OTLP/gRPC in, a browsable UI
and a REST API out, SQLite on disk, no network needed) as a supervised child on loopback.

Phoenix pins its own web stack (FastAPI, SQLAlchemy, strawberry …) and moves faster than our
pins, so it lives in an environment of its own, built on first use (about a minute, ~850 MB)
from the exact version of meshserve's ``trace-ui`` extra, and never shares one with meshserve:
``MESHSERVE_PHOENIX_ENV`` names the folder (default ``~/.cache/meshserve/phoenix-VERSION``).
Every service of the mesh exports to it through the standard ``OTEL_*`` variables; spans land in
the Phoenix project ``meshserve`` (resource attribute ``openinference.project.name``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from meshserve.lifeline import tied_to_parent

PROJECT = "meshserve"
DEFAULT_UI_PORT = 6006
DEFAULT_OTLP_PORT = 4317
ENV_DIR = "MESHSERVE_PHOENIX_ENV"
_FALLBACK_REQUIREMENT = "arize-phoenix==20.26.1"  # when meshserve's metadata is not installed


def requirement() -> str:
    """The pinned Phoenix of meshserve's ``trace-ui`` extra (one place: pyproject.toml)."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        for req in metadata.requires("meshserve") or ():
            if req.startswith("arize-phoenix") and "trace-ui" in req:
                return req.split(";")[0].strip()
    return _FALLBACK_REQUIREMENT


def env_dir() -> Path:
    version = requirement().partition("==")[2] or "latest"
    default = Path.home() / ".cache" / "meshserve" / f"phoenix-{version}"
    return Path(os.environ.get(ENV_DIR) or default).expanduser()


def ensure_env(say: Callable[[str], None] = lambda _: None, timeout_s: float = 900.0) -> Path:
    """Phoenix's environment, built when absent or of another version; returns its ``phoenix``
    executable. Raises RuntimeError with pip's last lines when the build fails."""
    root, req = env_dir(), requirement()
    phoenix, marker = root / "bin" / "phoenix", root / "meshserve-requirement.txt"
    if phoenix.exists() and marker.exists() and marker.read_text().strip() == req:
        return phoenix
    say(f"building the trace UI's environment in {root} ({req}, about a minute, once)…")
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(root)]]
    steps.append([str(root / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", req])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise RuntimeError(f"building the trace UI's environment failed:\n{tail}")
    marker.write_text(req + "\n")
    return phoenix


def otel_env(otlp_port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """What every service needs to export its spans to the trace UI, in the Phoenix project
    ``meshserve`` (batches every second: a person is watching)."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{host}:{otlp_port}",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={PROJECT}",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
    }


def _free(port: int) -> bool:
    """Nothing listens on ``port`` (Phoenix binds its OTLP port on every interface)."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free (as for it)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def trace_link(ui: str, trace_id: str) -> str:
    """The UI's page for one trace, whatever project it landed in."""
    return f"{ui}/redirects/traces/{trace_id}" if re.fullmatch(r"[0-9a-f]{32}", trace_id) else ""


@dataclass
class TraceUI:
    """A running Phoenix; `stop` ends it (and its children)."""

    proc: subprocess.Popen[bytes]
    url: str
    otlp_port: int
    log: Path

    @classmethod
    def start(
        cls,
        data_dir: Path,
        ui_port: int = DEFAULT_UI_PORT,
        otlp_port: int = DEFAULT_OTLP_PORT,
        say: Callable[[str], None] = lambda _: None,
        timeout_s: float = 180.0,
    ) -> TraceUI:
        """Starts Phoenix on 127.0.0.1 with its database in ``data_dir``/phoenix and waits until
        it answers; RuntimeError (with its log's tail) when it exits or stays silent."""
        for port, flag in ((ui_port, "--trace-ui-port"), (otlp_port, "--trace-otlp-port")):
            if not _free(port):  # else a running Phoenix would answer our health checks
                raise RuntimeError(f"port {port} is in use (another trace UI?); choose {flag}")
        phoenix = ensure_env(say)
        work = data_dir / "phoenix"
        work.mkdir(parents=True, exist_ok=True)
        log = data_dir / "logs" / "phoenix.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(work),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(ui_port),
            "PHOENIX_GRPC_PORT": str(otlp_port),
            "PHOENIX_TELEMETRY_ENABLED": "false",  # no network here, and none wanted
        }
        for k in [k for k in env if k.startswith("OTEL_")]:
            del env[k]  # Phoenix must not trace itself into itself
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                tied_to_parent([str(phoenix), "serve"]),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ui = cls(proc, f"http://127.0.0.1:{ui_port}", otlp_port, log)
        deadline = time.monotonic() + timeout_s
        while not ui.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                ui.stop()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                why = f"exited with {proc.returncode}" if proc.returncode else "did not answer"
                raise RuntimeError(f"the trace UI (Phoenix) {why}; {log}:\n{tail}")
            time.sleep(0.2)
        return ui

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
