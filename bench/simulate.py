"""Runs a scenario through the simulator (the real autoscaler and placement code in virtual time)
and compares meshserve's shared serving with one-model-per-GPU dedicated serving.

    python bench/simulate.py [SCENARIO.yaml] [--hours 24] [--seed 0] [--json PATH]

SCENARIO defaults to bench/scenarios/nine-models.yaml.

Prints GPUs (peak and mean), cost per month (a fleet sized for the peak, and GPUs paid only while
they hold a model), memory and compute utilization, SLO misses, cold starts, queueing delay,
loads and evictions, and the GPUs in use over the day.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from meshserve.scheduler.sim.report import nine_models_summary
from meshserve.scheduler.sim.scenario import load_scenario
from meshserve.scheduler.sim.simulator import simulate
from rich.console import Console
from rich.table import Table

DEFAULT = Path(__file__).parent / "scenarios" / "nine-models.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("scenario", type=Path, nargs="?", default=DEFAULT)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sc = load_scenario(yaml.safe_load(args.scenario.read_text()), args.scenario.stem)
    results = {
        "dedicated (one model per GPU)": simulate(sc, "dedicated", args.hours, seed=args.seed),
        "meshserve": simulate(sc, "meshserve", args.hours, seed=args.seed),
    }
    rows = nine_models_summary(results)
    table = Table(title=f"{sc.name}: {args.hours:g} h in virtual time, SLO TTFT {sc.slo_ttft_s} s")
    table.add_column("metric")
    for r in rows:
        table.add_column(str(r["policy"]), justify="right")
    labels = {
        "gpus_peak": "GPUs (peak)",
        "gpus_mean": "GPUs (mean)",
        "cost_per_month_fixed": "$/month, fleet sized for the peak",
        "cost_per_month_elastic": "$/month, GPUs paid while in use",
        "memory_utilization": "GPU memory utilization",
        "compute_utilization": "GPU compute utilization",
        "requests": "requests",
        "slo_misses": "SLO misses",
        "slo_miss_rate": "SLO miss rate",
        "cold_starts": "cold starts",
        "queue_delay_mean_s": "queueing delay mean (s)",
        "queue_delay_p99_s": "queueing delay p99 (s)",
        "loads": "model loads",
        "evictions": "evictions",
        "max_evictions_per_round": "evictions in one round (max)",
        "unplaced_rounds": "rounds with a model unplaced",
    }
    for key, label in labels.items():
        table.add_row(
            label, *(f"{r[key]:,}" if isinstance(r[key], int) else str(r[key]) for r in rows)
        )
    console = Console()
    console.print(table)
    if sc.baseline_gpus:
        console.print(f"today (the seed): {sc.baseline_gpus} GPUs")
    timeline = results["meshserve"].timeline
    console.print(
        "meshserve GPUs in use by hour: "
        + " ".join(f"{h:g}h:{g}" for h, g in timeline if float(h).is_integer())
    )
    if args.json:
        out = {
            "scenario": sc.name,
            "hours": args.hours,
            "baseline_gpus_today": sc.baseline_gpus,
            "results": rows,
            "timeline": timeline,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
