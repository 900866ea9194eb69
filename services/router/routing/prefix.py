"""Which replica holds which prefix of a prompt (pure): one `PrefixIndex` per model, over the
chained block hashes of `meshserve.kvblocks`.

Two feeds, as DESIGN §9 and llm-d's precise and approximate scorers have them:

- **Events** (precise): a replica's engine reports blocks stored (on the device or in host RAM),
  removed, or all cleared, each batch with a sequence number. A batch whose number does not
  follow the last one means events were lost: the replica's blocks are dropped and
  `apply` returns False, so the feed asks its agent for a fresh snapshot (a resync) instead of
  trusting a stale view. A replica that restarts or leaves loses its blocks (`forget`).
- **Sends** (approximate): the blocks of a prompt the router has just sent to a replica are
  *pending* there for ``pending_ttl`` seconds, so a burst of one prefix does not pile onto one
  replica, nor scatter, before the engine's events arrive; engines without events are served by
  this feed alone (the torch engine has no prefix cache, so it is not hashed at all).

Memory is bounded: each replica keeps at most ``capacity`` blocks (least recently stored first
out), so the index holds at most capacity x replicas entries, about 200 bytes each (bench/
routing.py measures it: 6.1 GiB for 1 k replicas at the default capacity). A block's holders are
one int, a bit mask of replica slots, so a query walks a prompt's blocks once for all replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from meshserve.kvblocks import DEVICE, HOST, Cleared, Event, Removed, Stored

CAPACITY = 32_768  # blocks a replica keeps in the index (512 k tokens at 16 a block)
PENDING_TTL_S = 2.0

__all__ = ["DEVICE", "HOST", "Cleared", "Event", "Match", "PrefixIndex", "Removed", "Stored"]


class Match(NamedTuple):
    """How much of a prompt's prefix a replica holds, in blocks (a tuple: one per candidate of
    every decision)."""

    device: int = 0  # leading blocks on its device (known from events)
    host: int = 0  # the leading blocks after those, in its host RAM
    pending: int = 0  # leading blocks after those that this router sent it very recently

    @property
    def blocks(self) -> int:
        return self.device + self.host + self.pending


NO_MATCH = Match()


@dataclass
class _Replica:
    blocks: OrderedDict[int, int] = field(default_factory=OrderedDict)  # hash → medium, LRU
    pending: dict[int, float] = field(default_factory=dict)  # hash → expiry
    seq: int = -1  # last event batch applied (-1: none yet)
    bit: int = 0  # its slot's bit in the holders' masks


class PrefixIndex:
    """The blocks of one model's replicas (module docstring). Replicas are named by whatever
    key the caller uses (the router uses the agent's address)."""

    def __init__(self, capacity: int = CAPACITY, pending_ttl: float = PENDING_TTL_S) -> None:
        self.capacity = capacity
        self.pending_ttl = pending_ttl
        self._replicas: dict[str, _Replica] = {}
        # hash → the replicas holding it, as a bit mask of their slots (one int a block: the
        # index's memory is mostly these and the replicas' own LRU maps)
        self._holders: dict[int, int] = {}
        self._slots: dict[str, int] = {}
        self._names: dict[int, str] = {}  # a slot's bit → its replica
        self._free: list[int] = []
        self._pending: dict[int, dict[str, float]] = {}  # hash → {replica: expiry}
        self._host_entries = 0  # blocks in host RAM, all replicas (0: skip the medium check)
        self.version = 0  # bumped by every change: a cached match is good while it holds

    # --- the event feed ----------------------------------------------------------------------

    def apply(self, replica: str, seq: int, events: Iterable[Event]) -> bool:
        """One batch of a replica's events. False (and its blocks dropped) when ``seq`` does not
        follow the last batch: events were lost, the caller must resync it."""
        self.version += 1
        r = self._replica(replica)
        if r.seq >= 0 and seq != r.seq + 1:
            self.forget(replica)
            return False
        r.seq = seq
        for ev in events:
            if isinstance(ev, Stored):
                for h in ev.hashes:
                    self._store(replica, r, h, ev.medium)
            elif isinstance(ev, Removed):
                for h in ev.hashes:
                    if r.blocks.get(h) == ev.medium:
                        self._drop(replica, r, h)
            else:
                for h in list(r.blocks):
                    self._drop(replica, r, h)
        return True

    def resync(self, replica: str, seq: int, blocks: Iterable[tuple[int, int]]) -> None:
        """A replica's whole state (``(hash, medium)`` pairs, oldest first) as of batch ``seq``:
        what an agent sends when a feed starts and after a gap. The router's own pending sends
        there stay (they steer repeats of a prefix while the feed restarts)."""
        kept = self._replicas[replica].pending if replica in self._replicas else {}
        self.forget(replica)
        r = self._replica(replica)
        r.seq = seq
        for h, until in kept.items():
            r.pending[h] = until
            self._pending.setdefault(h, {})[replica] = until
        for h, medium in blocks:
            self._store(replica, r, h, medium)

    def forget(self, replica: str) -> None:
        """The replica left, restarted or lost events: none of its blocks are known."""
        self.version += 1
        r = self._replicas.pop(replica, None)
        if r is None:
            return
        for h, medium in r.blocks.items():
            self._host_entries -= medium == HOST
            self._unhold(h, r.bit)
        for h in r.pending:
            self._unpend(h, replica)
        slot = self._slots.pop(replica)
        del self._names[1 << slot]
        self._free.append(slot)

    # --- the send feed -----------------------------------------------------------------------

    def sent(self, replica: str, hashes: Sequence[int], now: float) -> None:
        """This router just sent a prompt with these blocks to ``replica``: they are pending
        there until an event confirms them or ``pending_ttl`` passes."""
        self.version += 1
        r = self._replica(replica)
        until = now + self.pending_ttl
        for h in hashes:
            if h in r.blocks:
                r.blocks.move_to_end(h)
                continue
            r.pending.pop(h, None)  # refreshed: to the young end (the trim drops the oldest)
            r.pending[h] = until
            self._pending.setdefault(h, {})[replica] = until
        if len(r.pending) > self.capacity:  # the oldest go first (dicts keep insertion order)
            for h in list(r.pending)[: len(r.pending) - self.capacity]:
                del r.pending[h]
                self._unpend(h, replica)

    # --- queries ---------------------------------------------------------------------------

    def match(
        self, hashes: Sequence[int], replicas: Iterable[str] | None, now: float
    ) -> dict[str, Match]:
        """For each replica (of ``replicas``; None: all) that holds a leading run of ``hashes``,
        how many blocks: known ones first (device, then host), then pending ones; replicas
        left out hold none. One walk down the prompt's blocks for all replicas at once (a bit
        mask of those still holding every block so far: one lookup and an AND a block), which
        stops when none is left; pending runs are found by binary search (a block hash names its
        whole prefix, so a replica's pending blocks are a leading run)."""
        if not hashes:
            return {}
        wanted = None if replicas is None else set(replicas)
        runs: dict[str, int] = {}
        alive = self._holders.get(hashes[0], 0)
        j = 0
        while alive:
            j += 1
            nxt = self._holders.get(hashes[j], 0) & alive if j < len(hashes) else 0
            gone = alive & ~nxt
            while gone:
                low = gone & -gone
                runs[self._names[low]] = j
                gone ^= low
            alive = nxt
        out: dict[str, Match] = {}
        for k, n in runs.items():
            if wanted is not None and k not in wanted:
                continue
            host = 0
            if self._host_entries:  # the blocks from the first host one on are fetched
                blocks = self._replicas[k].blocks
                host = n - next((i for i in range(n) if blocks.get(hashes[i]) == HOST), n)
            pending = 0
            if n < len(hashes) and k in self._pending.get(hashes[n], ()):
                pending = self._run(hashes, n, self._pending_at(k, now)) - n
            out[k] = Match(n - host, host, pending)
        for k in self._pending.get(hashes[0], ()):  # pending from the first block on
            if k not in out and (wanted is None or k in wanted):
                pending = self._run(hashes, 0, self._pending_at(k, now))
                if pending:
                    out[k] = Match(0, 0, pending)
        return out

    def _pending_at(self, k: str, now: float) -> Callable[[int], bool]:
        return lambda h: self._pending.get(h, {}).get(k, 0.0) > now

    @staticmethod
    def _run(hashes: Sequence[int], lo: int, held: Callable[[int], bool]) -> int:
        """The end of the run of blocks from ``lo`` that satisfy ``held`` (assumed leading)."""
        hi = len(hashes)
        if lo >= hi or not held(hashes[lo]):
            return lo
        lo += 1  # hashes[lo - 1] is held; find the first not held in [lo, hi)
        while lo < hi:
            mid = (lo + hi) // 2
            if held(hashes[mid]):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def holds(self, replica: str) -> dict[int, int]:
        """A replica's blocks (hash → medium), oldest first: what a rebuild is compared with."""
        r = self._replicas.get(replica)
        return dict(r.blocks) if r else {}

    def entries(self) -> int:
        return sum(len(r.blocks) for r in self._replicas.values())

    def replicas(self) -> list[str]:
        return list(self._replicas)

    # --- bookkeeping -------------------------------------------------------------------------

    def _replica(self, replica: str) -> _Replica:
        r = self._replicas.get(replica)
        if r is None:
            slot = self._free.pop() if self._free else len(self._slots)
            self._slots[replica] = slot
            self._names[1 << slot] = replica
            r = self._replicas[replica] = _Replica(bit=1 << slot)
        return r

    def _store(self, replica: str, r: _Replica, h: int, medium: int) -> None:
        self._host_entries += (medium == HOST) - (r.blocks.get(h) == HOST)
        r.blocks[h] = medium
        r.blocks.move_to_end(h)
        self._holders[h] = self._holders.get(h, 0) | r.bit
        if r.pending.pop(h, None) is not None:
            self._unpend(h, replica)
        while len(r.blocks) > self.capacity:
            old, was = r.blocks.popitem(last=False)
            self._host_entries -= was == HOST
            self._unhold(old, r.bit)

    def _drop(self, replica: str, r: _Replica, h: int) -> None:
        self._host_entries -= r.blocks.pop(h) == HOST
        self._unhold(h, r.bit)

    def _unhold(self, h: int, bit: int) -> None:
        left = self._holders.get(h, 0) & ~bit
        if left:
            self._holders[h] = left
        else:
            self._holders.pop(h, None)

    def _unpend(self, h: int, k: str) -> None:
        owners = self._pending.get(h)
        if owners is not None:
            owners.pop(k, None)
            if not owners:
                del self._pending[h]
