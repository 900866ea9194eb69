"""`meshserve top`'s rows (cli/top.py) from the records it watches: demand summed over routers,
the worst router's TTFT, replicas counted by state and tier, decode rates summed."""

from __future__ import annotations

import io
from typing import Any

from meshserve.cli.top import model_rows, render
from meshserve.v1 import cluster_pb2 as S
from rich.console import Console


def records() -> tuple[dict[bytes, Any], ...]:
    models = {b"m/a": S.ModelSpec(name="a"), b"m/b": S.ModelSpec(name="b")}
    replicas = {
        b"r/a/n1": S.ReplicaStatus(
            model="a", node_id="n1", state=S.REPLICA_STATE_READY, tier=S.TIER_DEVICE,
            decode_tokens_per_s=40.0, kv_cache_usage=0.5,
        ),
        b"r/a/n2": S.ReplicaStatus(
            model="a", node_id="n2", state=S.REPLICA_STATE_READY, tier=S.TIER_DEVICE,
            decode_tokens_per_s=20.0, kv_cache_usage=0.25,
        ),
        b"r/b/n2": S.ReplicaStatus(
            model="b", node_id="n2", state=S.REPLICA_STATE_READY, tier=S.TIER_HOST
        ),
    }  # fmt: skip
    demands = {
        b"d/r1": S.RouterDemand(
            router_id="r1",
            models=[S.ModelDemand(model="a", request_rate=3.0, in_flight=2, ttft_p99_s=0.2)],
        ),
        b"d/r2": S.RouterDemand(
            router_id="r2",
            models=[
                S.ModelDemand(model="a", request_rate=1.5, in_flight=1, ttft_p99_s=0.4),
                S.ModelDemand(model="c", queued=4),
            ],
        ),
    }
    nodes = {
        b"n/n1": S.NodeStatus(node_id="n1", device_kind="cpu", capacity_bytes=2**30),
        b"n/n2": S.NodeStatus(node_id="n2", device_kind="cpu", draining=True),
    }
    return models, replicas, demands, nodes


def test_rows_sum_demand_over_routers_and_count_replicas() -> None:
    models, replicas, demands, _nodes = records()
    rows = {r.name: r for r in model_rows(models, replicas, demands)}
    assert set(rows) == {"a", "b", "c"}  # c: asked for, not registered (yet)
    a = rows["a"]
    assert (a.rate, a.in_flight, a.ttft_p99_s) == (4.5, 3, 0.4)
    assert a.tokens_per_s == 60.0 and a.kv == 0.5
    assert a.states == {"READY": 2} and a.tiers == {"DEVICE": 2}
    assert rows["b"].tiers == {"HOST": 1} and rows["c"].queued == 4
    assert next(r.name for r in model_rows(models, replicas, demands)) == "a"  # busiest first


def test_the_view_shows_an_operator_s_hold_over_the_agent_s_draining() -> None:
    models, replicas, demands, nodes = records()
    cordons = {b"c/n1": S.NodeCordon(node_id="n1"), b"c/n2": S.NodeCordon(node_id="n2", drain=True)}
    out = io.StringIO()
    Console(file=out, width=200).print(render(models, replicas, demands, nodes, cordons))
    text = out.getvalue()
    assert "cordoned" in text and "drained" in text and "draining" not in text


def test_the_view_names_models_nodes_and_what_they_hold() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(render(*records()))
    text = out.getvalue()
    for word in ("models (2)", "nodes (2)", "READY:2", "DEVICE:2", "HOST:1", "400", "a, b",
                 "draining"):  # fmt: skip
        assert word in text, word
