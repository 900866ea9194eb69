"""Workloads of bench/routing.py, as token sequences (deterministic per seed).

- ``shared_prefix``: SGLang's generated-shared-prefix shape: 64 groups, each a 1,024-token system
  prompt shared by its questions of 128 tokens (SGLang's defaults are 2,048 + 128; halved so the
  quick run fits its time), 64 output tokens; a request picks its group uniformly.
- ``multi_turn``: 96 conversations of up to 6 turns; a turn's prompt is the conversation so far
  (a 256-token system prompt, then per earlier turn 128 user + 64 assistant tokens) plus a new
  128-token user message; a conversation that finished its turns starts afresh.
- ``low_sharing``: 1,152 random tokens a prompt: the control where prefix routing cannot help.
- ``mixed_tier``: ``shared_prefix`` with 2 of the 8 replicas asleep in host RAM at the start.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from meshserve.kvblocks import chain, root

from bench.routing_sim import Req

OUT_TOKENS = 64
ROOT = root()


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # shared | chat | random
    asleep: int = 0

    def awake(self) -> Workload:
        """The same load with every replica awake (what capacity is measured on)."""
        return Workload(self.name, self.kind)

    def prompts(self, rng: random.Random) -> Iterator[list[int]]:
        if self.kind == "shared":
            systems = [_tokens(rng, 1024) for _ in range(64)]
            while True:
                yield systems[rng.randrange(64)] + _tokens(rng, 128)
        elif self.kind == "chat":
            convs: list[tuple[list[int], int]] = [(_tokens(rng, 256), 0) for _ in range(96)]
            while True:
                i = rng.randrange(len(convs))
                history, turn = convs[i]
                prompt = history + _tokens(rng, 128)
                convs[i] = (
                    (prompt + _tokens(rng, OUT_TOKENS), turn + 1)
                    if turn + 1 < 6
                    else (_tokens(rng, 256), 0)
                )
                yield prompt
        else:
            while True:
                yield _tokens(rng, 1152)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(4, 32_000) for _ in range(n)]


WORKLOADS = {
    "shared_prefix": Workload("shared_prefix", "shared"),
    "multi_turn": Workload("multi_turn", "chat"),
    "low_sharing": Workload("low_sharing", "random"),
    "mixed_tier": Workload("mixed_tier", "shared", asleep=2),
}


def arrivals(w: Workload, rate: float, n: int, block_tokens: int, seed: int) -> list[Req]:
    """``n`` requests of ``w`` arriving as a Poisson process of ``rate`` per second."""
    rng = random.Random(seed)
    prompts = w.prompts(random.Random(seed + 1))
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        tokens = next(prompts)
        out.append(Req(i, t, tokens, chain(tokens, block_tokens, ROOT), OUT_TOKENS))
    return out
