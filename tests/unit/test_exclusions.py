"""A request's exclusions expire (router/exclusions.py): 2 s, doubling per failure, ≤ 30 s."""

from __future__ import annotations

from meshserve.router.routing.exclusions import Exclusions


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_excluded_replica_is_tried_again_later_and_later() -> None:
    clock = Clock()
    ex = Exclusions(clock)
    a, b = ("10.0.0.1:1", 7, 1), ("10.0.0.2:1", 7, 1)
    ex.add(a)
    assert a in ex and b not in ex and len(ex) == 1
    clock.now = 2.01  # first exclusion: 2 s
    assert a not in ex and len(ex) == 0
    ex.add(a)  # failed again: 4 s
    clock.now += 3.9
    assert a in ex
    clock.now += 0.2
    assert a not in ex
    for _ in range(10):  # keeps failing: capped at 30 s
        ex.add(a)
    clock.now += 29.9
    assert a in ex
    clock.now += 0.2
    assert a not in ex
