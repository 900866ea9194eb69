"""The OpenAI front's steering fields (issue 24): ``user`` or the ``x-session-id`` header is the
session key (affinity), and ``cache_salt`` isolates the request's prefix cache."""

from __future__ import annotations

import pytest
from meshserve.router.fronts.openai_schema import ChatRequest, CompletionRequest, generate_request
from pydantic import ValidationError


def test_user_and_the_session_header_feed_affinity_and_the_salt_is_kept() -> None:
    body = ChatRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "alice",
         "cache_salt": "team-a"}
    )  # fmt: skip
    g = generate_request(body)
    assert g.session_key == "alice" and g.cache_salt == "team-a"
    assert generate_request(body, "conversation-7").session_key == "conversation-7"
    plain = generate_request(CompletionRequest.model_validate({"model": "m", "prompt": "x"}))
    assert plain.session_key == "" and plain.cache_salt == ""


def test_an_oversized_salt_is_refused() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "cache_salt": "s" * 257})
