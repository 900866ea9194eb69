"""Routes as policy, pure (routing/routes.py, routespec.py): weighted sticky picks hold their
shares, keep a key's target, and move only the keys that must move when weights change; rules
pick by tenant, metadata, priority and prompt length, in order; the fallback chain keeps its
order and its waits; shadows take their share; bad documents are refused naming the field."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from meshserve.router.routing.routes import Facts, Policy
from meshserve.routespec import route_from_dict
from meshserve.v1 import common_pb2


def policy(**doc: object) -> Policy:
    return Policy(route_from_dict({"name": "chat", **doc}))


def test_canary_weights_hold_over_2000_sessions_and_each_session_sticks() -> None:
    p = policy(targets={"chat-v2": 10, "chat-v1": 90})
    picks = {f"user-{i}": p.plan(Facts(session_key=f"user-{i}")).hops[0].model for i in range(2000)}
    share = Counter(picks.values())["chat-v2"] / 2000
    assert 0.085 <= share <= 0.115, share  # 10 % ± 1.5 points (binomial sd 0.67 points)
    for key, target in list(picks.items())[:200]:  # the same key, any request id: its target
        assert p.plan(Facts(session_key=key, request_id="r")).hops[0].model == target
    # More weight to the canary moves keys only onto it, about as many as the weights say.
    wider = policy(targets={"chat-v2": 30, "chat-v1": 70})
    moved = {k for k, t in picks.items() if wider.plan(Facts(session_key=k)).hops[0].model != t}
    assert all(picks[k] == "chat-v1" for k in moved)
    assert 0.17 <= len(moved) / 2000 <= 0.23, len(moved)
    # No session key: the tenant's; sticky none: each request draws.
    assert len({p.plan(Facts(tenant="t", request_id=str(i))).hops[0].model for i in range(50)}) == 1
    loose = policy(targets={"chat-v2": 50, "chat-v1": 50}, sticky="none")
    drawn = {loose.plan(Facts(session_key="s", request_id=str(i))).hops[0].model for i in range(50)}
    assert drawn == {"chat-v1", "chat-v2"}


def test_canary_rules_match_in_order_on_tenant_metadata_priority_and_length() -> None:
    p = policy(
        targets={"chat-v1": 1},
        rules=[
            {"name": "team-a", "tenants": ["team-a"], "target": "chat-v2"},
            {"metadata": {"X-Canary": "1"}, "target": "chat-v2"},
            {"min_priority": "high", "target": "chat-fast"},
            {"min_prompt_chars": 1000, "target": "chat-long"},
        ],
    )

    def first(f: Facts) -> tuple[str, str]:
        plan = p.plan(f)
        return plan.hops[0].model, plan.rule

    assert first(Facts(tenant="team-a", prompt_chars=5000)) == ("chat-v2", "team-a")
    assert first(Facts(tenant="team-b", metadata={"x-canary": "1"})) == ("chat-v2", "rule1")
    assert first(Facts(metadata={"x-canary": "0"}))[0] == "chat-v1"
    assert first(Facts(priority=common_pb2.PRIORITY_HIGH))[0] == "chat-fast"
    assert first(Facts(priority=common_pb2.PRIORITY_NORMAL, prompt_chars=999))[0] == "chat-v1"
    assert first(Facts(prompt_chars=1000)) == ("chat-long", "rule3")


def test_canary_fallback_chain_keeps_its_order_and_waits() -> None:
    p = policy(targets={"big": 1}, fallbacks=["mid", {"model": "hosted", "max_wait_s": 5}, "tiny"],
               max_wait_s=0.5)  # fmt: skip
    hops = p.plan(Facts(request_id="r")).hops
    assert [(h.model, h.role, h.max_wait_s) for h in hops] == [
        ("big", "target", 0.5), ("mid", "fallback", 0.5), ("hosted", "fallback", 5.0),
        ("tiny", "fallback", None),  # the last hop waits as a plain request does
    ]  # fmt: skip
    # A fallback that is also the target is not tried twice; no fallback: no bound.
    assert [h.model for h in policy(targets={"mid": 1}, fallbacks=["mid", "tiny"]).plan(
        Facts()).hops] == ["mid", "tiny"]  # fmt: skip
    assert policy(targets={"big": 1}).plan(Facts()).hops[0].max_wait_s is None


def test_canary_shadow_takes_its_share_by_request() -> None:
    p = policy(targets={"chat-v1": 1}, shadows={"chat-v3": 0.25})
    copied = sum(
        bool(p.plan(Facts(session_key="s", request_id=f"r{i}")).shadows) for i in range(2000)
    )
    assert 0.22 <= copied / 2000 <= 0.28, copied


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"targets": {}}, "at least one target"),
        ({"targets": {"a": 0}}, "targets.a: weight must be a positive number"),
        ({"targets": {"a": 1}, "shadows": {"b": 2}}, "shadows.b: weight must be in (0, 1]"),
        ({"targets": {"a": 1}, "sticky": "cookie"}, "sticky: one of"),
        ({"targets": {"a": 1}, "rules": [{"tenants": ["x"]}]}, "rules[0]: 'target' is required"),
        (
            {"targets": {"a": 1}, "rules": [{"target": "b", "min_priority": "urgent"}]},
            "min_priority",
        ),
        ({"targets": {"chat": 1}}, "names itself"),
        ({"targets": {"a": 1}, "fallbacks": ["b", "b"]}, "named twice"),
        ({"targets": {"a b": 1}}, "invalid model name"),
        ({"targets": {"a": 1}, "max_wait_s": -1}, "max_wait_s"),
        ({"targets": {"a": 1}, "colour": 1}, "unknown field"),
    ],
)
def test_canary_bad_route_documents_are_refused_naming_the_field(
    doc: dict[str, object], says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        route_from_dict({"name": "chat", **doc})


def test_cascade_escalates_below_the_threshold_over_its_first_tokens() -> None:
    p = policy(
        targets={"big": 1}, cascade={"model": "small", "min_mean_logprob": -0.5, "tokens": 3}
    )
    c = p.plan(Facts()).cascade
    assert c is not None and (c.model, c.tokens) == ("small", 3)
    assert not c.escalate([-0.1, -0.2, -0.3, -9.0])  # mean of the first 3 = -0.2: kept
    assert c.escalate([-0.4, -0.6, -0.7, 0.0])  # -0.57: escalated
    assert not c.escalate([-0.5])  # a shorter answer: its tokens; at the threshold: kept
    assert c.escalate([])  # nothing to judge
    assert policy(targets={"big": 1}).plan(Facts()).cascade is None
    for bad, says in (
        ({"model": "small"}, "min_mean_logprob"),
        ({"model": "small", "min_mean_logprob": 0.5}, "a number <= 0"),
        ({"model": "small", "min_mean_logprob": -1, "tokens": 0}, "1..4096"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            policy(targets={"big": 1}, cascade=bad)


def test_external_backend_spec_is_checked_and_never_placed() -> None:
    from meshserve.modelspec import spec_from_dict
    from meshserve.scheduler.snapshot import round_snapshot
    from meshserve.v1 import cluster_pb2

    spec = spec_from_dict({"name": "hosted", "engine": "external", "url": "http://h:8000/v1/",
                           "api_key_env": "HOSTED_KEY", "served_model": "llama"})  # fmt: skip
    assert (spec.engine, spec.url, spec.api_key_env) == (
        cluster_pb2.ENGINE_KIND_EXTERNAL, "http://h:8000/v1", "HOSTED_KEY")  # fmt: skip
    for bad, says in (
        ({"name": "x", "engine": "external"}, "'url' are required"),
        ({"name": "x", "engine": "external", "url": "h:8000"}, "OpenAI-compatible base URL"),
        (
            {"name": "x", "engine": "external", "url": "http://h:1/v1", "min_replicas": 1},
            "do not apply",
        ),
        (
            {"name": "x", "engine": "external", "url": "http://h:1/v1", "api_key_env": "a b"},
            "api_key_env",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            spec_from_dict(bad)
    local = cluster_pb2.ModelSpec(name="local", memory_bytes=1000, min_replicas=1)
    _snap, _state, placed = round_snapshot([spec, local], [], [], [], [], {}, 0.0)
    assert [s.name for s in placed] == ["local"]  # the scheduler never places an endpoint


def test_canary_fallback_never_for_the_callers_own_limits_or_deadline() -> None:
    import grpc
    from meshserve.router.core.call import Call
    from meshserve.router.core.routed import falls_back
    from meshserve.rpc.errors import ServiceError

    down = ServiceError(grpc.StatusCode.UNAVAILABLE, "no replica", "NO_REPLICA")
    assert falls_back(down, Call.within(None)) and falls_back(down, Call.within(30))
    assert not falls_back(down, Call.within(0.2))  # too little left to start another model
    limited = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", "REQUESTS_PER_S_LIMIT")
    assert not falls_back(limited, Call.within(None))  # another model would refuse it too
    full = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL")
    assert falls_back(full, Call.within(None))
    bad = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "bad", "INVALID_REQUEST")
    assert not falls_back(bad, Call.within(None))
