"""The router's table kept one change at a time (TableBuilder) equals a table built afresh from
the same final state, after any sequence of spec and replica puts and deletes (hypothesis); a
change of load figures alone rebuilds no route and updates the endpoint in place."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.router.core.table import TableBuilder, build_table
from meshserve.v1 import cluster_pb2 as S
from meshserve.v1 import common_pb2

MODELS = ("a", "b")  # few keys: the same replica changes again and again
NODES = ("n1", "n2")
STATES = (
    S.REPLICA_STATE_LOADING,
    S.REPLICA_STATE_WARMING,
    S.REPLICA_STATE_READY,
    S.REPLICA_STATE_DRAINING,
    S.REPLICA_STATE_OFFLOADED,
    S.REPLICA_STATE_FAILED,
)


def a_spec(name: str, alias: int) -> S.ModelSpec:
    spec = S.ModelSpec(name=name, source=f"/m/{name}")
    if alias:
        spec.aliases.append(f"alias{alias}")
    return spec


def signature() -> common_pb2.TensorSignature:
    sig = common_pb2.TensorSignature(max_batch_size=8)
    sig.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    return sig


specs = st.builds(a_spec, st.sampled_from(MODELS), st.integers(0, 2))
statuses = st.builds(
    lambda model, node, state, inc, waiting, kv, streams, addr, sig: S.ReplicaStatus(
        model=model,
        node_id=node,
        address="" if addr == 0 else f"{node}:{addr}",
        state=state,
        incarnation=inc,
        waiting=waiting,
        kv_cache_usage=kv,
        max_streams=streams,
        signature=signature() if sig else None,
    ),
    st.sampled_from(MODELS),
    st.sampled_from(NODES),
    st.sampled_from(STATES + (S.REPLICA_STATE_READY,) * 4),  # mostly READY: routes to compare
    st.integers(1, 2),
    st.integers(0, 3),
    st.sampled_from([0.0, 0.5, 0.9]),
    st.integers(0, 2),
    st.sampled_from([1, 1, 1, 0, 2]),
    st.booleans(),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("spec"), specs),
        st.tuples(st.just("spec-delete"), st.sampled_from(MODELS)),
        st.tuples(st.just("replica"), statuses),
        st.tuples(st.just("replica-delete"), st.sampled_from(MODELS), st.sampled_from(NODES)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_incremental_table_equals_a_full_rebuild(sequence: list[tuple[object, ...]]) -> None:
    b = TableBuilder()
    held_specs: dict[str, S.ModelSpec] = {}
    held: dict[bytes, S.ReplicaStatus] = {}
    for kind, *args in sequence:
        if kind == "spec":
            (spec,) = args
            assert isinstance(spec, S.ModelSpec)
            held_specs[spec.name] = spec
            b.spec(spec.name, spec)
        elif kind == "spec-delete":
            (name,) = args
            assert isinstance(name, str)
            held_specs.pop(name, None)
            b.spec(name, None)
        elif kind == "replica":
            (r,) = args
            assert isinstance(r, S.ReplicaStatus)
            key = f"{r.model}/{r.node_id}".encode()
            b.replica(key, r, held.get(key))
            held[key] = r
        else:
            model, node = args
            key = f"{model}/{node}".encode()
            b.replica(key, None, held.pop(key, None))
        fresh = build_table(held_specs.values(), held.values())
        assert dict(b.table.routes) == dict(fresh.routes)
        assert dict(b.table.aliases) == dict(fresh.aliases)


def test_load_figures_alone_update_the_endpoint_in_place() -> None:
    b = TableBuilder()
    b.spec("a", a_spec("a", 0))
    ready = S.ReplicaStatus(
        model="a", node_id="n1", address="n1:1", state=S.REPLICA_STATE_READY, incarnation=1
    )
    assert b.replica(b"a/n1", ready, None) == {"a"}
    route = b.table.routes["a"]
    busier = S.ReplicaStatus()
    busier.CopyFrom(ready)
    busier.waiting, busier.kv_cache_usage, busier.running = 5, 0.5, 3
    assert b.replica(b"a/n1", busier, ready) == set()  # no route rebuilt
    assert b.table.routes["a"] is route  # the same Route object
    (e,) = route.ready
    assert (e.waiting, e.kv_cache_usage) == (5, 0.5)  # the picker sees the new load
    restarted = S.ReplicaStatus()
    restarted.CopyFrom(busier)
    restarted.incarnation = 2
    assert b.replica(b"a/n1", restarted, busier) == {"a"}
    assert b.table.routes["a"].ready[0].incarnation == 2
