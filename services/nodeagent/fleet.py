"""Many node agents in one process (`meshserve agent --simulate N`, bench/fleet.py, the fleet
tests): each with its own etcd lease, NodeStatus, replicas, reconcile loop and gRPC server on a
port of its own (real ports, so routers reach each as they reach any agent), sharing the
process's etcd client and one mirror of the model specs. Meant for `engine: sim` models, which
need no device; the node's memory is its ``memory_limit_bytes``.

An agent can be stopped cleanly (lease revoked: its keys vanish at once) or killed (server
gone, keepalive stopped, lease left to expire at its TTL), as a crashed host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

import grpc
from meshserve.cluster.mirror import Mirror
from meshserve.cluster.session import Session
from meshserve.cluster.store import Store
from meshserve.modelspec import spec_from_dict
from meshserve.nodeagent.config import AgentConfig
from meshserve.nodeagent.devices import HostProbe
from meshserve.nodeagent.reconcile import Reconciler
from meshserve.nodeagent.server import AgentControl, AgentInference
from meshserve.rpc.server import RunningServer, start_server
from meshserve.v1 import cluster_pb2, inference_pb2_grpc, nodeagent_pb2_grpc

log = logging.getLogger(__name__)
SERVICES = ("meshserve.v1.Inference", "meshserve.v1.NodeAgent")
START_AT_ONCE = 32  # agents started concurrently (etcd lease grants and watches)
STEP_S = 5.0  # the most a clean stop waits to publish DRAINING


def sim_spec(name: str, memory: str, kv_headroom: str) -> cluster_pb2.ModelSpec:
    """A small `engine: sim` model kept placed (min_replicas 1): what fleet tests and benches
    place by the hundred."""
    return spec_from_dict(
        {
            "name": name,
            "source": "sim://fleet",
            "engine": "sim",
            "memory": memory,
            "kv_headroom": kv_headroom,
            "min_replicas": 1,
            "max_model_len": 4096,
            "engine_args": {"ttft_ms": "5", "itl_ms": "2"},
        }
    )


async def ready_nodes(store: Store) -> dict[str, str]:
    """Model → the node of its READY replica, read from etcd."""
    entries, _rev = await store.list(store.keys.replicas(), cluster_pb2.ReplicaStatus)
    ready = cluster_pb2.REPLICA_STATE_READY
    return {e.value.model: e.value.node_id for e in entries if e.value.state == ready}


@dataclass
class SimAgent:
    config: AgentConfig
    session: Session
    reconciler: Reconciler
    server: RunningServer
    address: str


class Fleet:
    """``n`` agents named ``<base.node_id>-<i>`` on the host of ``base.service.listen`` (ports
    picked), advertised as ``base.service`` says."""

    def __init__(self, store: Store, base: AgentConfig, n: int) -> None:
        self.store = store
        self.base = base
        self.n = n
        self.lease_ttl_s = base.service.lease_ttl_s
        self.host = base.service.listen.rpartition(":")[0]
        self.agents: dict[str, SimAgent] = {}
        self.models = Mirror(store.client, store.keys.models(), cluster_pb2.ModelSpec)

    async def start(self) -> None:
        self.models.start()
        await asyncio.wait_for(self.models.synced.wait(), 30)
        names = [f"{self.base.node_id}-{i}" for i in range(self.n)]
        for i in range(0, len(names), START_AT_ONCE):
            await asyncio.gather(*(self.start_agent(n) for n in names[i : i + START_AT_ONCE]))
        log.info("fleet of %d simulated agents serving", len(self.agents))

    async def start_agent(self, node_id: str) -> SimAgent:
        """Starts (or starts again after a kill) one agent."""
        config = replace(self.base, node_id=node_id, cache_dir="")
        session = Session(self.store.client, self.lease_ttl_s)
        await session.start()
        reconciler = Reconciler(config, self.store, session, HostProbe(), models=self.models)

        def register(server: grpc.aio.Server) -> None:
            inference_pb2_grpc.add_InferenceServicer_to_server(AgentInference(reconciler), server)
            nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(AgentControl(reconciler), server)

        server = await start_server(f"{self.host}:0", [register], SERVICES)
        address = self.base.service.advertise(server.port)
        await reconciler.start(address)
        agent = self.agents[node_id] = SimAgent(config, session, reconciler, server, address)
        return agent

    async def kill(self, node_id: str) -> None:
        """As a crash: calls cut, no more keepalives; the lease expires at its TTL."""
        agent = self.agents.pop(node_id)
        await agent.server.server.stop(None)
        await agent.reconciler.stop()
        await agent.session.abandon()

    async def stop_agent(self, node_id: str) -> None:
        """Clean: drain, stop serving, revoke the lease (its keys vanish at once)."""
        agent = self.agents.pop(node_id)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.reconciler.drain_all(), STEP_S)
        await agent.server.server.stop(1.0)
        await agent.reconciler.stop()
        await agent.session.close()

    async def stop(self) -> None:
        await asyncio.gather(
            *(self.stop_agent(n) for n in list(self.agents)), return_exceptions=True
        )
        await self.models.stop()
