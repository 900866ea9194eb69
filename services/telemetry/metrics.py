"""Prometheus metrics of every service, named once here (DESIGN §6)."""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "meshserve_requests_total", "Inference requests by outcome", ["service", "model", "code"]
)
TTFT = Histogram(
    "meshserve_time_to_first_token_seconds",
    "Time to first token",
    ["service", "model"],
    buckets=_LATENCY,
)
INTER_TOKEN = Histogram(
    "meshserve_inter_token_seconds",
    "Time between streamed messages",
    ["service", "model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
BATCH_ROWS = Histogram(
    "meshserve_batch_size",
    "Rows in each batch a tensor model ran (the agent's dynamic batcher)",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
BATCH_QUEUE = Histogram(
    "meshserve_batch_queue_seconds",
    "Time a tensor request waited in the batcher before its batch ran",
    ["model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1),
)
BATCH_LATENCY = Histogram(
    "meshserve_batch_request_seconds",
    "Time from a tensor request's arrival in the batcher to its result",
    ["model"],
    buckets=_LATENCY,
)
BATCH_WINDOW = Gauge(
    "meshserve_batch_window_seconds",
    "The batcher's window now (adaptive mode moves it against the P95 target)",
    ["model"],
)
IN_FLIGHT = Gauge("meshserve_in_flight", "Streams in flight", ["service", "model"])
QUEUED = Gauge(
    "meshserve_router_queued", "Requests waiting for a free slot or a replica", ["model"]
)
QUEUE_WAIT = Histogram(
    "meshserve_router_queue_wait_seconds",
    "Time a request waited for a free slot or a replica (0 when one was free)",
    ["model"],
    buckets=_LATENCY,
)
TTFT_PREDICTION_ERROR = Histogram(
    "meshserve_router_ttft_prediction_error_ratio",
    "Absolute error of the router's TTFT prediction over the observed TTFT, per stream",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
PREFIX_INDEX_BLOCKS = Gauge(
    "meshserve_router_prefix_index_blocks",
    "KV blocks the router knows its replicas hold (from their agents' block events)",
    ["model"],
)
WAKES = Counter(
    "meshserve_router_wakes_total",
    "Asleep replicas this router asked to wake (asked), and how the wakes ended: a new READY "
    "replica (woken), the scheduler said no (refused), or none in time (expired)",
    ["model", "outcome"],
)
PROMPT_TOKENS = Counter(
    "meshserve_router_prompt_tokens_total", "Prompt tokens of the requests routed", ["model"]
)
CACHED_PROMPT_TOKENS = Counter(
    "meshserve_router_cached_prompt_tokens_total",
    "Prompt tokens routed to a replica known to hold them cached (hit rate: over prompt tokens)",
    ["model"],
)
PREFIX_FEED_RESYNCS = Counter(
    "meshserve_router_kv_feed_resyncs_total",
    "KV block feeds from agents restarted from a snapshot (a gap, a broken stream)",
    ["model"],
)
READY_REPLICAS = Gauge(
    "meshserve_router_ready_replicas", "READY replicas in this router's table", ["model"]
)
REPLICA_FAILURES = Counter(
    "meshserve_replica_failures",
    "Replicas a node agent gave up (FAILED), by reason: engine_died (its health check found the "
    "engine dead) or given_up (e.g. repeated device OOM, after draining)",
    ["model", "reason"],
)
AGENT_FENCED = Gauge(
    "meshserve_agent_fenced",
    "1 while this node agent takes no new streams: its lease unrenewed past its TTL with etcd "
    "out of reach (cluster/fence.py)",
)
NODES_LOST = Counter(
    "meshserve_scheduler_nodes_lost_total",
    "Nodes whose record vanished without draining first (lease expired: the agent died)",
)
SHED = Counter(
    "meshserve_router_shed_total",
    "Queued requests dropped for higher-priority arrivals",
    ["model", "priority"],
)
REFUSED = Counter(
    "meshserve_router_refused_total",
    "Requests refused by tenancy: unauthenticated, permission, or a limit",
    ["tenant", "reason"],
)
TENANT_REQUESTS = Counter(
    "meshserve_tenant_requests_total",
    "Requests served per tenant and model; start=cold when it waited for a load",
    ["tenant", "model", "start"],
)
TENANT_TOKENS = Counter(
    "meshserve_tenant_tokens_total", "Tokens per tenant and model", ["tenant", "model", "kind"]
)
TENANT_COST = Counter(
    "meshserve_tenant_cost_total", "Cost from the price table", ["tenant", "model"]
)
RETRIES = Counter(
    "meshserve_router_retries_total",
    "Attempts again after one failed before the first token",
    ["model"],
)
RETRIES_DENIED = Counter(
    "meshserve_router_retries_denied_total", "Retries refused by the router's retry budget"
)
FAILOVERS = Counter(
    "meshserve_router_failovers_total", "Streams moved to another replica mid-way", ["model"]
)
BREAKER_OPEN = Gauge(
    "meshserve_router_breaker_open",
    "1 while the circuit breaker of (replica, model) is open or half-open",
    ["node", "model"],
)
BAD_REQUESTS = Counter(
    "meshserve_undecodable_requests_total", "Requests whose bytes could not be parsed", ["method"]
)
TOKENS = Counter("meshserve_generated_tokens_total", "Tokens generated", ["model"])
PREEMPTIONS = Counter(
    "meshserve_engine_preemptions_total",
    "Streams an engine preempted for a higher priority (they resume exactly, later)",
    ["model"],
)
LOAD_SECONDS = Histogram(
    "meshserve_model_load_seconds", "Model load + warm-up time", ["model"], buckets=_LATENCY
)
ADAPTER_LOADS = Counter(
    "meshserve_adapter_loads_total", "LoRA adapters loaded into a replica of this base", ["model"]
)
ADAPTER_LOAD_SECONDS = Histogram(
    "meshserve_adapter_load_seconds",
    "LoRA adapter loads into a replica of this base: fetch, check and the engine's load (a "
    "request for an adapter not loaded waits this long before its prefill)",
    ["model"],
    buckets=(0.001, 0.0025, *_LATENCY),
)
ADAPTER_EVICTIONS = Counter(
    "meshserve_adapter_evictions_total",
    "LoRA adapters evicted from a replica of this base (least recently used, slots full)",
    ["model"],
)
SWAP_SECONDS = Histogram(
    "meshserve_tier_change_seconds",
    "Offload / restore (+ warm-up) time",
    ["model", "tier"],
    buckets=_LATENCY,
)
GPU_MEMORY_USED = Gauge("meshserve_gpu_memory_used_bytes", "GPU memory in use", ["gpu"])
GPU_MEMORY_TOTAL = Gauge("meshserve_gpu_memory_total_bytes", "GPU memory in all", ["gpu"])
GPU_UTILIZATION = Gauge("meshserve_gpu_utilization_ratio", "GPU utilization", ["gpu"])
GPU_HEALTH = Gauge(
    "meshserve_gpu_health",
    "GPU health as the agent judged it from NVML: 1 OK, 2 DEGRADED, 3 FAILED (0: not judged)",
    ["gpu"],
)
DECODE_RATE = Gauge(
    "meshserve_device_decode_tokens_per_s",
    'Decode tokens/s measured on a device (engines\' counters, ~10 s average); gpu "" = CPU',
    ["gpu"],
)
DECODE_CAPACITY = Gauge(
    "meshserve_device_decode_capacity_tokens_per_s",
    "Decode tokens/s a device generates at full load (measured while saturated, else configured)",
    ["gpu"],
)
ROUTER_TABLE_UPDATE = Histogram(
    "meshserve_router_table_update_seconds",
    "Time the router spends applying one burst of model/replica changes to its route table",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.1),
)
SCHEDULER_ROUNDS = Counter("meshserve_scheduler_rounds_total", "Scheduling rounds", ["outcome"])
SCHEDULER_IDLE_ROUNDS = Counter(
    "meshserve_scheduler_idle_rounds_total",
    "Rounds that changed nothing (no trace span: counted here instead)",
)
SCHEDULER_WRITING_ROUNDS = Counter(
    "meshserve_scheduler_writing_rounds_total", "Rounds that wrote or removed placements"
)
SCHEDULER_ROUND_SECONDS = Histogram(
    "meshserve_scheduler_round_seconds", "Scheduling round time", buckets=_LATENCY
)

SCHEDULER_EVICTIONS = Counter(
    "meshserve_scheduler_evictions_total", "Replicas evicted to make room", ["model"]
)
SCHEDULER_LOADS = Counter("meshserve_scheduler_loads_total", "Replicas newly placed (loads)")
WANTED_REPLICAS = Gauge(
    "meshserve_scheduler_wanted_replicas", "Replicas the autoscaler asks for", ["model"]
)
REPLICAS = Gauge(
    "meshserve_replicas",
    "Replicas by model, state and tier, as the scheduler leader sees them in etcd",
    ["model", "state", "tier"],
)
UNSCHEDULABLE = Gauge(
    "meshserve_scheduler_unschedulable", "1 while a model has a replica it cannot place", ["model"]
)


def serve_metrics(port: int) -> None:
    """Serves /metrics on ``port`` (0: disabled), on loopback unless MESHSERVE_METRICS_HOST says
    otherwise (0.0.0.0 in a pod, so Prometheus can scrape it)."""
    if port:
        start_http_server(port, addr=os.environ.get("MESHSERVE_METRICS_HOST", "127.0.0.1"))
