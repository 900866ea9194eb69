"""A replica's device time shared among its streams (nodeagent/share.py): exact with a fake
clock. Whatever the overlap, the streams' GPU-seconds sum to busy time x GPUs."""

from __future__ import annotations

import pytest
from meshserve.nodeagent.share import DeviceShare


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("gpus", "intervals", "expected"),
    [
        # one stream alone: its whole time
        (1, [(0, 10)], [10.0]),
        # two streams fully overlapping: half each
        (1, [(0, 10), (0, 10)], [5.0, 5.0]),
        # partial overlap: 0-5 alone (5), 5-10 shared (2.5 each), 10-15 alone (5)
        (1, [(0, 10), (5, 15)], [7.5, 7.5]),
        # a gap in between bills nothing
        (1, [(0, 2), (8, 10)], [2.0, 2.0]),
        # a 4-GPU gang: x4
        (4, [(0, 10), (0, 10)], [20.0, 20.0]),
        # 32 streams for one second on one GPU: one GPU-second in all, not 32
        (1, [(0, 1)] * 32, [1 / 32] * 32),
    ],
)
def test_streams_share_the_device_time(
    gpus: int, intervals: list[tuple[float, float]], expected: list[float]
) -> None:
    clock = Clock()
    share = DeviceShare(gpus, clock)
    events = sorted(
        [(start, 1, i) for i, (start, _end) in enumerate(intervals)]
        + [(end, 0, i) for i, (_start, end) in enumerate(intervals)]
    )  # ends before starts at the same instant
    marks: dict[int, float] = {}
    used: dict[int, float] = {}
    for at, starts, i in events:
        clock.now = 100.0 + at
        if starts:
            marks[i] = share.join()
        else:
            used[i] = share.leave(marks[i])
    assert [used[i] for i in range(len(intervals))] == pytest.approx(expected)
    busy = sum(end - start for start, end in _union(intervals))
    assert sum(used.values()) == pytest.approx(busy * gpus)


def test_since_reads_without_leaving() -> None:
    clock = Clock()
    share = DeviceShare(1, clock)
    a = share.join()
    clock.now += 4
    b = share.join()
    clock.now += 2
    assert share.since(a) == pytest.approx(5.0)  # 4 alone + 2 shared
    assert share.leave(b) == pytest.approx(1.0)
    clock.now += 1
    assert share.leave(a) == pytest.approx(6.0)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
