"""Transport security for every gRPC hop (and etcd): mutual TLS from PEM files.

One process-wide setting, read from ``MESHSERVE_TLS_CERT``, ``MESHSERVE_TLS_KEY`` and
``MESHSERVE_TLS_CA`` (the services' ``--tls-*`` flags set them; children inherit them), like
OpenTelemetry's ``OTEL_*``: servers then listen with TLS and ask clients for a certificate signed
by the CA (``MESHSERVE_TLS_CLIENT_AUTH=optional`` on a router facing clients that use API keys
only), and every channel (router → agent, router → scheduler, CLI → anything, etcd) presents the
certificate and trusts only the CA. Files are re-read when they change: servers on the next
handshake (gRPC's dynamic credentials), channels on their next use (ChannelPool resets them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

ENV_CERT, ENV_KEY, ENV_CA = "MESHSERVE_TLS_CERT", "MESHSERVE_TLS_KEY", "MESHSERVE_TLS_CA"
ENV_CLIENT_AUTH = "MESHSERVE_TLS_CLIENT_AUTH"  # require (default) | optional
CHECK_S = 1.0


@dataclass(frozen=True)
class TlsFiles:
    cert: str  # PEM certificate chain this process presents
    key: str  # its private key
    ca: str  # the CA bundle peers must chain to

    def read(self) -> tuple[bytes, bytes, bytes]:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k, open(self.ca, "rb") as a:
            return c.read(), k.read(), a.read()

    def stamp(self) -> tuple[float, ...]:
        try:
            return tuple(os.stat(p).st_mtime for p in (self.cert, self.key, self.ca))
        except OSError:
            return ()


def configured() -> TlsFiles | None:
    """The process's TLS files, or None (plaintext). ValueError when only some are set."""
    values = [os.environ.get(v, "") for v in (ENV_CERT, ENV_KEY, ENV_CA)]
    if not any(values):
        return None
    if not all(values):
        raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    return TlsFiles(*values)


def configure(cert: str, key: str, ca: str, client_auth: str = "") -> None:
    """Sets the process-wide files (a service's flags); children inherit them."""
    if any((cert, key, ca)):
        os.environ.update({ENV_CERT: cert, ENV_KEY: key, ENV_CA: ca})
        TlsFiles(cert, key, ca).read()  # unreadable files fail at start-up, not at a handshake
    if client_auth:
        if client_auth not in ("require", "optional"):
            raise ValueError(f"--tls-client-auth is require or optional, got {client_auth!r}")
        os.environ[ENV_CLIENT_AUTH] = client_auth
    configured()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that re-read the files when they change (checked at handshakes)."""
    require = os.environ.get(ENV_CLIENT_AUTH, "require") != "optional"
    state = {"stamp": files.stamp()}

    def config() -> Any:
        cert, key, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> Any:
        stamp = files.stamp()
        if stamp and stamp != state["stamp"]:
            state["stamp"] = stamp
            return config()
        return None

    return grpc.dynamic_ssl_server_credentials(
        config(), fetch, require_client_authentication=require
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class Generation:
    """Changes when the TLS files change (checked at most once a second): channels made before
    are replaced."""

    def __init__(self) -> None:
        self._checked = 0.0
        self._stamp: tuple[float, ...] = ()

    def current(self) -> tuple[float, ...]:
        now = time.monotonic()
        if now - self._checked >= CHECK_S:
            self._checked = now
            files = configured()
            self._stamp = files.stamp() if files else ()
        return self._stamp


def open_channel(
    address: str, options: Sequence[tuple[str, Any]] = (), interceptors: Any = None
) -> grpc.aio.Channel:
    """A channel to ``address``: mutual TLS when the process has TLS files, else plaintext."""
    files = configured()
    if files is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, channel_credentials(files), options=options, interceptors=interceptors
    )
