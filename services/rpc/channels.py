"""One gRPC channel per peer address, shared by every caller in a process (STYLE: one pool)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from meshserve import tls
from meshserve.rpc.server import CHANNEL_OPTIONS
from meshserve.telemetry.tracing import client_interceptors


class ChannelPool:
    """Channels with keepalive (`CHANNEL_OPTIONS`), created on first use and kept until `close`.

    ``traced`` adds OpenTelemetry's client interceptors: right for unary control calls, wrong for
    token streams (they wrap every message; the router injects trace context once per call)."""

    def __init__(self, traced: bool = False) -> None:
        self.traced = traced
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._tls = tls.Generation()
        self._generation = self._tls.current()

    def get(self, address: str) -> grpc.aio.Channel:
        generation = self._tls.current()
        if generation != self._generation:  # certificates rotated: new channels present them
            self._generation = generation
            for old in list(self._channels):
                self.reset(old)
        ch = self._channels.get(address)
        if ch is None:
            interceptors = client_interceptors() if self.traced else None
            ch = tls.open_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
            self._channels[address] = ch
        return ch

    def reset(self, address: str) -> None:
        """The next `get` makes a new channel (its reconnect backoff starts afresh); the old one
        closes with a grace period for calls still on it."""
        old = self._channels.pop(address, None)
        if old is not None:
            self._closing.add(asyncio.get_running_loop().create_task(old.close(grace=5.0)))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
        for task in self._closing:
            with contextlib.suppress(Exception):
                await task
