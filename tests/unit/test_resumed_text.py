"""ResumedText: a resumed vLLM stream's text joins the client's copy as the uninterrupted
stream's would, with the demo's byte-level tokenizer (built here, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshserve.nodeagent.engines.prompts import ResumedText

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(demo_model: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def _byte(tok: object, b: int) -> int:
    """The id of the byte-level token for the single byte ``b`` (GPT-2's byte-to-character
    table: printable bytes stand for themselves, the rest for 256 + their rank)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {x: chr(x) for x in kept}
    table |= {x: chr(256 + n) for n, x in enumerate(x for x in range(256) if x not in table)}
    return int(tok.convert_tokens_to_ids(table[b]))  # type: ignore[attr-defined]


def test_an_incomplete_last_character_is_held_back_even_at_the_end(tok: object) -> None:
    """A stream whose last token is the first byte of "é" (0xC3): the uninterrupted vLLM stream
    never sends it, so neither does the resumed one (it was sent as "\\ufffd": the client's
    text then differed from an uninterrupted stream's by that character)."""
    hello = tok.encode("hello", add_special_tokens=False)  # type: ignore[attr-defined]
    first_half = _byte(tok, 0xC3)
    text = ResumedText(tok, hello, "hello", ())
    assert text.add([first_half], finished=False) == ""
    assert text.add([], finished=True) == ""
    # Completed by the next token, it is sent whole.
    text = ResumedText(tok, hello, "hello", ())
    assert text.add([first_half], finished=False) == ""
    assert text.add([_byte(tok, 0xA9)], finished=True) == "é"


def test_the_delta_past_what_the_client_has_and_a_stop_straddling_the_resume(tok: object) -> None:
    done = tok.encode("one two", add_special_tokens=False)  # type: ignore[attr-defined]
    more = tok.encode(" three four", add_special_tokens=False)  # type: ignore[attr-defined]
    assert ResumedText(tok, done, "one two", ()).add(more, finished=True) == " three four"
    stopping = ResumedText(tok, done, "one two", ("o th",))
    assert stopping.add(more, finished=False) == ""
    assert stopping.stopped
