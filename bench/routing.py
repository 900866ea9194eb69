"""Routing policies side by side on one simulated fleet (issue 24): where should a request go?

    python -m bench.routing [--quick] [--json out.json]

8 replicas of one model (`bench.routing_sim`: continuous batching, chunked prefill, an LRU prefix
cache whose events reach the router 5 ms late), open-loop Poisson arrivals at 50 / 80 / 95 % of
the fleet's capacity for that workload under cache-blind load balancing (measured first by
saturating it, routed round robin), on four workloads (`bench.routing_load`): shared-prefix
groups, multi-turn chat, a low-sharing control, and mixed tiers (the shared-prefix load with 2
of 8 replicas asleep in host RAM). Every policy sees the same arrivals and routes with the
router's real code (`routing.pipeline.pick`, `routing.prefix.PrefixIndex`, `routing.ttft`):

- ``least_load``: meshserve before this issue (affinity 4, KV room 2, load 1);
- ``approx_prefix``: the Gateway API inference extension's / llm-d's approximate prefix scorer
  (its index fed only by what it sent) with its queue and KV scorers and default weights;
- ``dynamo_cost``: NVIDIA Dynamo's KV router (events-fed index; logit = overlap weight x prefill
  blocks + decode blocks, temperature 0: the cheapest);
- ``meshserve``: events + pending sends, the TTFT predictor (fitted online), KV room and load;
- ``oracle``: the replicas' exact caches, read at routing time, no load limit: the hit-rate bar.

Engine load figures (queued streams, KV use) refresh every 100 ms for every policy.
Prints a table, writes JSON ``{"rows": [...]}`` (keys in issue 24).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from meshserve.router.routing.pipeline import Ask

from bench.routing_load import WORKLOADS, Workload, arrivals
from bench.routing_policies import POLICIES, Router
from bench.routing_sim import Costs, Fleet

REPLICAS = 8
LOADS = (0.5, 0.8, 0.95)


def capacity(workload: Workload, costs: Costs, n: int, seed: int) -> float:
    """Requests/s the fleet completes, saturated with the workload and routed round robin
    (blind to caches, as load balancing is): the reference that the loads are fractions of."""
    fleet = Fleet(n, costs)
    reqs = arrivals(workload.awake(), 40.0 * n, 120 * n, costs.block_tokens, seed + 99)
    rr = iter(range(10**9))
    fleet.run(reqs, lambda _r: next(rr) % n)
    done = sorted(r.done_at for r in fleet.finished)
    lo, hi = done[len(done) // 5], done[-len(done) // 10]  # the steady middle
    return (len(done) * 0.7) / (hi - lo)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_one(
    policy: str,
    workload: Workload,
    load: float,
    cap: float,
    costs: Costs,
    requests: int,
    seed: int,
) -> dict[str, object]:
    fleet = Fleet(REPLICAS, costs, asleep=workload.asleep)
    reqs = arrivals(workload, load * cap, requests, costs.block_tokens, seed)
    router: Router = POLICIES[policy](fleet, costs)
    fleet.on_first = router.first_token
    fleet.on_done = router.done
    fleet.on_events = router.events
    fleet.run(reqs, router.route)
    ttfts = [r.first_at - r.arrival for r in reqs if not math.isnan(r.first_at)]
    span = max(r.done_at for r in reqs) - reqs[0].arrival
    prompt = sum(len(r.blocks) for r in reqs) * costs.block_tokens
    hit = sum(r.cached_blocks for r in reqs) * costs.block_tokens
    errors = [e for e in router.errors if math.isfinite(e)]
    return {
        "policy": policy,
        "workload": workload.name,
        "load": load,
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1),
        "tokens_per_s": round(sum(r.out_tokens for r in reqs) / span, 1),
        "errors": sum(1 for r in reqs if math.isnan(r.done_at)),
        "hit_rate": round(hit / prompt, 4) if prompt else 0.0,
        "decision_p99_us": round(percentile(router.decision_us, 0.99), 1),
        "prediction_mape": round(statistics.fmean(errors), 4) if errors else None,
        "restores": sum(r.restores for r in fleet.replicas),
    }


def scale(replicas: int = 64, decisions: int = 3000, seed: int = 7) -> dict[str, float]:
    """The router's own decision path (core.prefixes + routing.pick with the default weights,
    as admission calls it) over ``replicas`` candidates that each hold 2,048 blocks of the
    shared-prefix load; and the index's memory per entry and per 1 k replicas at capacity."""
    import tracemalloc

    from meshserve.router.core.prefixes import Prefixes
    from meshserve.router.routing.endpoints import Endpoint
    from meshserve.router.routing.pipeline import DEFAULT_WEIGHTS, View, pick
    from meshserve.router.routing.prefix import CAPACITY, PrefixIndex, Stored

    costs = Costs()
    reqs = arrivals(WORKLOADS["shared_prefix"], 100.0, decisions, costs.block_tokens, seed)
    rng = random.Random(seed)
    prefixes = Prefixes()
    index = prefixes.index("m")
    endpoints = [
        Endpoint(f"n{i}", f"10.0.0.{i}:7000", waiting=rng.randint(0, 4), max_streams=256,
                 running=rng.randint(0, 64), kv_block_tokens=costs.block_tokens, kv_events=True,
                 device_kind="gpu")
        for i in range(replicas)
    ]  # fmt: skip
    for e in endpoints:  # each replica holds some groups' prefixes
        held = [b for r in rng.sample(reqs, 28) for b in r.blocks]
        index.apply(e.address, 0, [Stored(tuple(held[:2048]))])
    outstanding = {e.address: rng.randint(0, 8) for e in endpoints}
    view = View(outstanding, {}, lambda _k: True, prefixes.matches, prefixes.predict, lambda: True)
    times = []
    for n, r in enumerate(reqs):
        ask = Ask(blocks=tuple(r.blocks), tokens=len(r.tokens), block_tokens=16, model="m")
        t0 = time.perf_counter()
        pick("m", endpoints, ask, view, DEFAULT_WEIGHTS, n)
        times.append((time.perf_counter() - t0) * 1e6)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    big = PrefixIndex()
    n_rep, n_blocks = 50, 2000
    for i in range(n_rep):
        big.apply(f"10.0.{i // 256}.{i % 256}:7000", 0,
                  [Stored(tuple(rng.getrandbits(64) for _ in range(n_blocks)))])  # fmt: skip
    per_entry = (tracemalloc.get_traced_memory()[0] - base) / (n_rep * n_blocks)
    tracemalloc.stop()
    return {
        "replicas": replicas,
        "decision_p50_us": round(percentile(times, 0.5), 1),
        "decision_p99_us": round(percentile(times, 0.99), 1),
        "index_bytes_per_block_entry": round(per_entry, 1),
        "index_gib_per_1k_replicas_at_capacity": round(per_entry * CAPACITY * 1000 / 2**30, 2),
        "index_capacity_blocks_per_replica": CAPACITY,
    }


def table(rows: list[dict[str, object]]) -> str:
    cols = ["workload", "load", "policy", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_s", "hit_rate",
            "hit_rate_vs_oracle", "decision_p99_us", "prediction_mape", "restores"]  # fmt: skip
    out = ["  ".join(f"{c:>14}" for c in cols)]
    out += ["  ".join(f"{'' if r.get(c) is None else r[c]!s:>14}" for c in cols) for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests (under 4 min on 2 cores)")
    p.add_argument("--json", type=Path, default=Path("bench-routing.json"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--policies", default=",".join(POLICIES))
    args = p.parse_args(argv)
    costs = Costs()
    requests = 1200 if args.quick else 4000
    rows: list[dict[str, object]] = []
    t0 = time.monotonic()
    for wname in args.workloads.split(","):
        workload = WORKLOADS[wname]
        cap = capacity(workload, costs, REPLICAS, args.seed)
        print(f"{wname}: capacity without reuse {cap:.1f} req/s", file=sys.stderr)
        for load in LOADS:
            group = [
                run_one(pol, workload, load, cap, costs, requests, args.seed)
                for pol in args.policies.split(",")
            ]
            oracle = next((r for r in group if r["policy"] == "oracle"), None)
            for r in group:
                ohr = float(oracle["hit_rate"]) if oracle else math.nan  # type: ignore[arg-type]
                r["hit_rate_vs_oracle"] = round(float(r["hit_rate"]) / ohr, 3) if ohr else None  # type: ignore[arg-type]
                r["capacity_rps"] = round(cap, 2)
            rows += group
            print(table(group), file=sys.stderr)
    print(table(rows))
    at_scale = scale()
    print("at scale: " + ", ".join(f"{k} {v}" for k, v in at_scale.items()))
    print(f"({time.monotonic() - t0:.0f} s)")
    out = {"rows": rows, "scale": at_scale, "costs": vars(costs)}
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
