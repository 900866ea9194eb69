"""`meshserve status` reads at 80 columns (cli/status.py's pure renderer over etcd records)."""

from __future__ import annotations

from meshserve.cli.status import render
from meshserve.v1 import cluster_pb2
from rich.console import Console

NOTE = (
    "device is the CPU: TIER_HOST keeps the weights in RAM (frees no device memory), and this "
    "sentence is long on purpose"
)


def view(width: int) -> str:
    node = cluster_pb2.NodeStatus(
        node_id="gpu-node-17", address="10.40.12.201:50061", device_kind="cuda",
        capacity_bytes=8 * 80 * 2**30, used_bytes=3 * 2**30,
    )  # fmt: skip
    for i in range(8):
        node.gpus.add(
            uuid=f"GPU-5d1c2a0e-4b7f-11ee-be56-0242ac12000{i}",
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 * 2**30,
            memory_used_bytes=i * 2**30,
            utilization=0.1 * i,
            health=cluster_pb2.DEVICE_HEALTH_FAILED if i == 3 else cluster_pb2.DEVICE_HEALTH_OK,
            health_reasons=["Xid 79: the GPU fell off the bus"] if i == 3 else [],
        )
    replicas = [
        cluster_pb2.ReplicaStatus(
            model=f"llama-3-8b-chat-{i}",
            node_id="gpu-node-17",
            state=cluster_pb2.REPLICA_STATE_READY,
            tier=cluster_pb2.TIER_DEVICE,
            tier_note=NOTE,
        )
        for i in range(3)
    ]
    replicas.append(
        cluster_pb2.ReplicaStatus(
            model="mistral-7b-summarizer",
            node_id="gpu-node-17",
            state=cluster_pb2.REPLICA_STATE_FAILED,
            error="out of device memory 3 times",
        )
    )
    console = Console(width=width, record=True)
    console.print(render([node], [], replicas, [], []))
    return console.export_text()


def test_status_fits_80_columns_with_ids_whole_and_notes_below_the_table() -> None:
    text = view(80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "10.40.12.201:50061" in text and "gpu-node-17" in text  # never cut nor wrapped
    assert sum("H100 80GB HBM3" in line for line in lines) == 8  # one row per GPU
    # Each replica is one row (its note a reference), and the shared note is printed once,
    # whole, below the table; the error has a number of its own.
    # A GPU's health and why: the reason numbered below the GPUs table.
    assert "FAILED [1]" in next(line for line in lines if "3 H100" in line)
    assert sum(" OK" in line for line in lines) == 7
    assert "[1] GPU-5d1c2a0e-4b7f-11ee-be56-0242ac120003: Xid 79: the GPU fell off the bus" in text
    rows = [line for line in lines if "llama-3-8b-chat-" in line]
    assert len(rows) == 3 and all("[2]" in row for row in rows)
    assert "[3]" in next(line for line in lines if "mistral-7b-summarizer" in line)
    below = " ".join(line.strip() for line in lines[lines.index(next(
        line for line in lines if line.startswith("[2] "))):])  # fmt: skip
    assert NOTE in below and "[3] out of device memory 3 times" in below


def test_a_registry_download_shows_its_progress_in_the_replica_s_state() -> None:
    fetching = cluster_pb2.ReplicaStatus(
        model="reg-model", node_id="n1", state=cluster_pb2.REPLICA_STATE_LOADING,
        download_bytes=3 * 2**30, download_total_bytes=12 * 2**30,
    )  # fmt: skip
    console = Console(width=100, record=True)
    console.print(render([], [], [fetching], [], []))
    row = next(line for line in console.export_text().splitlines() if "reg-model" in line)
    assert "LOADING 25% of 12" in row, row
