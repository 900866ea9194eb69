"""The router tokenizes a prompt exactly as the engine will (router.core.prefixes.Tokenizers vs
nodeagent.engines.prompts.encode with transformers' tokenizer): plain prompts and chat messages
through the model's chat template. Equal token ids are what make the router's block hashes equal
to the blocks the engine reports."""

from __future__ import annotations

from pathlib import Path

from meshserve.modelspec import spec_from_dict
from meshserve.nodeagent.engines.prompts import encode
from meshserve.router.core.prefixes import Tokenizers
from meshserve.v1 import inference_pb2

PROMPTS = ["Once upon a time", "The mesh serves many models on few cards. " * 30, "ünïcode ✓"]
CHATS = [
    [("system", "Be brief."), ("user", "Hi")],
    [("user", "What is a router?"), ("assistant", "A front door."), ("user", "And a mesh?")],
]


def test_router_tokens_equal_the_engines(demo_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model))
    spec = spec_from_dict({"name": "demo", "source": str(demo_model), "engine": "vllm"})
    router = Tokenizers()
    assert not router.ready(spec)  # never loaded on the event loop: `load_soon` does it
    router.load(spec)
    assert router.ready(spec)
    for prompt in PROMPTS:
        req = inference_pb2.GenerateRequest(model="demo", prompt=prompt)
        assert router.tokens(spec, req) == encode(tok, prompt, []), prompt
    for chat in CHATS:
        req = inference_pb2.GenerateRequest(model="demo")
        for role, content in chat:
            req.messages.add(role=role, content=content)
        want = encode(tok, "", req.messages)
        assert router.tokens(spec, req) == want and len(want) > 4, chat
