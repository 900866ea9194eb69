"""Adapters (ModelSpec.base) in the router's table and picker and in the scheduler's snapshot:
an adapter's route is its base's replicas and follows their changes; the adapter scorer prefers
where it is loaded (1.0), then room (0.8), then a full replica (0.6); the scheduler places no
adapter, counts its demand as its base's and grants the base room for its adapters."""

from __future__ import annotations

from pathlib import Path

from meshserve.router.core.prefixes import Prefixes
from meshserve.router.core.table import TableBuilder, build_table
from meshserve.router.routing.endpoints import Endpoint
from meshserve.router.routing.pipeline import (
    DEFAULT_WEIGHTS,
    Ask,
    View,
    adapter,
    pick,
    weights_for,
)
from meshserve.scheduler.autoscale import Load
from meshserve.scheduler.snapshot import with_adapters
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import inference_pb2


def _status(
    node: str, adapters: tuple[str, ...] = (), state: int = S.REPLICA_STATE_READY
) -> S.ReplicaStatus:
    return S.ReplicaStatus(
        model="base", node_id=node, address=f"{node}:1", state=state,  # type: ignore[arg-type]
        adapters=adapters, max_adapters=2,
    )  # fmt: skip


BASE = S.ModelSpec(name="base", source="/m/base", max_adapters=2)
LORA = S.ModelSpec(name="lora", source="/m/lora", base="base", memory_bytes=1000)


def test_adapter_route_is_its_base_replicas_and_follows_their_changes() -> None:
    b = TableBuilder()
    b.spec("base", BASE)
    b.spec("lora", LORA)
    assert b.replica(b"base/n1", _status("n1"), None) == {"base", "lora"}
    route = b.table.resolve("lora")
    assert route is not None and route.spec.base == "base"
    assert [e.node_id for e in route.ready] == ["n1"]
    # Loading the adapter there changes the endpoint both routes share.
    old = b.statuses["base"][b"base/n1"]
    assert b.replica(b"base/n1", _status("n1", ("lora",)), old) == {"base", "lora"}
    ready = b.table.resolve("lora").ready  # type: ignore[union-attr]
    assert ready[0].adapters == ("lora",) and ready[0] is b.table.resolve("base").ready[0]  # type: ignore[union-attr]
    # The base leaves: so does the adapter's route's replica.
    b.replica(b"base/n1", None, b.statuses["base"][b"base/n1"])
    assert b.table.resolve("lora").ready == ()  # type: ignore[union-attr]
    # Built afresh from the same state: equal.
    fresh = build_table([BASE, LORA], [_status("n2", ("lora",))])
    assert [e.adapters for e in fresh.routes["lora"].ready] == [("lora",)]


def test_adapter_scorer_prefers_loaded_then_room_then_full() -> None:
    loaded = Endpoint("a", "h:1", adapters=("lora",), max_adapters=2)
    room = Endpoint("b", "h:2", adapters=("other",), max_adapters=2)
    full = Endpoint("c", "h:3", adapters=("x", "y"), max_adapters=2)
    view = View({}, {})
    assert adapter("lora", [loaded, room, full], Ask(adapter="lora"), view) == [1.0, 0.8, 0.6]
    assert adapter("base", [loaded, room, full], Ask(), view) == [0.0, 0.0, 0.0]
    weights = weights_for(DEFAULT_WEIGHTS, True)
    assert weights["adapter"] > 0 and "adapter" not in weights_for(DEFAULT_WEIGHTS, False)
    assert pick("lora", [room, full, loaded], Ask(adapter="lora"), view, weights).chosen is loaded
    # Much busier where it is loaded: the load scorer may move it to a replica with room.
    busy = View({"h:1": 9}, {})
    assert pick("lora", [room, loaded], Ask(adapter="lora"), busy, weights).chosen is room
    # One stream more where it is loaded already outweighs a load (milliseconds) elsewhere:
    # requests for a hot adapter do not pile up on one replica while another idles.
    one_more = View({"h:1": 1}, {})
    assert pick("lora", [room, loaded], Ask(adapter="lora"), one_more, weights).chosen is room


def test_adapter_demand_counts_as_its_base_and_the_base_gets_room() -> None:
    base = S.ModelSpec(name="base", memory_bytes=10_000, max_adapters=3)
    other = S.ModelSpec(name="solo", memory_bytes=5_000)
    small = S.ModelSpec(name="small", base="base", memory_bytes=100)
    big = S.ModelSpec(name="big", base="base", memory_bytes=400)
    load = {"small": Load(rate=2.0, in_flight=1), "big": Load(rate=1.0), "base": Load(rate=0.5)}
    specs, merged = with_adapters([base, other, small, big], load)
    assert [s.name for s in specs] == ["base", "solo"]  # adapters get no replicas of their own
    assert specs[0].memory_bytes == 10_000 + 3 * 400 and specs[1].memory_bytes == 5_000
    assert merged["base"].rate == 3.5 and merged["base"].in_flight == 1
    assert "small" not in merged and "big" not in merged
    assert base.memory_bytes == 10_000  # the spec itself is left as it was
    # No adapters: nothing changes.
    assert with_adapters([other], {"solo": Load(rate=1.0)}) == ([other], {"solo": Load(rate=1.0)})


def test_adapter_prompts_hash_with_the_base_tokenizer_into_the_adapter_index(
    demo_model: Path,
) -> None:
    base = S.ModelSpec(name="base", source=str(demo_model), max_adapters=2)
    lora = S.ModelSpec(name="lora", source="/adapters/lora", base="base")  # no tokenizer there
    status = _status("n1")
    status.kv_block_tokens = 4
    table = build_table([base, lora], [status])
    route = table.resolve("lora")
    assert route is not None and route.base == base
    prefixes = Prefixes()
    prefixes.tokenizers.load(base)
    req = inference_pb2.GenerateRequest(model="lora", prompt="Once upon a time there was a mesh")
    prompt = prefixes.prompt(route, req)
    assert prompt.blocks and prompt.model == "lora"  # hashed; the adapter's own index
    assert prompt.blocks == prefixes.prompt(table.resolve("base"), req).blocks  # type: ignore[arg-type]
