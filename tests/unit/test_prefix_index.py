"""The router's prefix index (routing.prefix) and the block hashes it is keyed by (kvblocks)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from meshserve.kvblocks import chain, root, sim_tokens
from meshserve.router.routing.prefix import (
    DEVICE,
    HOST,
    Cleared,
    Event,
    Match,
    PrefixIndex,
    Removed,
    Stored,
)

HASHES = st.integers(0, 40)
MEDIA = st.sampled_from([DEVICE, HOST])
EVENTS = st.one_of(
    st.builds(lambda hs, m: Stored(tuple(hs), m), st.lists(HASHES, max_size=6), MEDIA),
    st.builds(lambda hs, m: Removed(tuple(hs), m), st.lists(HASHES, max_size=6), MEDIA),
    st.just(Cleared()),
)
BATCHES = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(EVENTS, max_size=4)), max_size=30
)


def replay(batches: list[tuple[str, list[Event]]]) -> dict[str, dict[int, int]]:
    """The obvious reading of the events: what each replica holds, hash → medium."""
    held: dict[str, dict[int, int]] = {}
    for replica, events in batches:
        blocks = held.setdefault(replica, {})
        for ev in events:
            if isinstance(ev, Stored):
                blocks.update(dict.fromkeys(ev.hashes, ev.medium))
            elif isinstance(ev, Removed):
                for h in ev.hashes:
                    if blocks.get(h) == ev.medium:
                        del blocks[h]
            else:
                blocks.clear()
    return held


@settings(max_examples=300, deadline=None)
@given(BATCHES)
def test_index_equals_a_rebuild_from_its_events(batches: list[tuple[str, list[Event]]]) -> None:
    index = PrefixIndex()
    seqs: dict[str, int] = {}
    for replica, events in batches:
        seqs[replica] = seqs.get(replica, -1) + 1
        assert index.apply(replica, seqs[replica], events)
    want = replay(batches)
    for replica in ("a", "b", "c"):
        assert index.holds(replica) == want.get(replica, {})
        # every held block is found by a query, with its medium
        for h, medium in want.get(replica, {}).items():
            m = index.match([h], [replica], 0.0).get(replica, Match())
            assert m == (Match(1, 0, 0) if medium == DEVICE else Match(0, 1, 0))
    assert index.entries() == sum(len(b) for b in want.values())
    for replica in ("a", "b", "c"):  # a resync from the state gives the same index
        fresh = PrefixIndex()
        fresh.resync(replica, 0, index.holds(replica).items())
        assert fresh.holds(replica) == index.holds(replica)


def test_a_gap_in_the_sequence_drops_the_replica_and_asks_for_a_resync() -> None:
    index = PrefixIndex()
    assert index.apply("a", 0, [Stored((1, 2, 3))])
    assert index.apply("a", 1, [Stored((4,))])
    assert not index.apply("a", 3, [Stored((5,))])  # batch 2 was lost
    assert index.holds("a") == {}
    assert index.match([1, 2], ["a"], 0.0).get("a", Match()) == Match()
    index.resync("a", 3, [(1, DEVICE), (2, DEVICE), (5, DEVICE)])
    assert index.apply("a", 4, [Removed((5,))])
    assert index.holds("a") == {1: DEVICE, 2: DEVICE}


def test_a_replica_that_restarts_or_leaves_loses_its_blocks() -> None:
    index = PrefixIndex()
    index.apply("a", 0, [Stored((1, 2))])
    index.apply("b", 0, [Stored((1,))])
    index.forget("a")
    assert index.match([1, 2], ["a", "b"], 0.0) == {"b": Match(1)}  # "a" holds nothing
    assert index.apply("a", 0, [Stored((7,))])  # a fresh start counts from 0 again


def test_match_counts_the_leading_run_device_then_host_then_pending() -> None:
    index = PrefixIndex(pending_ttl=1.0)
    prompt = chain(list(range(160)), 16, root())  # 10 blocks
    index.apply("a", 0, [Stored(tuple(prompt[:4])), Stored(tuple(prompt[4:6]), HOST)])
    index.sent("a", prompt, now=10.0)
    index.apply("b", 0, [Stored(tuple(prompt[:3]))])
    index.sent("c", prompt[:8], now=10.0)
    got = index.match(prompt, ["a", "b", "c", "d"], now=10.5)
    assert got == {"a": Match(4, 2, 4), "b": Match(3), "c": Match(0, 0, 8)}  # "d": none
    assert got["a"].blocks == 10
    later = index.match(prompt, ["a", "c"], now=11.5)  # pending sends expire
    assert later == {"a": Match(4, 2, 0)}
    assert index.match(prompt, None, now=10.5) == got  # None: every replica


def test_stored_events_confirm_pending_blocks() -> None:
    index = PrefixIndex(pending_ttl=1.0)
    index.sent("a", [1, 2, 3], now=0.0)
    index.apply("a", 0, [Stored((1, 2, 3))])
    assert index.match([1, 2, 3], ["a"], now=5.0).get("a", Match()) == Match(3)


def test_memory_is_bounded_per_replica() -> None:
    index = PrefixIndex(capacity=100)
    for seq in range(10):
        index.apply("a", seq, [Stored(tuple(range(seq * 50, seq * 50 + 50)))])
        index.sent("a", list(range(10_000 + seq * 50, 10_000 + seq * 50 + 50)), now=0.0)
    assert index.entries() == 100
    assert set(index.holds("a")) == set(range(400, 500))  # the oldest went first
    assert (
        sum(index.match([h], ["a"], 0.0).get("a", Match()).pending for h in range(10_000, 10_500))
        == 100
    )


def test_equal_tokens_under_another_cache_salt_or_adapter_are_other_blocks() -> None:
    tokens = sim_tokens("You are a helpful assistant. " * 20)
    plain = chain(tokens, 16, root())
    salted = chain(tokens, 16, root("tenant-a"))
    other = chain(tokens, 16, root("tenant-b"))
    assert len(plain) == len(tokens) // 16 > 3
    assert not set(plain) & set(salted) and not set(salted) & set(other)
    assert chain(tokens, 16, root("tenant-a")) == salted  # reproducible
    # a prompt extending another shares exactly the blocks of the common full blocks
    longer = chain([*tokens, *range(100)], 16, root())
    assert longer[: len(plain)] == plain
    index = PrefixIndex()
    index.apply("a", 0, [Stored(tuple(salted))])
    assert index.match(plain, ["a"], 0.0).get("a", Match()) == Match()
    assert index.match(salted, ["a"], 0.0).get("a", Match()) == Match(len(salted))


PROMPTS = [chain(list(range(i * 1000, i * 1000 + 160)), 16, root()) for i in range(4)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.sampled_from("abc"), st.integers(0, 1),
                  st.integers(1, 10), MEDIA),
        st.tuples(st.just("evict"), st.sampled_from("abc"), st.integers(0, 1),
                  st.integers(0, 9), MEDIA),
        st.tuples(st.just("drop"), st.sampled_from("abc"), st.integers(0, 1),
                  st.integers(0, 9), MEDIA),
        st.tuples(st.just("forget"), st.sampled_from("abc"), st.just(0), st.just(0), MEDIA),
    ),
    max_size=40,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(OPS, st.integers(0, 1), st.integers(1, 10))
def test_match_equals_the_leading_run_of_each_replicas_blocks(
    ops: list[tuple[str, str, int, int, int]], which: int, length: int
) -> None:
    """Stored prefixes, tail evictions, holes, replicas that leave and come back (slots reused): a
    query's match is, per replica, the leading run of the prompt's blocks it holds, device
    blocks before the first host one."""
    index = PrefixIndex()
    seqs: dict[str, int] = {}
    for op, replica, p, n, medium in ops:
        if op == "forget":
            index.forget(replica)
            seqs.pop(replica, None)
            continue
        seqs[replica] = seqs.get(replica, -1) + 1
        blocks = PROMPTS[p]
        ev: Event = (
            Stored(tuple(blocks[:n]), medium) if op == "store"
            else Removed(tuple(blocks[n:]), medium) if op == "evict"  # a prefix's tail
            else Removed((blocks[n % len(blocks)],), medium)  # one block: a hole in the middle
        )  # fmt: skip
        assert index.apply(replica, seqs[replica], [ev])
    query = PROMPTS[which][:length]
    got = index.match(query, "abc", now=0.0)
    for replica in "abc":
        held = index.holds(replica)
        run = next((i for i, h in enumerate(query) if h not in held), len(query))
        first_host = next((i for i in range(run) if held[query[i]] == HOST), run)
        assert got.get(replica, Match()) == Match(first_host, run - first_host, 0), (replica, held)
