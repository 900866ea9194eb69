"""Runs a whole mesh on this machine as real processes: etcd, schedulers, node agents, router.

`meshserve up` uses it, and so do the end-to-end tests: each service is the same
``python -m meshserve <service>`` a production host runs, started with a ready file that the
launcher waits for (no sleeps), its output in ``<data-dir>/logs/<name>.log``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml
from meshserve.cluster.etcd_process import EtcdCluster, EtcdProcess, EtcdSecurity, free_port
from meshserve.lifeline import tied_to_parent


class Hosting(Protocol):
    """Where each service runs, when not all on this host's loopback (meshserve.netns: each
    in a network namespace of its own, so that links between them can be cut)."""

    def address(self, service: str) -> str:
        """The address ``service`` serves on."""

    def wrap(self, service: str, argv: list[str]) -> list[str]:
        """``argv`` as run where ``service`` lives."""


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_file: Path
    address: str = ""
    info: dict[str, str] = field(default_factory=dict)  # the ready file (address, http …)

    def alive(self) -> bool:
        return self.proc.poll() is None


class Mesh:
    def __init__(
        self,
        data_dir: Path,
        lease_ttl_s: int = 3,
        trace_dir: Path | None = None,
        env: dict[str, str] | None = None,
        tls: bool = False,
        metrics: bool = False,
        etcd_members: int = 1,
        hosting: Hosting | None = None,
    ) -> None:
        """``tls``: a local CA in ``data_dir``/tls; every hop (etcd included, with etcd auth)
        is mutual TLS; `tls_env` is what a client process needs to reach it. ``metrics``: each
        service serves Prometheus metrics on a free loopback port (`prometheus_config`).
        ``etcd_members`` > 1: etcd as a plaintext cluster of that many members on loopback;
        services get every member's address and fail over between them. ``hosting``: every
        service on an address of its own (etcd as "etcd", or "etcd-<i>" for member i; each
        in a network namespace of its own: meshserve.netns, for partitions)."""
        if etcd_members > 1 and tls:
            raise ValueError("a TLS mesh runs one etcd member")
        self.data_dir = data_dir.resolve()
        self.metrics = metrics
        self.metrics_targets: dict[str, str] = {}  # service name → host:port of its /metrics
        self.lease_ttl_s = lease_ttl_s
        self.trace_dir = trace_dir
        self.env = dict(env or {})
        self.tls_env: dict[str, str] = {}
        security = self._make_pki() if tls else None
        self.env.update(self.tls_env)
        self.hosting = hosting
        self.etcd: EtcdProcess | EtcdCluster
        if etcd_members > 1 and hosting is not None:  # member i lives on host "etcd-<i>"
            names = [f"etcd-{i}" for i in range(etcd_members)]
            self.etcd = EtcdCluster(
                self.data_dir / "etcd",
                etcd_members,
                [hosting.address(n) for n in names],
                [functools.partial(hosting.wrap, n) for n in names],
            )
        elif etcd_members > 1:
            self.etcd = EtcdCluster(self.data_dir / "etcd", etcd_members)
        elif hosting is not None:
            self.etcd = EtcdProcess(
                self.data_dir / "etcd",
                security=security,
                host=hosting.address("etcd"),
                wrap=lambda argv: hosting.wrap("etcd", argv),
            )
        else:
            self.etcd = EtcdProcess(self.data_dir / "etcd", security=security)
        self.services: dict[str, Service] = {}
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True)

    def _make_pki(self) -> EtcdSecurity:
        from meshserve.certs import make_ca
        from meshserve.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles

        pki = make_ca(self.data_dir / "tls")
        ca = str(pki.ca)
        issued = {n: pki.issue(n) for n in ("meshserve", "etcd", "root")}
        files = {n: TlsFiles(str(i.cert), str(i.key), ca) for n, i in issued.items()}
        ours = files["meshserve"]
        self.tls_env = {ENV_CERT: ours.cert, ENV_KEY: ours.key, ENV_CA: ours.ca}
        return EtcdSecurity(server=files["etcd"], admin=files["root"], user="meshserve")

    def start_etcd(self) -> None:
        self.etcd.start()

    def _spawn(
        self,
        name: str,
        args: list[str],
        timeout_s: float = 90.0,
        python: str = "",
        env: dict[str, str] | None = None,
    ) -> Service:
        """Starts ``python -m meshserve ARGS`` (this interpreter unless ``python`` names another,
        e.g. an agent in the vLLM environment; ``env`` on top of the mesh's) and waits for its
        ready file."""
        if self.metrics and "--metrics-port" not in args:
            port = free_port()
            self.metrics_targets[name] = f"127.0.0.1:{port}"
            args = [*args, "--metrics-port", str(port)]
        ready = self.data_dir / "run" / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log = self.data_dir / "logs" / f"{name}.log"
        env = {**os.environ, **self.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        if self.trace_dir is not None:
            env["MESHSERVE_TRACE_DIR"] = str(self.trace_dir)
        out = open(log, "ab")  # noqa: SIM115 - the child keeps it
        argv = [python or sys.executable, "-m", "meshserve", *args, "--ready-file", str(ready)]
        if self.hosting is not None:  # on an address of its own, where it lives
            host = self.hosting.address(name)
            argv += ["--listen", f"{host}:0", "--advertise-host", host]
            argv = self.hosting.wrap(name, argv)
        # Tied to this process: if it dies without stopping the mesh, the service gets SIGTERM.
        proc = subprocess.Popen(
            tied_to_parent(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        out.close()
        service = Service(name, proc, log, ready)
        self.services[name] = service
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready in {timeout_s} s:\n{self.tail(name)}")
            time.sleep(0.05)
        service.info = json.loads(ready.read_text())
        service.address = service.info["address"]
        return service

    def start_scheduler(self, name: str = "scheduler-0", extra: Sequence[str] = ()) -> Service:
        """``extra``: more scheduler flags (``--metrics-port`` …)."""
        return self._spawn(
            name,
            [
                "scheduler",
                "--id",
                name,
                "--etcd",
                self.etcd.endpoint,
                "--lease-ttl",
                str(self.lease_ttl_s),
                *extra,
            ],
        )

    def start_agent(
        self,
        name: str,
        memory_limit: str = "",
        threads: int = 1,
        device: str = "auto",
        host_memory_limit: str = "",
        python: str = "",
        timeout_s: float = 90.0,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Service:
        """Starts (or restarts, under the same name) a node agent; ``extra``: more flags;
        ``env``: variables of its own (e.g. a stand-in NVML's host description)."""
        args = [
            "agent",
            "--node-id",
            name,
            "--etcd",
            self.etcd.endpoint,
            "--lease-ttl",
            str(self.lease_ttl_s),
            "--threads",
            str(threads),
            "--device",
            device,
        ]
        args += ["--cache-dir", str(self.data_dir / "cache" / name)]
        if memory_limit:
            args += ["--memory-limit", memory_limit]
        if host_memory_limit:
            args += ["--host-memory-limit", host_memory_limit]
        args += extra
        return self._spawn(name, args, timeout_s=timeout_s, python=python, env=env)

    def start_router(
        self, name: str = "router", listen: str = "127.0.0.1:0", extra: Sequence[str] = ()
    ) -> Service:
        """``extra``: more router flags (``--tenants FILE`` …)."""
        return self._spawn(
            name,
            [
                "router",
                "--id",
                name,
                "--listen",
                listen,
                "--etcd",
                self.etcd.endpoint,
                "--lease-ttl",
                str(self.lease_ttl_s),
                *extra,
            ],
        )

    def prometheus_config(self, interval_s: int = 5) -> str:
        """A Prometheus configuration that scrapes every service started so far (label ``app``:
        router, nodeagent, scheduler; ``instance``: the service's name) and loads the alert rules
        of deploy/prometheus when this is a source checkout."""
        apps = {"router": "router", "scheduler": "scheduler"}
        targets = [
            {
                "targets": [address],
                "labels": {"app": apps.get(name.split("-")[0], "nodeagent"), "instance": name},
            }
            for name, address in sorted(self.metrics_targets.items())
        ]
        config: dict[str, object] = {
            "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"}
        }
        rules = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules.yaml"
        if rules.exists():
            config["rule_files"] = [str(rules)]
        config["scrape_configs"] = [{"job_name": "meshserve", "static_configs": targets}]
        header = f"# meshserve up: Prometheus for the local mesh in {self.data_dir}\n"
        return header + yaml.safe_dump(config, sort_keys=False)

    def send(self, name: str, sig: int) -> None:
        """Sends ``sig`` (SIGSTOP, SIGCONT, SIGTERM …) without waiting for anything."""
        s = self.services[name]
        if s.alive():
            os.kill(s.proc.pid, sig)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        s = self.services[name]
        if s.alive():
            os.kill(s.proc.pid, sig)
            s.proc.wait(30)

    def tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join(
                self.services[name].log.read_text(errors="replace").splitlines()[-lines:]
            )
        except (OSError, KeyError):
            return ""

    def stop(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM in dependency order (router, agents, schedulers), then etcd. Returns the exit
        code of each service that was running: 0 is a clean stop; a service still running at
        ``timeout_s`` is SIGKILLed (with its children, e.g. vLLM's engine cores) and reported
        as -9."""
        order = sorted(
            (s for s in self.services.values() if s.alive()),
            key=lambda s: (
                0 if s.name.startswith("router") else 2 if s.name.startswith("scheduler") else 1
            ),
        )
        for s in order:
            s.proc.send_signal(signal.SIGTERM)
            s.proc.send_signal(signal.SIGCONT)  # a stopped one (a test's SIGSTOP) must see it
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for s in order:
            try:
                codes[s.name] = s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # its children too (vLLM's cores)
                    os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
                codes[s.name] = -signal.SIGKILL
        self.etcd.stop()
        return codes
