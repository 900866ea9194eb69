"""Who is calling: tenants, their keys, what they may use, their limits, and the price table
(DESIGN §9 Tenancy). Pure parsing and lookup; tenant_source.py keeps the book current.

The book is YAML, from a file the router watches or from the etcd key ``<prefix>/config/tenants``
(so every router agrees)::

    tenants:
      - name: search                      # [a-z0-9-], unique
        keys: [sha256:9f86d0…]            # hashes of API keys (`meshserve tenant key` makes one)
        cert_subjects: [CN=search-batch]  # mTLS client certificate subjects that mean this tenant
        models: ["llama-*", demo]         # globs over model names and aliases; default: all
        max_priority: high                # ceiling on a request's priority; default normal
        default_priority: normal          # a request that names none
        weight: 2                         # share among tenants of one priority; default 1
        admin: false                      # may read every tenant's usage
        limits: {requests_per_s: 20, tokens_per_min: 120000, concurrent: 16}
        model_limits: {demo: {requests_per_s: 5}}
    prices:                               # per model (canonical name): cost in your currency
      demo: {input_per_1k: 0.0005, output_per_1k: 0.0015}
      big: {gpu_second: 0.0012}           # per GPU-second: its fair share of its replica's GPUs

Keys are stored as SHA-256 hashes: API keys are 256-bit random strings, so a fast hash is
enough (as GitHub and Stripe do for tokens); the book never holds a key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from meshserve.cluster.keys import valid_name
from meshserve.v1 import common_pb2

PRIORITIES = {
    "low": common_pb2.PRIORITY_LOW,
    "normal": common_pb2.PRIORITY_NORMAL,
    "high": common_pb2.PRIORITY_HIGH,
    "critical": common_pb2.PRIORITY_CRITICAL,
}
KEY_PREFIX = "msk-"


@dataclass(frozen=True)
class Limits:
    requests_per_s: float = 0.0  # 0: no limit
    tokens_per_min: float = 0.0  # input + output tokens
    concurrent: int = 0  # streams at once

    @property
    def any(self) -> bool:
        return bool(self.requests_per_s or self.tokens_per_min or self.concurrent)


@dataclass(frozen=True)
class Price:
    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    gpu_second: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int, gpu_seconds: float) -> float:
        return (
            input_tokens / 1000 * self.input_per_1k
            + output_tokens / 1000 * self.output_per_1k
            + gpu_seconds * self.gpu_second
        )


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: frozenset[str] = frozenset()
    cert_subjects: frozenset[str] = frozenset()
    models: tuple[str, ...] = ("*",)
    max_priority: int = common_pb2.PRIORITY_NORMAL
    default_priority: int = common_pb2.PRIORITY_NORMAL
    weight: float = 1.0
    limits: Limits = Limits()
    model_limits: Mapping[str, Limits] = field(default_factory=dict)
    admin: bool = False  # may read every tenant's usage

    def may_use(self, *names: str) -> bool:
        """Whether any of ``names`` (the name asked for, the canonical name, aliases) matches
        one of the tenant's model globs."""
        return any(fnmatch.fnmatchcase(n, g) for n in names if n for g in self.models)

    def priority(self, asked: int) -> int:
        """The request's priority: the tenant's default when it names none, capped."""
        return min(asked or self.default_priority, self.max_priority)


# Auth off (the local default): one implicit tenant, any model, any priority, no limits.
ANONYMOUS = Tenant("anonymous", max_priority=common_pb2.PRIORITY_CRITICAL, admin=True)


@dataclass(frozen=True)
class TenantBook:
    tenants: tuple[Tenant, ...] = ()
    prices: Mapping[str, Price] = field(default_factory=dict)
    auth: bool = False  # False: every caller is ANONYMOUS
    by_hash: Mapping[str, Tenant] = field(default_factory=dict)
    by_subject: Mapping[str, Tenant] = field(default_factory=dict)


OPEN_BOOK = TenantBook()


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_priority(value: Any, where: str) -> int:
    if isinstance(value, str) and value.lower() in PRIORITIES:
        return PRIORITIES[value.lower()]
    raise ValueError(f"{where}: priority must be one of {', '.join(PRIORITIES)}, got {value!r}")


def _number(doc: Mapping[str, Any], key: str, where: str) -> float:
    value = doc.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}.{key}: a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _limits(doc: Any, where: str) -> Limits:
    if doc is None:
        return Limits()
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: a mapping of requests_per_s, tokens_per_min, concurrent")
    unknown = set(doc) - {"requests_per_s", "tokens_per_min", "concurrent"}
    if unknown:
        raise ValueError(f"{where}: unknown limit(s) {', '.join(sorted(unknown))}")
    concurrent = _number(doc, "concurrent", where)
    if concurrent != int(concurrent):
        raise ValueError(f"{where}.concurrent: a whole number, got {concurrent}")
    rps, tpm = _number(doc, "requests_per_s", where), _number(doc, "tokens_per_min", where)
    return Limits(rps, tpm, int(concurrent))


def _strings(doc: Mapping[str, Any], key: str, where: str, default: Sequence[str]) -> list[str]:
    value = doc.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}.{key}: a list of non-empty strings")
    return value


def _tenant(doc: Any, i: int) -> Tenant:
    where = f"tenants[{i}]"
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: a mapping")
    known = {"name", "keys", "cert_subjects", "models", "max_priority", "default_priority",
             "weight", "limits", "model_limits", "admin"}  # fmt: skip
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    name = doc.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise ValueError(f"{where}.name: 1-128 letters, digits, '.', '_', ':' or '-', got {name!r}")
    where = f"tenant {name!r}"
    keys = _strings(doc, "keys", where, ())
    for k in keys:
        if not k.startswith("sha256:") or len(k) != 71:
            raise ValueError(
                f"{where}.keys: store hashes (sha256:<64 hex>, from `meshserve tenant key`), "
                "never the key itself"
            )
    ceiling = parse_priority(doc.get("max_priority", "normal"), f"{where}.max_priority")
    default = parse_priority(doc.get("default_priority", "normal"), f"{where}.default_priority")
    weight = _number(doc, "weight", where) if "weight" in doc else 1.0
    if weight <= 0:
        raise ValueError(f"{where}.weight: must be > 0")
    model_limits = doc.get("model_limits") or {}
    if not isinstance(model_limits, Mapping):
        raise ValueError(f"{where}.model_limits: a mapping of model → limits")
    return Tenant(
        name=name,
        key_hashes=frozenset(keys),
        cert_subjects=frozenset(_strings(doc, "cert_subjects", where, ())),
        models=tuple(_strings(doc, "models", where, ("*",))),
        max_priority=ceiling,
        default_priority=min(default, ceiling),
        weight=weight,
        limits=_limits(doc.get("limits"), f"{where}.limits"),
        model_limits={
            str(m): _limits(v, f"{where}.model_limits.{m}") for m, v in model_limits.items()
        },
        admin=_flag(doc, "admin", where),
    )


def _flag(doc: Mapping[str, Any], key: str, where: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: true or false, got {value!r}")
    return value


def parse_book(text: str | bytes) -> TenantBook:
    """A book from YAML; ValueError naming the first problem."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from None
    if not isinstance(doc, Mapping):
        raise ValueError("the tenants document is a mapping with `tenants:` and `prices:`")
    unknown = set(doc) - {"tenants", "prices"}
    if unknown:
        raise ValueError(f"unknown top-level field(s) {', '.join(sorted(unknown))}")
    raw = doc.get("tenants") or []
    if not isinstance(raw, list):
        raise ValueError("tenants: a list")
    tenants = tuple(_tenant(t, i) for i, t in enumerate(raw))
    by_hash: dict[str, Tenant] = {}
    by_subject: dict[str, Tenant] = {}
    names: set[str] = set()
    for t in tenants:
        if t.name in names:
            raise ValueError(f"tenant {t.name!r} is listed twice")
        names.add(t.name)
        for index, label in ((by_hash, "key"), (by_subject, "certificate subject")):
            for k in t.key_hashes if index is by_hash else t.cert_subjects:
                if k in index:
                    raise ValueError(f"one {label} names two tenants: {index[k].name}, {t.name}")
                index[k] = t
    prices_doc = doc.get("prices") or {}
    if not isinstance(prices_doc, Mapping):
        raise ValueError("prices: a mapping of model → {input_per_1k, output_per_1k, gpu_second}")
    prices = {}
    for model, p in prices_doc.items():
        where = f"prices.{model}"
        if not isinstance(p, Mapping) or set(p) - {"input_per_1k", "output_per_1k", "gpu_second"}:
            raise ValueError(f"{where}: a mapping of input_per_1k, output_per_1k, gpu_second")
        prices[str(model)] = Price(
            _number(p, "input_per_1k", where),
            _number(p, "output_per_1k", where),
            _number(p, "gpu_second", where),
        )
    return TenantBook(tenants, prices, True, by_hash, by_subject)
