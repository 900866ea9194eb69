"""Entry point of the node agent (``meshserve agent``)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

import grpc
from meshserve.cluster.fence import Fence
from meshserve.cluster.store import EtcdConfig
from meshserve.lifecycle.service import Cluster, Component, serve
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import DeviceProbe, open_probe
from meshserve.nodeagent.engines import preload_engines
from meshserve.nodeagent.fleet import Fleet
from meshserve.nodeagent.reconcile import Reconciler
from meshserve.nodeagent.server import AgentControl, AgentInference
from meshserve.telemetry import metrics
from meshserve.v1 import inference_pb2_grpc, nodeagent_pb2_grpc

log = logging.getLogger("meshserve.nodeagent")


class Agent(Component):
    services = ("meshserve.v1.Inference", "meshserve.v1.NodeAgent")

    def __init__(self, config: AgentConfig, cluster: Cluster, probe: DeviceProbe) -> None:
        self.config = config
        self.probe = probe
        fence = Fence(
            cluster.session,
            EtcdConfig(config.service.etcd).endpoints,
            lambda fenced: metrics.AGENT_FENCED.set(int(fenced)),
        )
        self.reconciler = Reconciler(config, cluster.store, cluster.session, probe, fence=fence)

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(AgentInference(self.reconciler), server)
        nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(AgentControl(self.reconciler), server)

    async def start(self, address: str) -> Mapping[str, str]:
        await self.reconciler.start(address)
        log.info("node agent %s on %s", self.config.node_id, self.probe.kind)
        return {"node_id": self.config.node_id}

    async def drain(self) -> None:
        """Every replica DRAINING: routers send no new streams; those running finish within the
        grace period, and routers move the rest to another replica (failover)."""
        await self.reconciler.drain_all()

    async def stop(self) -> None:
        await self.reconciler.stop()
        self.probe.close()


class SimulatedFleet(Component):
    """``--simulate N``: N agents in this process (nodeagent/fleet.py), each on its own port;
    this process's own server answers health only."""

    services = ()

    def __init__(self, config: AgentConfig, cluster: Cluster, n: int) -> None:
        self.fleet = Fleet(cluster.store, config, n)

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self, address: str) -> Mapping[str, str]:
        await self.fleet.start()
        addresses = ",".join(a.address for a in self.fleet.agents.values())
        return {"agents": str(len(self.fleet.agents)), "addresses": addresses}

    async def stop(self) -> None:
        await self.fleet.stop()


async def run(config: AgentConfig, simulate: int = 0) -> None:
    # CUDA numbers GPUs fastest first unless told otherwise; NVML (and so placements' indices)
    # by PCI bus. Engines bind by uuid (binding.py), and this keeps `cuda:<i>` the same GPU.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    engines = await asyncio.to_thread(preload_engines)
    log.info("engines available: %s", ", ".join(engines) or "none")

    async def make(cluster: Cluster) -> Component:
        if simulate:
            return SimulatedFleet(config, cluster, simulate)
        return Agent(config, cluster, open_probe(config.device))

    await serve("nodeagent", config.service, make, grace_s=config.drain_grace_s)
