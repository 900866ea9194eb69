"""Shared fixtures: a real etcd server, unique key prefixes, the tiny demo model."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest
from meshserve.cluster.etcd_process import EtcdProcess
from meshserve.cluster.keys import Keyspace
from meshserve.cluster.store import EtcdConfig, Store, connect


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    server = EtcdProcess(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def keys() -> Keyspace:
    """A fresh prefix per test, so tests sharing one etcd never see each other's keys."""
    return Keyspace(f"/test-{uuid.uuid4().hex[:8]}/")


@pytest.fixture
async def etcd_client(etcd_server: EtcdProcess) -> AsyncIterator[aetcd.Client]:
    client = connect(EtcdConfig(etcd_server.endpoint))
    yield client
    await client.close()


@pytest.fixture
def store(etcd_client: aetcd.Client, keys: Keyspace) -> Store:
    return Store(etcd_client, keys)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from meshserve.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def classifier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-initialised image classifier (ResNet, 32x32 RGB, 10 classes)."""
    pytest.importorskip("torch")
    from meshserve.demo_model import build_classifier

    return build_classifier(tmp_path_factory.mktemp("models") / "classifier")
