"""Certificates are re-read when their files change: a real gRPC server started with
meshserve's TLS credentials serves a certificate from a new CA after the files are replaced,
without a restart, and channels made by ChannelPool present the new client certificate."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve import tls
from meshserve.certs import make_ca
from meshserve.rpc.channels import ChannelPool
from meshserve.rpc.server import start_server


def install(pki_dir: Path, live: Path, name: str) -> None:
    """Copies a CA's bundle and a certificate issued by it to the live paths (what cert-manager
    does to a mounted Secret)."""
    pki = make_ca(pki_dir, f"CA {pki_dir.name}")
    issued = pki.issue(name)
    for src, dst in ((issued.cert, "tls.crt"), (issued.key, "tls.key"), (pki.ca, "ca.crt")):
        shutil.copyfile(src, live / dst)


async def check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(reply.status)


async def test_replaced_certificates_are_served_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install(tmp_path / "one", live, "meshserve")
    monkeypatch.setenv(tls.ENV_CERT, str(live / "tls.crt"))
    monkeypatch.setenv(tls.ENV_KEY, str(live / "tls.key"))
    monkeypatch.setenv(tls.ENV_CA, str(live / "ca.crt"))
    old = tls.channel_credentials(
        tls.TlsFiles(*(str(live / f) for f in ("tls.crt", "tls.key", "ca.crt")))
    )
    server = await start_server("127.0.0.1:0", [], [])
    address = f"127.0.0.1:{server.port}"
    pool = ChannelPool()
    try:
        assert await check(pool.get(address)) == health_pb2.HealthCheckResponse.SERVING
        install(tmp_path / "two", live, "meshserve")  # a new CA, a new certificate
        pool._tls._checked = 0.0  # the once-a-second check is due now
        # The pool notices the change and dials again with the new client certificate; the
        # server, at that handshake, re-reads its files and trusts only the new CA.
        assert await check(pool.get(address)) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.secure_channel(address, old) as stale:  # still on the old CA
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await check(stale)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await pool.close()
        await server.stop(0)
