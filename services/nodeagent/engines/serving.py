"""What every engine (torch LLM, torch tensor, vLLM, sim) keeps alike: where its weights are
(``tier``), its streams in flight, and the one refusal while it cannot serve."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshserve.kvblocks import Event
from meshserve.nodeagent.engines.prompts import no_adapters, not_serving
from meshserve.v1 import cluster_pb2


class Serving:
    _tier = 0  # cluster_pb2.Tier of the weights; 0: not loaded
    _in_flight = 0  # streams being generated now (engines count their own)
    # Prefix caching: the KV block size in tokens (0: the engine keeps no prefix cache), and
    # where an engine that reports its blocks sends each batch of block events (the agent sets
    # it, nodeagent.kvevents); engines that cannot report leave ``kv_reports`` False.
    _kv_block_tokens = 0
    kv_reports = False
    kv_sink: Callable[[Sequence[Event]], None] | None = None

    @property
    def tier(self) -> int:
        """Where the weights are now (cluster_pb2.Tier)."""
        return self._tier

    @property
    def kv_block_tokens(self) -> int:
        """The KV block size in tokens (0: no prefix cache)."""
        return self._kv_block_tokens

    @property
    def in_flight(self) -> int:
        """Streams being generated now."""
        return self._in_flight

    def _refuse_unless_serving(self, name: str, loaded: bool) -> None:
        """Raises `not_serving` (UNAVAILABLE, with where the weights are) unless the model is
        ``loaded`` and its weights are on the device."""
        if not loaded or self._tier != cluster_pb2.TIER_DEVICE:
            raise not_serving(name, self._tier)

    async def load_adapter(self, name: str, path: str) -> None:
        raise no_adapters(type(self).__name__)

    async def unload_adapter(self, name: str) -> None:
        raise no_adapters(type(self).__name__)
