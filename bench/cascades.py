"""Cascades on confidence: cost saved vs quality kept, per threshold, side by side in one run.

    python -m bench.cascades [--prompts 5000] [--json PATH]

The router's own decision (routing.routes.Cascade.escalate) over the sim engine's synthetic
log probabilities (nodeagent.engines.sim_engine.logprob_at: each prompt has a confidence c
uniform in [0.3, 0.99]; each token's probability is c x [0.85, 1]), greedy, for answers of
ANSWER tokens decided after the first HEAD. Stated assumptions (the sim has no notion of a
right answer): the small model's answer to a prompt is right with probability c, the large
model's with probability LARGE_QUALITY; the large model costs LARGE_COST times the small per
token. A cascade pays the small model's HEAD tokens on every prompt (its whole answer where
kept) and the large model's answer where escalated; its TTFT adds HEAD tokens at the small
model's ITL (the hold) to every answer, and the large model's TTFT to escalated ones.
Rows: the large model alone (the baseline), the small alone, and thresholds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from meshserve.nodeagent.engines.sim_engine import logprob_at, token_at
from meshserve.router.routing.routes import Cascade
from rich.console import Console
from rich.table import Table

ANSWER, HEAD = 64, 16
LARGE_COST, LARGE_QUALITY = 10.0, 0.95
SMALL_ITL_S, SMALL_TTFT_S, LARGE_TTFT_S = 0.01, 0.02, 0.08
THRESHOLDS = (-0.1, -0.2, -0.3, -0.4, -0.5, -0.7, -1.0)


def confidence(prompt_key: int) -> tuple[float, list[float]]:
    """The prompt's c (from its first-token probability) and the small model's first HEAD
    token log probabilities (greedy: salt 0)."""
    lps = [logprob_at(prompt_key, i, token_at(prompt_key, i, 0), 0, 0).logprob for i in range(HEAD)]
    c = math.exp(max(lps)) if lps else 0.0  # p = c x [0.85, 1]: the max is close to c
    return c, lps


def row(
    name: str,
    keys: list[tuple[float, list[float]]],
    cascade: Cascade | None,
    large_only: bool = False,
) -> dict[str, float | str]:
    cost = quality = ttft = 0.0
    escalated = 0
    for c, lps in keys:
        if large_only:
            cost, quality, ttft = (
                cost + LARGE_COST * ANSWER,
                quality + LARGE_QUALITY,
                ttft + LARGE_TTFT_S,
            )
            continue
        if cascade is None or not cascade.escalate(lps):
            held = HEAD * SMALL_ITL_S if cascade is not None else 0.0
            cost, quality, ttft = cost + ANSWER, quality + c, ttft + SMALL_TTFT_S + held
            continue
        escalated += 1
        cost += HEAD + LARGE_COST * ANSWER
        quality += LARGE_QUALITY
        ttft += SMALL_TTFT_S + HEAD * SMALL_ITL_S + LARGE_TTFT_S
    n = len(keys)
    return {
        "policy": name,
        "cost": cost / n,
        "quality": quality / n,
        "escalated_pct": 100 * escalated / n,
        "mean_ttft_s": ttft / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=Path("cascades.json"))
    args = parser.parse_args()
    keys = [confidence(1_000_003 * i + 17) for i in range(args.prompts)]
    rows = [
        row("large model only", keys, None, large_only=True),
        row("small model only", keys, None),
    ]
    rows += [
        row(f"cascade, mean logprob >= {t}", keys, Cascade("small", t, HEAD)) for t in THRESHOLDS
    ]
    base_cost, base_quality = float(rows[0]["cost"]), float(rows[0]["quality"])
    for r in rows:
        r["cost_saved_pct"] = 100 * (1 - float(r["cost"]) / base_cost)
        r["quality_kept_pct"] = 100 * float(r["quality"]) / base_quality
    t = Table(
        "policy",
        "escalated",
        "cost saved",
        "quality kept",
        "mean TTFT",
        title=f"Cascades: {args.prompts} prompts, {ANSWER}-token answers decided after {HEAD}",
    )
    for r in rows:
        t.add_row(
            str(r["policy"]),
            f"{float(r['escalated_pct']):.1f} %",
            f"{float(r['cost_saved_pct']):.1f} %",
            f"{float(r['quality_kept_pct']):.1f} %",
            f"{float(r['mean_ttft_s']) * 1000:.0f} ms",
        )
    Console().print(t)
    args.json.write_text(
        json.dumps(
            {
                "rows": rows,
                "prompts": args.prompts,
                "assumptions": {
                    "answer_tokens": ANSWER,
                    "head_tokens": HEAD,
                    "large_cost_per_token": LARGE_COST,
                    "large_quality": LARGE_QUALITY,
                    "small_quality": "its confidence c",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
