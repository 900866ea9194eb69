"""The order in which a model's waiting requests get slots (pure): priority first, then fair
shares across tenants within a priority, then age (DESIGN §9 Admission).

Fair shares are start-time fair queueing (Goyal et al., SFQ; the virtual-time idea behind
Kubernetes API Priority and Fairness and llm-d's flow control): each priority level keeps a
virtual time V; a request of tenant t gets the start tag S = max(V, F_t), and F_t = S + 1/w_t
(w_t: the tenant's weight); the waiter with the smallest S goes first, and V advances to the S of
each request served. A tenant that sends a burst gets tags far in the future, so a tenant that
sends one request now is served next; weights 3:1 give slots 3:1 while both wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sortedcontainers import SortedList

T = TypeVar("T")


@dataclass(eq=False)
class Entry(Generic[T]):
    item: T
    priority: int
    tenant: str
    start: float  # the SFQ start tag within its priority
    seq: int

    def key(self) -> tuple[int, float, int]:
        return (-self.priority, self.start, self.seq)


@dataclass
class _Level:
    virtual: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)  # tenant → F_t


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._entries: SortedList = SortedList(key=Entry.key)
        self._by_item: dict[int, Entry[T]] = {}
        self._levels: dict[int, _Level] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def push(self, item: T, priority: int, tenant: str, weight: float = 1.0) -> None:
        level = self._levels.setdefault(priority, _Level())
        start = max(level.virtual, level.finish.get(tenant, 0.0))
        level.finish[tenant] = start + 1.0 / max(weight, 1e-6)
        self._seq += 1
        entry = Entry(item, priority, tenant, start, self._seq)
        self._entries.add(entry)
        self._by_item[id(item)] = entry

    def remove(self, item: T) -> None:
        """Takes ``item`` out (served, gave up or shed); absent items are ignored."""
        entry = self._by_item.pop(id(item), None)
        if entry is not None:
            self._entries.remove(entry)

    def served(self, item: T) -> None:
        """``item`` got its slot: its level's virtual time advances to its start tag."""
        entry = self._by_item.get(id(item))
        if entry is not None:
            level = self._levels[entry.priority]
            level.virtual = max(level.virtual, entry.start)
        self.remove(item)

    def __iter__(self) -> Iterator[T]:
        """Waiters in service order (a snapshot: safe to change the queue meanwhile)."""
        return iter([e.item for e in self._entries])

    def lowest(self) -> tuple[T, int] | None:
        """The waiter to shed first: lowest priority, and within it the last in service order;
        with its priority."""
        if not self._entries:
            return None
        e: Entry[T] = self._entries[-1]
        return e.item, e.priority

    def reset_if_idle(self) -> None:
        """Nothing waits: fairness history no longer matters (SFQ restarts its clocks), and
        memory stays bounded by the tenants that wait, not those ever seen."""
        if not self._entries:
            self._levels.clear()
