"""Writes deploy/grafana/meshserve.json, the Grafana dashboard for meshserve's Prometheus metrics.

    python scripts/gen_dashboard.py

Panels are written here as (title, PromQL, unit) so the JSON stays consistent; a test checks
that every metric a panel uses is one services/telemetry/metrics.py exports.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "meshserve.json"

ROWS: list[tuple[str, list[tuple[str, str, str]]]] = [
    (
        "Requests (router)",
        [
            ("Requests/s by model", 'sum by (model) (rate(meshserve_requests_total{service="router"}[1m]))', "reqps"),
            ("Errors/s by status", 'sum by (code) (rate(meshserve_requests_total{service="router", code!="OK"}[1m]))', "reqps"),
            ("TTFT p50", 'histogram_quantile(0.5, sum by (le, model) (rate(meshserve_time_to_first_token_seconds_bucket{service="router"}[5m])))', "s"),
            ("TTFT p99", 'histogram_quantile(0.99, sum by (le, model) (rate(meshserve_time_to_first_token_seconds_bucket{service="router"}[5m])))', "s"),
            ("Inter-token p50", 'histogram_quantile(0.5, sum by (le, model) (rate(meshserve_inter_token_seconds_bucket[5m])))', "s"),
            ("Inter-token p99", 'histogram_quantile(0.99, sum by (le, model) (rate(meshserve_inter_token_seconds_bucket[5m])))', "s"),
            ("Streams in flight", "sum by (model) (meshserve_in_flight)", "short"),
            ("Queued for a slot or a replica", "sum by (model) (meshserve_router_queued)", "short"),
            ("Queue wait p99", "histogram_quantile(0.99, sum by (le, model) (rate(meshserve_router_queue_wait_seconds_bucket[5m])))", "s"),
            ("READY replicas (routers' view)", "max by (model) (meshserve_router_ready_replicas)", "short"),
            ("Retries/s", "sum by (model) (rate(meshserve_router_retries_total[1m]))", "reqps"),
            ("Failovers/min (streams moved mid-way)", "sum by (model) (rate(meshserve_router_failovers_total[5m])) * 60", "short"),
            ("Open circuit breakers", "sum by (node, model) (meshserve_router_breaker_open)", "short"),
            ("Retries refused by the budget/min", "sum(rate(meshserve_router_retries_denied_total[5m])) * 60", "short"),
            ("Undecodable requests/min", "sum by (method) (rate(meshserve_undecodable_requests_total[5m])) * 60", "short"),
            ("Tokens/s", "sum by (model) (rate(meshserve_generated_tokens_total[1m]))", "short"),
        ],
    ),
    (
        "Replicas and cold starts",
        [
            ("Replicas by state", "sum by (model, state) (meshserve_replicas)", "short"),
            ("Replicas by tier", "sum by (model, tier) (meshserve_replicas)", "short"),
            ("Cold starts/min by model (requests that waited for a load)", 'sum by (model) (rate(meshserve_tenant_requests_total{start="cold"}[5m])) * 60', "short"),
            ("Model load time p99 (exemplars: the load's trace)", "histogram_quantile(0.99, sum by (le, model) (rate(meshserve_model_load_seconds_bucket[30m])))", "s"),
        ],
    ),
    (
        "GPUs (node agents)",
        [
            ("GPU memory used", "sum by (gpu) (meshserve_gpu_memory_used_bytes)", "bytes"),
            ("GPU memory used share", "max by (gpu) (meshserve_gpu_memory_used_bytes / meshserve_gpu_memory_total_bytes)", "percentunit"),
            ("GPU utilization", "avg by (gpu) (meshserve_gpu_utilization_ratio)", "percentunit"),
            ("Model load time p90", "histogram_quantile(0.9, sum by (le, model) (rate(meshserve_model_load_seconds_bucket[30m])))", "s"),
            ("Tier change time p90", "histogram_quantile(0.9, sum by (le, model) (rate(meshserve_tier_change_seconds_bucket[30m])))", "s"),
            ("Decode tokens/s per device (measured)", "sum by (gpu) (meshserve_device_decode_tokens_per_s)", "short"),
            ("Decode load vs capacity", "sum by (gpu) (meshserve_device_decode_tokens_per_s) / sum by (gpu) (meshserve_device_decode_capacity_tokens_per_s)", "percentunit"),
        ],
    ),
    (
        "Tenants (router)",
        [
            ("Requests/s by tenant", "sum by (tenant) (rate(meshserve_tenant_requests_total[1m]))", "reqps"),
            ("Tokens/s by tenant", "sum by (tenant, kind) (rate(meshserve_tenant_tokens_total[1m]))", "short"),
            ("Cost/hour by tenant", "sum by (tenant) (rate(meshserve_tenant_cost_total[5m])) * 3600", "short"),
            ("Cold starts/min by tenant", 'sum by (tenant) (rate(meshserve_tenant_requests_total{start="cold"}[5m])) * 60', "short"),
            ("Refused/min by tenant and reason", "sum by (tenant, reason) (rate(meshserve_router_refused_total[5m])) * 60", "short"),
            ("Shed for priority/min", "sum by (model, priority) (rate(meshserve_router_shed_total[5m])) * 60", "short"),
        ],
    ),
    (
        "Tensor models (dynamic batching, node agents)",
        [
            ("Rows per batch (mean)", "sum by (model) (rate(meshserve_batch_size_sum[5m])) / sum by (model) (rate(meshserve_batch_size_count[5m]))", "short"),
            ("Request latency p95 in the agent", "histogram_quantile(0.95, sum by (le, model) (rate(meshserve_batch_request_seconds_bucket[5m])))", "s"),
            ("Wait for a batch p95", "histogram_quantile(0.95, sum by (le, model) (rate(meshserve_batch_queue_seconds_bucket[5m])))", "s"),
            ("Batching window", "max by (model) (meshserve_batch_window_seconds)", "s"),
        ],
    ),
    (
        "Scheduler",
        [
            ("Rounds/s by outcome", "sum by (outcome) (rate(meshserve_scheduler_rounds_total[5m]))", "short"),
            ("Round time p99", "histogram_quantile(0.99, sum by (le) (rate(meshserve_scheduler_round_seconds_bucket[5m])))", "s"),
            ("Wanted replicas", "max by (model) (meshserve_scheduler_wanted_replicas)", "short"),
            ("Evictions/min", "sum by (model) (rate(meshserve_scheduler_evictions_total[5m])) * 60", "short"),
            ("Loads/min", "sum(rate(meshserve_scheduler_loads_total[5m])) * 60", "short"),
            ("Unschedulable models", "max by (model) (meshserve_scheduler_unschedulable)", "short"),
            ("Idle rounds/s (not traced)", "sum(rate(meshserve_scheduler_idle_rounds_total[5m]))", "short"),
            ("Nodes lost (lease expired)/hour", "max(increase(meshserve_scheduler_nodes_lost_total[1h]))", "short"),
        ],
    ),
]  # fmt: skip


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    y = 0
    pid = 1
    for row_title, row in ROWS:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        pid += 1
        y += 1
        for i, (title, expr, unit) in enumerate(row):
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": pid,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": y + (i // 2) * 8},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    # Histograms carry trace ids as exemplars: Grafana links each to its trace
                    # (deploy/grafana/datasources.yaml, exemplarTraceIdDestinations).
                    "targets": [
                        {
                            "refId": "A",
                            "expr": expr,
                            "legendFormat": "__auto",
                            "exemplar": "_bucket" in expr,
                        }
                    ],
                }
            )
            pid += 1
        y += ((len(row) + 1) // 2) * 8
    return {
        "title": "meshserve",
        "uid": "meshserve",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]
        },
        "panels": panels,
    }


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
