"""How the fence (cluster/fence.py) tells etcd members apart: accepting (up), refusing (down:
its host answered, so etcd is down for everyone and leases are frozen) and silent (out of
reach: maybe a quorum that goes on without us). Real sockets on this host."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from meshserve.cluster.fence import DOWN, SILENT, UP, members, reach


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def refusing() -> Iterator[int]:
    with socket.socket() as s:  # bound, never listening: connects are refused
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


async def test_a_member_that_accepts_is_up(listening: int) -> None:
    assert await reach("127.0.0.1", listening) == UP


async def test_a_member_that_refuses_is_down(refusing: int) -> None:
    assert await reach("127.0.0.1", refusing) == DOWN


async def test_a_member_that_never_answers_is_silent() -> None:
    """A listener whose accept queue is full drops new SYNs: the connect hears nothing, as
    across a partition (the e2e partition tests cut real links)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filling = []
        try:
            for _ in range(4):  # more than the queue holds; none is accepted
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                filling.append(c)
            assert await reach("127.0.0.1", port, timeout_s=0.5) == SILENT
        finally:
            for c in filling:
                c.close()


def test_members_are_every_address_an_endpoint_names() -> None:
    assert members(["127.0.0.1:2379", "[::1]:2380"]) == [("127.0.0.1", 2379), ("::1", 2380)]
    assert ("127.0.0.1", 2379) in members(["localhost:2379"])
    assert members(["no-such-host.invalid:2379"]) == [("no-such-host.invalid", 2379)]
