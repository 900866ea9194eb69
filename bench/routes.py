"""What a route adds to each request in the router, in CPU time (issue 27's goal: ≤ 50 µs).

    python -m bench.routes [--requests 200000] [--json PATH]

Measured in-process, side by side in one run, on the work the router core does for a route's
request beyond a plain model's (core/service.py `_routed`): the facts of the request, the
route's plan (rules in order, then the weighted sticky pick by rendezvous hashing, the fallback
chain, the shadow draw), the pristine copy of the request kept for later hops, and the target's
statistics. Rows: a plain model (none of it), a 10/90 canary, the canary with three rules
(none matching: all checked), and with a fallback chain of two and a 10 % shadow.
Process CPU time (time.process_time) per request; distinct session keys per request.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from meshserve.router.core.routes import Routes
from meshserve.router.routing.routes import Facts
from meshserve.routespec import route_from_dict
from meshserve.v1 import inference_pb2
from rich.console import Console
from rich.table import Table

ROUTES: dict[str, dict[str, Any] | None] = {
    "plain model (no route)": None,
    "canary 10/90": {"targets": {"chat-v2": 10, "chat-v1": 90}},
    "canary + 3 rules": {
        "targets": {"chat-v2": 10, "chat-v1": 90},
        "rules": [
            {"tenants": ["team-a"], "target": "chat-v2"},
            {"metadata": {"x-canary": "yes"}, "target": "chat-v2"},
            {"min_prompt_chars": 100000, "target": "chat-long"},
        ],
    },
    "canary + rules + 2 fallbacks + 10 % shadow": {
        "targets": {"chat-v2": 10, "chat-v1": 90},
        "rules": [{"tenants": ["team-a"], "target": "chat-v2"}],
        "fallbacks": ["chat-small", "hosted"],
        "shadows": {"chat-v3": 0.1},
    },
}


def measure(doc: dict[str, Any] | None, n: int) -> float:
    """CPU µs per request of the route's work."""
    routes = Routes()
    if doc is not None:
        routes.put(route_from_dict({"name": "chat", **doc}))
    request = inference_pb2.GenerateRequest(model="chat", prompt="Once upon a time " * 8)
    metadata = {"x-canary": "no", "user-agent": "bench"}
    keys = [f"user-{i}" for i in range(4096)]
    started = time.process_time()
    for i in range(n):
        policy = routes.get("chat")
        if policy is None:
            continue
        chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
        key = keys[i & 4095]
        plan = policy.plan(Facts("team-b", key, f"r{i}", 2, chars, metadata))
        pristine = inference_pb2.GenerateRequest()
        pristine.CopyFrom(request)
        stats = routes.target(plan.route, plan.hops[0].model, plan.hops[0].role)
        stats.ended(True, 0.01, 0.1, 16)
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--json", type=Path, default=Path("routes.json"))
    args = parser.parse_args()
    measured = [(name, measure(doc, args.requests)) for name, doc in ROUTES.items()]
    t = Table("route", "CPU µs / request", "goal ≤ 50 µs", title="What a route adds per request")
    for name, us in measured:
        t.add_row(name, f"{us:.2f}", "yes" if us <= 50 else "no")
    rows = [{"route": name, "cpu_us_per_request": us} for name, us in measured]
    Console().print(t)
    args.json.write_text(json.dumps({"rows": rows, "requests": args.requests}, indent=2))


if __name__ == "__main__":
    main()
