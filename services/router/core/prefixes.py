"""What the router knows of prompts and caches (DESIGN §9, issue 24): per model a prefix index
(routing.prefix) fed by the agents' block events (core.kvfeed) and by its own sends, and the
TTFT forecaster (routing.ttft) fitted from the first tokens it sees.

A request's prompt is tokenized as its model's engine does (the sim engine's 4-byte tokens; for
torch and vLLM models the Hugging Face tokenizer and chat template from the model's local source,
rendered as transformers does: a sandboxed Jinja environment, then the text without special
tokens, exactly what `nodeagent.engines.prompts.encode` gives the engine) and cut into chained
block hashes of the engine's block size, salted by the request's ``cache_salt``.
Models whose engine keeps no prefix cache (block size 0) are not hashed: nothing to find.

`Pending` is one stream's forecast: taken when its slot is, resolved at its first token (the
observed TTFT teaches the fit and scores the prediction) or abandoned when it ends before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from meshserve.artifacts.s3 import Location, fetch_files, is_registry
from meshserve.kvblocks import chain, root, sim_text, sim_tokens
from meshserve.router.routing.endpoints import Endpoint, Route
from meshserve.router.routing.pipeline import Ask
from meshserve.router.routing.prefix import NO_MATCH, Match, PrefixIndex
from meshserve.router.routing.ttft import Forecaster, Work, predict
from meshserve.telemetry import metrics
from meshserve.v1 import cluster_pb2, inference_pb2

log = logging.getLogger(__name__)
OFF_LOOP_CHARS = 8_000  # longer prompts are tokenized in a worker thread
RETRY_S = 60.0  # a tokenizer that failed to load is tried again after this
SIM, TORCH, VLLM = (
    cluster_pb2.ENGINE_KIND_SIM,
    cluster_pb2.ENGINE_KIND_TORCH,
    cluster_pb2.ENGINE_KIND_VLLM,
)


@dataclass
class Pending:
    """One stream's forecast, until its first token."""

    model: str
    kind: str
    address: str
    work: Work
    predicted_s: float
    sent_at: float  # monotonic
    done: bool = False  # first token seen, or abandoned


class Tokenizers:
    """Token ids of a prompt as the model's engine makes them (module docstring)."""

    def __init__(self) -> None:
        # (model, source) → ((tokenizer, template, specials) or None, when loaded)
        self._hf: dict[tuple[str, str], tuple[Any, float]] = {}
        self._loading: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def tokens(self, spec: cluster_pb2.ModelSpec, req: inference_pb2.GenerateRequest) -> list[int]:
        if spec.engine == SIM:  # as sim_engine.generate builds its text
            return sim_tokens(sim_text(req.prompt, req.messages))
        if spec.engine not in (TORCH, VLLM, 0):
            return []
        hf = self._hf_tokenizer(spec)
        if hf is None:
            return []
        tok, template, specials = hf
        if not req.messages:
            return list(tok.encode(req.prompt).ids)
        turns = [{"role": m.role, "content": m.content} for m in req.messages]
        if template is None:  # as prompts.encode without a template
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
            return list(tok.encode(text).ids)
        try:
            text = template.render(messages=turns, add_generation_prompt=True, **specials)
        except Exception:  # a template that needs what the router lacks: route by load
            return []
        return list(tok.encode(text, add_special_tokens=False).ids)

    def ready(self, spec: cluster_pb2.ModelSpec) -> bool:
        """Whether ``tokens`` can answer now: the sim engine's tokens need nothing; a Hugging
        Face tokenizer must have been loaded (`load_soon`), or failed less than RETRY_S ago."""
        if spec.engine == SIM:
            return True
        got = self._hf.get((spec.name, spec.source))
        return got is not None and (got[0] is not None or time.monotonic() - got[1] < RETRY_S)

    def load_soon(self, spec: cluster_pb2.ModelSpec) -> None:
        """Loads the model's tokenizer and chat template in a worker thread (a tokenizer.json
        is megabytes: never on the event loop), once at a time."""
        key = (spec.name, spec.source)
        if key in self._loading:
            return
        self._loading.add(key)

        async def load() -> None:
            try:
                await asyncio.to_thread(self.load, spec)
            finally:
                self._loading.discard(key)

        self._tasks.add(task := asyncio.get_running_loop().create_task(load()))
        task.add_done_callback(self._tasks.discard)

    def load(self, spec: cluster_pb2.ModelSpec) -> None:
        """Loads the model's tokenizer now (blocking: a worker thread's job)."""
        try:
            if is_registry(spec.source):  # its tokenizer files from the registry, checked
                with tempfile.TemporaryDirectory(prefix="meshserve-tok-") as tmp:
                    loc = Location.parse(spec.source, spec.source_endpoint, spec.source_region)
                    asyncio.run(fetch_files(loc, spec.revision, TOKENIZER_FILES, Path(tmp)))
                    got = _load_hf(Path(tmp))
            else:
                got = _load_hf(Path(spec.source))
        except Exception as e:  # a router without tokenizers, or a bad file: route by load
            log.info("no tokenizer for %s (%s): routing it without prefixes", spec.name, e)
            got = None
        self._hf[(spec.name, spec.source)] = (got, time.monotonic())

    def _hf_tokenizer(self, spec: cluster_pb2.ModelSpec) -> Any:
        got = self._hf.get((spec.name, spec.source))
        return got[0] if got else None


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # _load_hf's


def _load_hf(source: Path) -> tuple[Any, Any, dict[str, str]] | None:
    """(tokenizer, compiled chat template or None, special token strings) from a local model
    directory; None when it has no tokenizer.json."""
    if not (source / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer  # the torch extra's (so is jinja2)

    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    config: dict[str, Any] = {}
    if (source / "tokenizer_config.json").is_file():
        config = json.loads((source / "tokenizer_config.json").read_text())
    specials = {
        k: v.get("content", "") if isinstance(v, dict) else str(v)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (v := config.get(k))
    }
    source_text = config.get("chat_template")
    if isinstance(source_text, list):  # named templates: the default one
        source_text = next((t["template"] for t in source_text if t.get("name") == "default"), None)
    if (source / "chat_template.jinja").is_file():
        source_text = (source / "chat_template.jinja").read_text()
    if not source_text:
        return tok, None, specials
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, **_kw: json.dumps(
        x, indent=indent, ensure_ascii=False
    )
    env.globals["raise_exception"] = raise_exception
    return tok, env.from_string(source_text), specials


class Prompt(NamedTuple):
    """A request's prompt as routing sees it."""

    blocks: tuple[int, ...] = ()  # chained block hashes
    tokens: int = 0  # prompt tokens (0: not tokenized)
    block_tokens: int = 0  # the block size hashed with (replicas of another size do not match)
    model: str = ""  # whose tokenizer and index (a fallback model's replicas have their own)


NOT_HASHED = Prompt()


class Prefixes:
    def __init__(self) -> None:
        self.indexes: dict[str, PrefixIndex] = {}
        self.forecasts: dict[str, Forecaster] = {}  # per model (queued work is per replica)
        self.tokenizers = Tokenizers()
        # The last pick's matches: its scorers and its send share them while the index holds.
        self._memo: tuple[Ask | None, str, int, dict[str, Match]] = (None, "", -1, {})

    def index(self, model: str) -> PrefixIndex:
        ix = self.indexes.get(model)
        if ix is None:
            ix = self.indexes[model] = PrefixIndex()
        return ix

    def forecast(self, model: str) -> Forecaster:
        f = self.forecasts.get(model)
        if f is None:
            f = self.forecasts[model] = Forecaster()
        return f

    # --- a request's prompt --------------------------------------------------------------------

    def prompt(self, route: Route, req: inference_pb2.GenerateRequest) -> Prompt:
        """The prompt's chained block hashes, in the block size of the model's replicas (the
        first READY one's: replicas of another size get no matches), and its token count."""
        block = next((e.kv_block_tokens for e in route.ready if e.kv_block_tokens), 0)
        if not block:
            return NOT_HASHED
        try:
            tokens = self.tokenizers.tokens(route.base or route.spec, req)  # an adapter: its base's
        except Exception:  # never fail a request over routing: it goes by load
            log.exception("tokenizing a prompt for %s failed", route.spec.name)
            return NOT_HASHED
        if not tokens:
            return NOT_HASHED
        parent = root(req.cache_salt) if req.cache_salt else ROOT
        return Prompt(tuple(chain(tokens, block, parent)), len(tokens), block, route.spec.name)

    async def prompt_soon(self, route: Route, req: inference_pb2.GenerateRequest) -> Prompt:
        """`prompt`, off the event loop for long prompts (tokenizing 100 k characters takes
        milliseconds every other stream would wait for) and while a model's tokenizer loads
        (the request meanwhile goes by load)."""
        spec = route.base or route.spec  # an adapter's prompts: its base's tokenizer
        if not self.tokenizers.ready(spec):
            self.tokenizers.load_soon(spec)
            return NOT_HASHED
        size = len(req.prompt) + sum(len(m.content) for m in req.messages)
        if size > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.prompt, route, req)
        return self.prompt(route, req)

    # --- what the routing pipeline reads (View.matches, View.predict) ---------------------

    def matches(self, model: str, cands: Sequence[Endpoint], ask: Ask) -> Mapping[str, Match]:
        ix = self.indexes.get(model)
        if ix is None or ask.model != model:  # a fallback's index: not this prompt's hashes
            return {}
        memo_ask, memo_model, version, memo = self._memo
        if memo_ask is ask and memo_model == model and version == ix.version:
            return memo
        # Every replica that holds a prefix of it (a replica of another block size holds
        # none of these hashes, and its sends are not recorded: see `sent`).
        got = ix.match(ask.blocks, None, time.monotonic())
        self._memo = (ask, model, ix.version, got)
        return got

    def predict(
        self, model: str, cands: Sequence[Endpoint], ask: Ask, matches: Mapping[str, Match]
    ) -> list[float]:
        if not cands:
            return []
        f = self.forecast(model)
        ms = [matches.get(e.address, NO_MATCH) for e in cands]
        kind = cands[0].device_kind
        if any(e.device_kind != kind for e in cands):  # mixed hardware: one fit per kind
            return [predict(f.fit(model, e.device_kind), self.work(model, e, ask, m))
                    for e, m in zip(cands, ms, strict=True)]  # fmt: skip
        return f.predict_many(
            f.fit(model, kind),
            [e.address for e in cands],
            ask.tokens,
            [m.blocks * e.kv_block_tokens for e, m in zip(cands, ms, strict=True)],
            [m.host * e.kv_block_tokens for e, m in zip(cands, ms, strict=True)],
            [e.running for e in cands],
            [e.waiting for e in cands],
            [e.restore_s for e in cands],
        )

    def work(self, model: str, e: Endpoint, ask: Ask, m: Match) -> Work:
        b = e.kv_block_tokens
        return self.forecast(model).work(
            e.address, ask.tokens, m.blocks * b, m.host * b, e.running, e.waiting, e.restore_s
        )

    # --- a stream's forecast ---------------------------------------------------------------------

    def sent(self, model: str, e: Endpoint, ask: Ask) -> Pending | None:
        """A stream was given a slot on ``e``: its blocks are pending there (when they are
        this model's, in its block size), its work queued."""
        if not ask.tokens:
            return None
        now = time.monotonic()
        m = self.matches(model, [e], ask).get(e.address, NO_MATCH)  # before its own send counts
        if ask.blocks and ask.model == model and e.kv_block_tokens == ask.block_tokens:
            self.index(model).sent(e.address, ask.blocks, now)
        metrics.PROMPT_TOKENS.labels(model).inc(ask.tokens)
        if m.device or m.host:
            cached = min(ask.tokens, (m.device + m.host) * e.kv_block_tokens)
            metrics.CACHED_PROMPT_TOKENS.labels(model).inc(cached)
        f = self.forecast(model)
        work = self.work(model, e, ask, m)
        f.sent(e.address, work, ask.tokens)
        return Pending(
            model, e.device_kind, e.address, work, predict(f.fit(model, e.device_kind), work), now
        )

    def first_token(self, p: Pending) -> None:
        p.done = True
        observed = time.monotonic() - p.sent_at
        err = self.forecast(p.model).first_token(
            p.model, p.kind, p.address, p.work, p.predicted_s, observed
        )
        metrics.TTFT_PREDICTION_ERROR.labels(p.model).observe(err)

    def abandoned(self, p: Pending) -> None:
        p.done = True
        self.forecast(p.model).abandoned(p.address, p.work)

    def forget(self, model: str, address: str) -> None:
        """A replica left, restarted or its feed broke: none of its blocks are known."""
        ix = self.indexes.get(model)
        if ix is not None:
            ix.forget(address)


ROOT = root()
