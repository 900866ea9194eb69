"""Typed access to etcd: protobuf values in, protobuf values out (DESIGN §4).

Only services/cluster talks to aetcd; everything else goes through `Store`, `Session`,
`Election` and `Mirror`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher
from google.protobuf.message import Message
from meshserve import tls
from meshserve.cluster.keys import Keyspace

M = TypeVar("M", bound=Message)
T = TypeVar("T")


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is: ``host:port``, or the members of a cluster as ``host:port,host:port,…``
    (the client fails over between them)."""

    endpoint: str = "127.0.0.1:2379"
    timeout_s: float = 5.0  # per unary call

    def __post_init__(self) -> None:
        for one in self.endpoints:
            host, _, port = one.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"etcd endpoint must be host:port[,host:port…], got {one!r}")

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(e.strip() for e in self.endpoint.split(",") if e.strip())

    @property
    def target(self) -> str:
        """The gRPC target: one endpoint as it is (a DNS name may resolve to every member, as a
        Kubernetes headless Service does); several as a static address list (names resolved
        now), which gRPC's round-robin policy spreads calls over and fails over between."""
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        addresses = []
        for one in self.endpoints:
            host, _, port = one.rpartition(":")
            ip = host.strip("[]")
            with contextlib.suppress(OSError):
                ip = str(socket.getaddrinfo(ip, int(port), type=socket.SOCK_STREAM)[0][4][0])
            addresses.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
        return f"{scheme}:{','.join(addresses)}"


def connect(config: EtcdConfig) -> aetcd.Client:
    """A client; it connects lazily and reconnects unary calls by itself after an etcd restart,
    to another member when one is down (round robin over a cluster's members). Over mutual TLS
    when the process has TLS files (rpc/tls.py): etcd started with ``--client-cert-auth`` then
    takes the certificate's common name as the user (RBAC)."""
    options = {
        # A member cut off by a partition is silent: its connection is found dead (and round
        # robin leaves it) within 6 + 2 s. etcd refuses pings more often than every 5 s
        # (--grpc-keepalive-min-time) with GOAWAY too_many_pings.
        "grpc.keepalive_time_ms": 6_000,
        "grpc.keepalive_timeout_ms": 2_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.lb_policy_name": "round_robin",
    }
    files = tls.configured()
    credentials = tls.channel_credentials(files) if files is not None else None
    return EtcdClient(config.target, credentials, timeout=config.timeout_s, options=options)


class EtcdClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a target of our choosing (a member list) and, where the process has
    TLS files, over a TLS channel (aetcd itself dials one plaintext ``host:port``). Its `connect`
    mirrors aetcd 1.0.0's; user/password auth is not used: the client certificate is the
    identity."""

    def __init__(
        self, target: str, credentials: grpc.ChannelCredentials | None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._target = target
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if bool(getattr(self, "_is_connecting", False)):  # another task connects: wait
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            options = list(self._options.items())
            if self._credentials is None:
                self.channel = grpc.aio.insecure_channel(self._target, options=options)
            else:
                self.channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=options
                )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One stored value with the revisions that fencing and watches need."""

    key: bytes
    value: T
    create_revision: int
    mod_revision: int
    lease: int


class Store:
    """Get, list, put and delete protobuf values."""

    def __init__(self, client: aetcd.Client, keys: Keyspace) -> None:
        self.client = client
        self.keys = keys

    async def get(self, key: bytes, kind: type[M]) -> M | None:
        got = await self.client.get(key)
        return None if got is None else kind.FromString(got.value)

    async def list(self, prefix: bytes, kind: type[M]) -> tuple[list[Entry[M]], int]:
        """All values under ``prefix`` and the store revision they were read at."""
        got = await self.client.get_prefix(prefix)
        entries = [
            Entry(kv.key, kind.FromString(kv.value), kv.create_revision, kv.mod_revision, kv.lease)
            for kv in got.kvs
        ]
        return entries, got.header.revision

    async def put(self, key: bytes, value: Message, lease: int | None = None) -> int:
        """Writes ``value``; returns the revision of the write."""
        put = await self.client.put(key, value.SerializeToString(), lease=lease)
        return int(put.header.revision)

    async def delete(self, key: bytes) -> bool:
        return await self.client.delete(key) is not None

    async def txn_if_created_at(
        self,
        guard_key: bytes,
        guard_create_revision: int,
        puts: Sequence[tuple[bytes, Message]],
        deletes: Sequence[bytes],
    ) -> bool:
        """Applies all puts and deletes atomically iff ``guard_key`` still has that create revision.

        This is the fencing write: the guard is the leader key, so a deposed leader (whose key was
        deleted or recreated) cannot write. Returns False when the guard failed; nothing is written.
        """
        tx = self.client.transactions
        ops: list[Any] = [tx.put(k, v.SerializeToString()) for k, v in puts]
        ops += [tx.delete(k) for k in deletes]
        ok, _ = await self.client.transaction(
            compare=[tx.create(guard_key) == guard_create_revision], success=ops, failure=[]
        )
        return bool(ok)
