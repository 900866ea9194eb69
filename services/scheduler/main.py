"""Entry point of the scheduler (``meshserve scheduler``)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from meshserve.lifecycle.service import Cluster, Component, serve
from meshserve.rpc.channels import ChannelPool
from meshserve.scheduler.config import SchedulerConfig
from meshserve.scheduler.leader import SchedulerLoop
from meshserve.scheduler.server import SchedulerService
from meshserve.v1 import scheduler_pb2_grpc


class Scheduler(Component):
    services = ("meshserve.v1.Scheduler",)

    def __init__(self, config: SchedulerConfig, cluster: Cluster) -> None:
        self.config = config
        self.loop = SchedulerLoop(config, cluster.store, cluster.session)
        self.channels = ChannelPool(traced=True)
        self.service = SchedulerService(self.loop, self.channels)

    def register(self, server: grpc.aio.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.service, server)

    async def start(self, address: str) -> Mapping[str, str]:
        self.loop.address = address  # what routers and standbys dial (in the election value)
        self.loop.start()
        return {"scheduler_id": self.config.scheduler_id}

    async def stop(self) -> None:
        await self.loop.stop()
        await self.channels.close()


async def run(config: SchedulerConfig) -> None:
    async def make(cluster: Cluster) -> Component:
        return Scheduler(config, cluster)

    await serve("scheduler", config.service, make, grace_s=2.0)
