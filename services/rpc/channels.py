"""One gRPC channel per peer address, shared by every caller in a process (STYLE: one pool)."""

from __future__ import annotations

import grpc
from meshserve.rpc.server import CHANNEL_OPTIONS
from meshserve.telemetry.tracing import client_interceptors


class ChannelPool:
    """Channels with keepalive (`CHANNEL_OPTIONS`), created on first use and kept until `close`.

    ``traced`` adds OpenTelemetry's client interceptors: right for unary control calls, wrong for
    token streams (they wrap every message; the router injects trace context once per call)."""

    def __init__(self, traced: bool = False) -> None:
        self.traced = traced
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            interceptors = client_interceptors() if self.traced else None
            ch = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS, interceptors=interceptors
            )
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
