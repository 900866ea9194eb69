"""``meshserve router --workers N``: N router processes sharing one port (SO_REUSEPORT).

One Python process moves about 10 k streamed messages per CPU-second; a host with more cores
runs more routers. The kernel spreads incoming connections over the workers' listening sockets
(by 4-tuple hash), so a client's channel stays on one worker and its streams with it.

Each worker is a whole router: its own etcd session, watches, route table, admission queues and
breakers, and its own router id (``<id>-w<i>``), under which it publishes its demand and its
per-tenant rates — the scheduler and the other routers merge those across routers already, so
a worker is, to the mesh, one more router (cluster-wide tenant limits are shared among workers as
among routers). Worker ``i`` serves Prometheus metrics on ``metrics_port + i`` (when set).

This parent holds no etcd session and serves nothing: it reserves the ports (a bound,
non-listening SO_REUSEPORT socket, so ``--listen host:0`` picks one port for all and a restarted
worker gets it back), starts the workers (tied to it: they die with it), writes one ready file
when every worker is ready, restarts a worker that dies (backoff 1 s doubling to 30 s), and on
SIGTERM/SIGINT stops them all gracefully (each drains as a single router does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from meshserve.lifecycle.runtime import write_ready_file
from meshserve.lifeline import tied_to_parent
from meshserve.router.config import RouterConfig

log = logging.getLogger("meshserve.router.workers")
ENV_CONFIG = "MESHSERVE_ROUTER_WORKER_CONFIG"  # the worker's RouterConfig, from its parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0  # a worker's grace (5 s) + its stop budget (5 s) + margin
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker up this long restarts without backoff if it dies


def reserve(address: str) -> tuple[socket.socket, str]:
    """Binds (without listening) an SO_REUSEPORT socket on ``host:port`` so that the workers can
    share it; port 0 picks one. Returns the socket (keep it open) and ``host:port``."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, int(port)))
    except OSError as e:
        sock.close()
        raise OSError(f"router workers cannot listen on {address}: {e}") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


def worker_config(
    config: RouterConfig, index: int, listen: str, http: str, ready: Path
) -> RouterConfig:
    service = dataclasses.replace(
        config.service,
        listen=listen,
        reuse_port=True,
        metrics_port=config.service.metrics_port + index if config.service.metrics_port else 0,
        ready_file=str(ready),
    )
    return dataclasses.replace(
        config, service=service, router_id=f"{config.router_id}-w{index}", http_listen=http
    )


class Worker:
    def __init__(self, index: int, config: RouterConfig) -> None:
        self.index = index
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.info: dict[str, object] = {}

    @property
    def ready_file(self) -> Path:
        return Path(self.config.service.ready_file)

    async def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env[ENV_CONFIG] = base64.b64encode(pickle.dumps(self.config)).decode()
        argv = tied_to_parent([sys.executable, "-m", "meshserve.router.workers"])
        self.proc = await asyncio.create_subprocess_exec(*argv, env=env)
        self.started = time.monotonic()

    async def ready(self, timeout_s: float) -> None:
        """Waits for the worker's ready file; RuntimeError if it exits first or is late."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"router worker {self.index} exited with {self.proc.returncode} at start-up"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"router worker {self.index} not ready in {timeout_s:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 0.05)
        self.info = json.loads(self.ready_file.read_text())

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error(
                "router worker %d did not stop in %.0f s; killing it", self.index, STOP_TIMEOUT_S
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def run_workers(config: RouterConfig, count: int) -> None:
    """Runs ``count`` router workers until SIGTERM or SIGINT (see the module docstring)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    grpc_sock, listen = reserve(config.service.listen)
    http_sock = None
    http = ""
    if config.http_listen:
        http_sock, http = reserve(config.http_listen)
    with tempfile.TemporaryDirectory(prefix="meshserve-router-") as run_dir:
        workers = [
            Worker(i, worker_config(config, i, listen, http, Path(run_dir) / f"w{i}.ready"))
            for i in range(count)
        ]
        try:
            for w in workers:
                await w.start()
            await asyncio.gather(*(w.ready(START_TIMEOUT_S) for w in workers))
            info: dict[str, object] = {
                "router_id": config.router_id,
                "workers": [
                    {"pid": w.info.get("pid"), "router_id": w.config.router_id} for w in workers
                ],
            }
            if http:
                info["http"] = workers[0].info.get("http", http)
            address = str(workers[0].info["address"])
            write_ready_file(config.service.ready_file, address=address, **info)
            log.info("router: %d workers serving on %s", count, address)
            keepers = [asyncio.create_task(_keep(w, stop)) for w in workers]
            await stop.wait()
            for k in keepers:
                k.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            log.info("router: stopping %d workers", count)
            await asyncio.gather(*(w.stop() for w in workers))
            grpc_sock.close()
            if http_sock is not None:
                http_sock.close()


async def _keep(worker: Worker, stop: asyncio.Event) -> None:
    """Restarts ``worker`` whenever it exits before the parent is told to stop."""
    backoff = 1.0
    while not stop.is_set():
        assert worker.proc is not None
        code = await worker.proc.wait()
        if stop.is_set():
            return
        up = time.monotonic() - worker.started
        if up > HEALTHY_AFTER_S:
            backoff = 1.0
        log.error(
            "router worker %d (pid %d) exited with %d after %.0f s; restarting in %.0f s",
            worker.index,
            worker.proc.pid,
            code,
            up,
            backoff,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        if stop.is_set():
            return
        backoff = min(backoff * 2, BACKOFF_MAX_S)
        await worker.start()
        try:
            await worker.ready(START_TIMEOUT_S)
        except RuntimeError as e:
            log.error("%s", e)


def main() -> None:
    """A worker: the config its parent passed, run as a single router."""
    from meshserve.lifecycle.runtime import run_loop
    from meshserve.router.main import run

    config = pickle.loads(base64.b64decode(os.environ.pop(ENV_CONFIG)))
    if not isinstance(config, RouterConfig):
        sys.exit("router worker: no RouterConfig from the parent")
    run_loop(run(config))


if __name__ == "__main__":
    main()
