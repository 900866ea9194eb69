"""Route documents (`meshserve route apply FILE`): YAML → RouteSpec, checked (DESIGN §9).

    name: chat                        # what clients ask for (not a model's or an alias's name)
    targets: {chat-v2: 10, chat-v1: 90}   # weighted, sticky per session key (else tenant)
    sticky: session                   # session (default) | tenant | none
    rules:                            # the first that matches picks its target
      - {name: team-a, tenants: [team-a], target: chat-v2}
      - {metadata: {x-canary: "1"}, target: chat-v2}
      - {min_prompt_chars: 8000, target: chat-long}
      - {min_priority: high, target: chat-v1}
    fallbacks: [chat-small, {model: hosted, max_wait_s: 5}]
    max_wait_s: 2                     # a hop's longest queue wait while a fallback is left
    shadows: {chat-v3: 0.1}           # a copy of 10 % of requests, answers discarded
    cascade: {model: chat-small, min_mean_logprob: -0.6, tokens: 16}  # small first; escalate
                                      # to the target when its first 16 tokens' mean is lower

A target, rule target, fallback or shadow is a model or an alias (not another route).
"""

from __future__ import annotations

import math
import time
from typing import Any

from meshserve.cluster.keys import check_name
from meshserve.v1 import cluster_pb2, common_pb2

FIELDS = {"name", "targets", "rules", "fallbacks", "max_wait_s", "sticky", "shadows", "cascade"}
RULE_FIELDS = {"name", "tenants", "tenant", "metadata", "min_priority", "min_prompt_chars",
               "max_prompt_chars", "target"}  # fmt: skip
STICKY = ("session", "tenant", "none")
DEFAULT_MAX_WAIT_S = 2.0


def _weighted(field: str, given: Any, shares: bool) -> list[cluster_pb2.RouteTarget]:
    """``{model: weight}`` or ``[{model:, weight:}]`` (or bare model names: weight 1)."""
    if isinstance(given, dict):
        items = list(given.items())
    elif isinstance(given, list):
        items = []
        for item in given:
            if isinstance(item, str):
                items.append((item, 1.0))
            elif isinstance(item, dict) and "model" in item:
                items.append((item["model"], item.get("weight", 1.0)))
            else:
                raise ValueError(f"{field}: each item is a model name or {{model:, weight:}}")
    else:
        raise ValueError(f"{field}: a mapping of model to weight, or a list")
    out = []
    for model, weight in items:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{field}.{model}: weight must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w <= 0 or (shares and w > 1):
            bound = "in (0, 1]" if shares else "a positive number"
            raise ValueError(f"{field}.{model}: weight must be {bound}, got {weight!r}")
        out.append(cluster_pb2.RouteTarget(model=check_name("model", str(model)), weight=w))
    if len({t.model for t in out}) != len(out):
        raise ValueError(f"{field}: a model is named twice")
    return out


def _seconds(field: str, given: Any) -> float:
    try:
        s = float(given)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: seconds, got {given!r}") from None
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{field}: seconds >= 0, got {given!r}")
    return s


def _priority(field: str, given: Any) -> int:
    if isinstance(given, int) and given in common_pb2.Priority.values():
        return given
    key = f"PRIORITY_{str(given).upper()}"
    if key not in common_pb2.Priority.keys():  # noqa: SIM118 - protobuf enum wrapper
        names = [k.removeprefix("PRIORITY_").lower() for k in common_pb2.Priority.keys()]  # noqa: SIM118
        raise ValueError(f"{field}: one of {names}, got {given!r}")
    return int(common_pb2.Priority.Value(key))


def _count(field: str, given: Any) -> int:
    if not isinstance(given, int) or isinstance(given, bool) or given < 0:
        raise ValueError(f"{field}: a whole number >= 0, got {given!r}")
    return given


def _rule(i: int, d: Any) -> cluster_pb2.RouteRule:
    where = f"rules[{i}]"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a mapping with a target")
    if unknown := sorted(set(d) - RULE_FIELDS):
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(RULE_FIELDS)}")
    if "target" not in d:
        raise ValueError(f"{where}: 'target' is required")
    tenants = d.get("tenants", [d["tenant"]] if "tenant" in d else [])
    if not isinstance(tenants, list):
        raise ValueError(f"{where}.tenants: a list of tenant names")
    metadata = d.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}.metadata: a mapping of header name to value")
    rule = cluster_pb2.RouteRule(
        name=str(d.get("name", "")) or f"rule{i}",
        tenants=[str(t) for t in tenants],
        metadata={str(k).lower(): str(v) for k, v in metadata.items()},
        target=check_name("model", str(d["target"])),
    )
    if "min_priority" in d:
        rule.min_priority = _priority(f"{where}.min_priority", d["min_priority"])  # type: ignore[assignment]
    rule.min_prompt_chars = _count(f"{where}.min_prompt_chars", d.get("min_prompt_chars", 0))
    rule.max_prompt_chars = _count(f"{where}.max_prompt_chars", d.get("max_prompt_chars", 0))
    if rule.max_prompt_chars and rule.max_prompt_chars < rule.min_prompt_chars:
        raise ValueError(f"{where}: max_prompt_chars is below min_prompt_chars")
    return rule


def _hop(i: int, d: Any) -> cluster_pb2.RouteHop:
    if isinstance(d, str):
        return cluster_pb2.RouteHop(model=check_name("model", d))
    if not isinstance(d, dict) or "model" not in d or set(d) - {"model", "max_wait_s"}:
        raise ValueError(f"fallbacks[{i}]: a model name or {{model:, max_wait_s:}}")
    wait = _seconds(f"fallbacks[{i}].max_wait_s", d.get("max_wait_s", 0))
    return cluster_pb2.RouteHop(model=check_name("model", str(d["model"])), max_wait_s=wait)


def _cascade(d: Any) -> cluster_pb2.RouteCascade:
    if not isinstance(d, dict) or "model" not in d or "min_mean_logprob" not in d:
        raise ValueError("cascade: {model:, min_mean_logprob:, tokens:} (tokens: 16 if unset)")
    if unknown := sorted(set(d) - {"model", "min_mean_logprob", "tokens"}):
        raise ValueError(f"cascade: unknown field(s) {unknown}")
    try:
        threshold = float(d["min_mean_logprob"])
    except (TypeError, ValueError):
        raise ValueError("cascade.min_mean_logprob: a number <= 0 (a log probability)") from None
    if not math.isfinite(threshold) or threshold > 0:
        raise ValueError(f"cascade.min_mean_logprob: a number <= 0, got {d['min_mean_logprob']!r}")
    tokens = _count("cascade.tokens", d.get("tokens", 16))
    if not 1 <= tokens <= 4096:
        raise ValueError(f"cascade.tokens: 1..4096, got {tokens}")
    model = check_name("model", str(d["model"]))
    return cluster_pb2.RouteCascade(model=model, min_mean_logprob=threshold, tokens=tokens)


def route_from_dict(d: Any) -> cluster_pb2.RouteSpec:
    """Raises ValueError naming the field at fault."""
    if not isinstance(d, dict):
        raise ValueError("a route is a mapping with a name and targets")
    if unknown := sorted(set(d) - FIELDS):
        raise ValueError(f"unknown field(s) {unknown}; known: {sorted(FIELDS)}")
    if "name" not in d:
        raise ValueError("field 'name' is required")
    spec = cluster_pb2.RouteSpec(
        name=check_name("route", str(d["name"])), updated_unix_ms=int(time.time() * 1000)
    )
    spec.targets.extend(_weighted("targets", d.get("targets", {}), shares=False))
    spec.rules.extend(_rule(i, r) for i, r in enumerate(d.get("rules", []) or []))
    if not spec.targets and not spec.rules:
        raise ValueError("targets: a route needs at least one target (or rules)")
    if "cascade" in d:
        spec.cascade.CopyFrom(_cascade(d["cascade"]))
    fallbacks = d.get("fallbacks", []) or []
    if not isinstance(fallbacks, list):
        raise ValueError("fallbacks: a list, tried in order")
    spec.fallbacks.extend(_hop(i, h) for i, h in enumerate(fallbacks))
    if len({h.model for h in spec.fallbacks}) != len(spec.fallbacks):
        raise ValueError("fallbacks: a model is named twice")
    spec.shadows.extend(_weighted("shadows", d.get("shadows", {}), shares=True))
    spec.max_wait_s = _seconds("max_wait_s", d.get("max_wait_s", DEFAULT_MAX_WAIT_S))
    spec.sticky = str(d.get("sticky", "session"))
    if spec.sticky not in STICKY:
        raise ValueError(f"sticky: one of {list(STICKY)}, got {spec.sticky!r}")
    named = {t.model for t in spec.targets} | {r.target for r in spec.rules}
    named |= {h.model for h in spec.fallbacks} | {s.model for s in spec.shadows}
    named |= {spec.cascade.model} - {""}
    if spec.name in named:
        raise ValueError(f"route {spec.name!r} names itself: a target must be a model or alias")
    return spec


def models_named(spec: cluster_pb2.RouteSpec) -> list[str]:
    """Every model a route may send to (targets, rule targets, fallbacks, shadows), in order."""
    out: list[str] = []
    for name in (
        [t.model for t in spec.targets]
        + [r.target for r in spec.rules]
        + [h.model for h in spec.fallbacks]
        + [s.model for s in spec.shadows]
    ):
        if name not in out:
            out.append(name)
    return out
