"""vLLM's KV events become the blocks the router computes from a prompt (engines.vllm_kv): the
agent names each block by the chained hash of its tokens from the root of its salt, so an event
lands on exactly the hashes `router.core.prefixes` makes of the same prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshserve.kvblocks import DEVICE, HOST, Cleared, Removed, Stored, chain, root
from meshserve.nodeagent.engines.vllm_kv import Translator, salt_of


# vLLM's event types, by name and fields (vllm/distributed/kv_events.py), without vLLM.
@dataclass
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


@dataclass
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = "GPU"


@dataclass
class AllBlocksCleared:
    pass


PROMPT = list(range(100, 100 + 64))  # 4 blocks of 16
B = 16


def test_stored_blocks_are_named_as_the_router_names_the_prompt() -> None:
    t = Translator()
    # vLLM stores the prompt in two events: the first two blocks, then two more after them
    first = BlockStored([9001, 9002], None, PROMPT[:32], B, extra_keys=[("tenant-a",), None])
    rest = BlockStored([9003, 9004], 9002, PROMPT[32:], B)
    out = t.batch(0, [first]) + t.batch(1, [rest])
    want = chain(PROMPT, B, root("tenant-a"))
    assert out == [Stored(tuple(want[:2]), DEVICE), Stored(tuple(want[2:]), DEVICE)]
    assert t.batch(2, [BlockRemoved([9004, 9003], "GPU")]) == [Removed((want[3], want[2]), DEVICE)]
    assert t.batch(3, [AllBlocksCleared()]) == [Cleared()] and not t.ours


def test_unsalted_and_host_blocks_and_unknown_media() -> None:
    t = Translator()
    out = t.batch(5, [BlockStored([1], None, PROMPT[:16], B, medium="CPU"),
                      BlockStored([2], None, PROMPT[:16], B, medium="STORAGE")])  # fmt: skip
    assert out == [Stored((chain(PROMPT[:16], B, root())[0],), HOST)]


def test_a_gap_clears_and_an_orphan_chain_is_skipped() -> None:
    t = Translator()
    t.batch(0, [BlockStored([1, 2], None, PROMPT[:32], B)])
    out = t.batch(2, [BlockStored([3], 2, PROMPT[32:48], B)])  # batch 1 was lost
    assert out == [Cleared()] and t.skipped == 1  # its parent's name went with the gap


def test_salt_and_adapter_from_vllm_extra_keys() -> None:
    assert salt_of(None, None) == ()
    assert salt_of(("s",), None) == ("s",)
    assert salt_of(("lora-x", ("mm", 0), "s"), "lora-x") == ("lora-x", "s")
    assert salt_of(("lora-x",), "lora-x") == ("lora-x",)
