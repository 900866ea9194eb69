"""What passes between meshserve and vLLM: our sampling parameters as vLLM's, vLLM's logprobs
as ours, and the environment its engine-core processes start under. `vllm` is imported only in
the vllm_* engine modules (STYLE)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from meshserve.nodeagent.engines.base import Logprob
from meshserve.nodeagent.engines.params import GenerationParams
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind


def sampling_params(params: GenerationParams) -> SamplingParams:
    return SamplingParams(
        n=1,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed,
        stop=list(params.stop) or None,
        ignore_eos=params.ignore_eos,
        # The sampled token's logprob and the top_logprobs most likely (raw, as our torch engine)
        logprobs=params.top_logprobs if params.logprobs else None,
        output_kind=RequestOutputKind.DELTA,
    )


def logprobs_of(
    positions: Any, token_ids: Sequence[int], top: int, tok: Any
) -> tuple[Logprob, ...]:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} (the top ``top`` by
    rank, plus the sampled token) as ours, one per sampled token."""

    def text(token: int, decoded: str | None) -> str:
        return decoded if decoded is not None else str(tok.decode([token]))

    out = []
    for token, position in zip(token_ids, positions or (), strict=False):
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        best = tuple(
            (t, text(t, lp.decoded_token), float(lp.logprob))
            for t, lp in ranked
            if lp.rank is not None and lp.rank <= top
        )[:top]
        mine = position[token]
        out.append(Logprob(float(mine.logprob), text(token, mine.decoded_token), best))
    return tuple(out)


@contextlib.contextmanager
def process_env(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` set in this process's environment for the duration, then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
