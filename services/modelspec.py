"""Reads a model's YAML (``meshserve model apply``) into a validated ModelSpec."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meshserve.artifacts.manifest import is_sha256
from meshserve.artifacts.s3 import Location, is_registry
from meshserve.batchconfig import BatchConfig
from meshserve.cluster.keys import check_name
from meshserve.sizes import parse_bytes
from meshserve.v1 import cluster_pb2, common_pb2

FIELDS = {
    "name",
    "source",
    "engine",
    "engine_args",
    "memory",
    "kv_headroom",
    "min_replicas",
    "max_replicas",
    "priority",
    "aliases",
    "fallbacks",
    "max_model_len",
    "default_max_tokens",
    "warmup_prompts",
    "idle_timeout_s",
    "gpus_per_replica",
    "gpu_types",
    "node_selector",
    "placement_strategy",
    "slo_ttft_ms",
    "target_rps_per_replica",
    "target_in_flight_per_replica",
    "scale_down_delay_s",
    "routing",
    "revision",  # registry sources (s3://): the manifest's sha256 (`model apply` fills it in)
    "endpoint",
    "region",
    "kind",  # "model" (the default) or "adapter" (a LoRA adapter of ``base``)
    "base",
    "max_adapters",  # on a base model: adapters one replica holds at once
    "max_adapter_rank",
    "warm_in",  # "device" (default) or "host": where min_replicas may wait while idle
}
# What an adapter may not set: it is served on its base's replicas, with its base's settings.
NOT_FOR_ADAPTERS = {
    "engine",
    "engine_args",
    "kv_headroom",
    "min_replicas",
    "max_replicas",
    "max_model_len",
    "gpus_per_replica",
    "gpu_types",
    "node_selector",
    "placement_strategy",
    "max_adapters",
    "max_adapter_rank",
    "idle_timeout_s",
    "target_rps_per_replica",
    "target_in_flight_per_replica",
    "scale_down_delay_s",
    "warm_in",
}
WARM_IN = ("", "device", "host")
DEFAULT_KV_HEADROOM = 64 * 2**20
# The routers' scorers (router/routing/pipeline.py; a unit test holds the two lists equal).
ROUTING_SCORERS = ("ttft", "prefix", "affinity", "kv", "load", "adapter")


def routing_weights(given: Any, what: str = "routing") -> dict[str, float]:
    """Scorer weights (``{ttft: 8, affinity: 4, kv: 2, load: 1}``); raises ValueError naming the
    fault."""
    if not isinstance(given, dict):
        raise ValueError(f"{what}: a mapping of scorer to weight, got {given!r}")
    out: dict[str, float] = {}
    for name, weight in given.items():
        if name not in ROUTING_SCORERS:
            raise ValueError(
                f"{what}: unknown scorer {name!r}; known: {', '.join(ROUTING_SCORERS)}"
            )
        try:
            out[name] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{what}.{name}: a number >= 0, got {weight!r}") from None
        if not 0 <= out[name] < float("inf"):
            raise ValueError(f"{what}.{name}: a finite number >= 0, got {weight!r}")
    return out


def weights_bytes(source: Path) -> int:
    """Size of the weights on disk (safetensors, else any .bin): the memory estimate's base."""
    files = list(source.glob("*.safetensors")) or list(source.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


EXTERNAL_FIELDS = {"name", "engine", "url", "api_key_env", "served_model", "aliases",
                   "max_model_len", "default_max_tokens"}  # fmt: skip


def external_spec(d: dict[str, Any]) -> cluster_pb2.ModelSpec:
    """``engine: external``: an OpenAI-compatible endpoint the routers stream through (never
    placed: no source, memory or replicas). Raises ValueError naming the field at fault."""
    if unknown := sorted(set(d) - EXTERNAL_FIELDS):
        raise ValueError(
            f"engine external: {unknown} do not apply; known: {sorted(EXTERNAL_FIELDS)}"
        )
    if "name" not in d or "url" not in d:
        raise ValueError("engine external: fields 'name' and 'url' are required")
    url = str(d["url"]).rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url) < 10:
        raise ValueError(
            f"url: an OpenAI-compatible base URL (http(s)://host:port/v1), got {url!r}"
        )
    key_env = str(d.get("api_key_env", ""))
    if key_env and not key_env.replace("_", "").isalnum():
        raise ValueError(f"api_key_env: an environment variable's name, got {key_env!r}")
    return cluster_pb2.ModelSpec(
        name=check_name("model", str(d["name"])),
        engine=cluster_pb2.ENGINE_KIND_EXTERNAL,
        source=url,
        url=url,
        api_key_env=key_env,
        served_model=str(d.get("served_model", "")),
        aliases=[check_name("alias", str(a)) for a in d.get("aliases", [])],
        max_model_len=int(d.get("max_model_len", 0)),
        default_max_tokens=int(d.get("default_max_tokens", 0)),
    )


def spec_from_dict(d: dict[str, Any], base: Path = Path(".")) -> cluster_pb2.ModelSpec:
    """Raises ValueError naming the field at fault."""
    if str(d.get("engine", "")).lower() == "external":
        return external_spec(d)
    unknown = set(d) - FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    if "name" not in d or "source" not in d:
        raise ValueError("fields 'name' and 'source' are required")
    name = check_name("model", str(d["name"]))
    kind = str(d.get("kind", "model"))
    if kind not in ("model", "adapter"):
        raise ValueError(f"kind: must be model or adapter, got {kind!r}")
    if kind == "adapter":
        if not d.get("base"):
            raise ValueError("kind adapter: 'base' names the model it adapts")
        if wrong := sorted(NOT_FOR_ADAPTERS & set(d)):
            raise ValueError(f"kind adapter: {wrong} are its base model's to set")
    elif "base" in d:
        raise ValueError("base: only an adapter (kind: adapter) has a base model")
    engine = str(d.get("engine", "torch")).upper()
    registry = is_registry(str(d["source"]))
    source = Path(str(d["source"])).expanduser()
    if registry:
        Location.parse(str(d["source"]), str(d.get("endpoint", "")), str(d.get("region", "")))
        revision = str(d.get("revision", ""))
        if revision and not is_sha256(revision):
            raise ValueError(f"revision: a manifest's sha256 (64 hex digits), got {revision!r}")
    elif {"revision", "endpoint", "region"} & set(d):
        raise ValueError("revision, endpoint and region belong to registry (s3://) sources")
    if not source.is_absolute() and engine != "SIM" and not registry:  # sim: a label
        source = (base / source).resolve()
    if f"ENGINE_KIND_{engine}" not in cluster_pb2.EngineKind.keys():  # noqa: SIM118 - protobuf enum wrapper is not iterable
        raise ValueError(f"engine: must be torch, vllm, sim or external, got {d.get('engine')!r}")
    priority = str(d.get("priority", "normal")).upper()
    if f"PRIORITY_{priority}" not in common_pb2.Priority.keys():  # noqa: SIM118
        raise ValueError(
            f"priority: must be low, normal, high or critical, got {d.get('priority')!r}"
        )
    if kind == "adapter" and not registry and not (source / "adapter_config.json").is_file():
        raise ValueError(f"source: {source} holds no adapter_config.json (a PEFT LoRA adapter)")
    if "memory" in d:
        memory = parse_bytes(str(d["memory"]))
    elif registry:
        raise ValueError("memory: not given (`meshserve model apply` reads it from the manifest)")
    else:
        memory = weights_bytes(source)
    if memory <= 0:
        raise ValueError(f"memory: not given and no weights found under {source}")
    spec = cluster_pb2.ModelSpec(
        name=name,
        source=str(source) if engine != "SIM" and not registry else str(d["source"]),
        revision=str(d.get("revision", "")),
        source_endpoint=str(d.get("endpoint", "")),
        source_region=str(d.get("region", "")),
        engine=cluster_pb2.EngineKind.Value(f"ENGINE_KIND_{engine}"),
        engine_args={str(k): str(v) for k, v in (d.get("engine_args") or {}).items()},
        memory_bytes=memory,
        kv_headroom_bytes=parse_bytes(str(d["kv_headroom"]))
        if "kv_headroom" in d
        else DEFAULT_KV_HEADROOM,
        min_replicas=int(d.get("min_replicas", 0)),
        max_replicas=int(d.get("max_replicas", 0)),
        priority=common_pb2.Priority.Value(f"PRIORITY_{priority}"),
        aliases=[check_name("alias", str(a)) for a in d.get("aliases", [])],
        fallbacks=[check_name("fallback", str(f)) for f in d.get("fallbacks", [])],
        max_model_len=int(d.get("max_model_len", 0)),
        default_max_tokens=int(d.get("default_max_tokens", 0)),
        warmup_prompts=[str(p) for p in d.get("warmup_prompts", [])],
        idle_timeout_s=int(d.get("idle_timeout_s", 0)),
        gpus_per_replica=int(d.get("gpus_per_replica", 0)),
        gpu_types=[str(t) for t in d.get("gpu_types", [])],
        node_selector={str(k): str(v) for k, v in (d.get("node_selector") or {}).items()},
        placement_strategy=str(d.get("placement_strategy", "")),
        slo_ttft_ms=int(d.get("slo_ttft_ms", 0)),
        target_rps_per_replica=float(d.get("target_rps_per_replica", 0.0)),
        target_in_flight_per_replica=int(d.get("target_in_flight_per_replica", 0)),
        scale_down_delay_s=int(d.get("scale_down_delay_s", 0)),
        routing_weights=routing_weights(d["routing"]) if "routing" in d else {},
        base=check_name("base", str(d["base"])) if kind == "adapter" else "",
        max_adapters=int(d.get("max_adapters", 0)),
        max_adapter_rank=int(d.get("max_adapter_rank", 0)),
        warm_in=str(d.get("warm_in", "")),
    )
    if spec.base == spec.name:
        raise ValueError("base: an adapter cannot be its own base")
    if spec.max_adapters < 0 or spec.max_adapter_rank < 0:
        raise ValueError("max_adapters and max_adapter_rank must be >= 0")
    for key in ("stream_interval_ms", "stream_interval_tokens"):
        value = spec.engine_args.get(key, "0")
        if not value.isdigit():
            raise ValueError(f"engine_args.{key}: a whole number >= 0 (0 = off), got {value!r}")
    task = spec.engine_args.get("task", "generate")
    if task not in ("generate", "embed", "classify"):
        raise ValueError(f"engine_args.task: must be generate, embed or classify, got {task!r}")
    if task == "classify" and spec.engine == cluster_pb2.ENGINE_KIND_VLLM:
        raise ValueError("engine_args.task classify (tensor models) runs on engine torch")
    if task == "classify":
        BatchConfig.from_args(spec.engine_args, spec.slo_ttft_ms)  # raises naming the argument
    if spec.placement_strategy not in ("", "binpack", "spread"):
        raise ValueError(
            f"placement_strategy: must be binpack or spread, got {spec.placement_strategy!r}"
        )
    if spec.target_rps_per_replica < 0:
        raise ValueError("target_rps_per_replica must be >= 0")
    if spec.min_replicas < 0 or spec.max_replicas < 0:
        raise ValueError("min_replicas and max_replicas must be >= 0")
    if spec.warm_in not in WARM_IN:
        raise ValueError(
            f"warm_in: device (min_replicas READY on a device) or host (they may wait asleep in "
            f"CPU RAM while the model is idle), got {spec.warm_in!r}"
        )
    if spec.max_replicas and spec.max_replicas < spec.min_replicas:
        raise ValueError("max_replicas must be 0 (no limit) or >= min_replicas")
    return spec


def demo_spec(source: Path, min_replicas: int = 1) -> cluster_pb2.ModelSpec:
    """The built-in tiny model, registered as ``demo`` (alias ``tiny``)."""
    return spec_from_dict(
        {
            "name": "demo",
            "source": str(source),
            "aliases": ["tiny"],
            "min_replicas": min_replicas,
            "max_model_len": 2048,
            "default_max_tokens": 32,
            "kv_headroom": "16MiB",
            "warmup_prompts": ["Hello"],
        }
    )


def classifier_spec(source: Path) -> cluster_pb2.ModelSpec:
    """The built-in tiny image classifier, registered as ``classifier`` (a tensor model: KServe
    ModelInfer or the Infer RPC; no replica until the first request or a repository load)."""
    return spec_from_dict(
        {
            "name": "classifier",
            "source": str(source),
            "engine_args": {"task": "classify"},
            "min_replicas": 0,
            "kv_headroom": "1MiB",
        }
    )


def find_model(specs: Iterable[cluster_pb2.ModelSpec], name: str) -> cluster_pb2.ModelSpec | None:
    """The spec a request for ``name`` means: the model of that name, else the first whose
    aliases include it (the one lookup the router, scheduler and agents share)."""
    specs = list(specs)
    exact = next((s for s in specs if s.name == name), None)
    return exact or next((s for s in specs if name in s.aliases), None)


def alias_map(specs: Iterable[cluster_pb2.ModelSpec]) -> dict[str, str]:
    """Alias → model name, the first spec naming an alias winning (as in `find_model`)."""
    aliases: dict[str, str] = {}
    for spec in specs:
        for alias in spec.aliases:
            aliases.setdefault(alias, spec.name)
    return aliases
