"""Builds the tiny demo model locally: random-initialised Llama weights (``save_pretrained``) and a
byte-level BPE tokenizer trained here with ``tokenizers``. No download (DESIGN §7).

Hidden 64 with 2 heads gives head size 32, the smallest vLLM's CPU attention accepts, so the vLLM
engine can load the same files. Needs the ``torch`` extra.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

CORPUS = """\
Once upon a time there was a small mesh of machines that served many models to many people.
Each machine held a few models in memory and answered questions, one token at a time.
The scheduler decided where every model should live, and the router sent each request to the
machine that could answer it soonest. When a machine went away, the others took its work.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Errors should never pass silently, unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess. Now is better than never.
A request arrives with a prompt and a few sampling parameters: how many tokens, how hot, which seed.
def hello(name): return f"Hello, {name}!"  # code is text too: 0 1 2 3 4 5 6 7 8 9 + - * / = ( )
Graphics processors sit idle at eleven percent while nine models wait on nine cards.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or deprecation warnings from transformers and peft while the demo's
    files are written (`meshserve up` prints its own progress)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def build_demo_model(
    path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 128
) -> Path:
    """Writes the model to ``path`` unless a complete one is there; returns ``path``.

    The defaults are the demo (≈ 0.5 MB); benchmarks pass larger sizes (heads of 64 dims)."""
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        num_key_value_heads=max(2, hidden // 64),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # livelier random text than the default 0.02
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with _quiet():
        model.save_pretrained(path, safe_serialization=True)
    (path / "meshserve-demo.json").write_text(json.dumps({"seed": seed, "kind": "random-init"}))
    return path


def build_classifier(
    path: Path,
    seed: int = 0,
    image_size: int = 32,
    labels: int = 10,
    widths: tuple[int, ...] = (16, 32, 64),
    depth: int = 1,
) -> Path:
    """Writes a tiny random-initialised image classifier (a transformers ResNet, the torchvision
    architecture) to ``path`` unless one is there: the tensor model of the tests, the demo and
    bench/frontends.py (``engine_args: {task: classify}``). The defaults take 32x32 RGB images
    (≈ 45 kB); benchmarks pass larger sizes."""
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(  # type: ignore[call-arg]  # PretrainedConfig takes the extra keys
        num_channels=3,
        embedding_size=widths[0],
        hidden_sizes=list(widths),
        depths=[depth] * len(widths),
        num_labels=labels,
        image_size=image_size,  # kept in config.json: the engine's input shape
    )
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    with _quiet():
        model.save_pretrained(path, safe_serialization=True)
    (path / "meshserve-demo.json").write_text(json.dumps({"seed": seed, "kind": "random-init"}))
    return path


def build_demo_adapter(base: Path, path: Path, seed: int = 1, rank: int = 8) -> Path:
    """Writes a LoRA adapter of the demo model at ``base`` to ``path`` (PEFT format:
    adapter_config.json + adapter_model.safetensors) unless one is there; returns ``path``.

    Random A and B (``init_lora_weights=False``): peft's default makes B zero, an adapter that
    changes nothing (DESIGN §7), and tests must see each adapter's own output. Needs ``peft``."""
    if (path / "adapter_model.safetensors").exists():
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    with _quiet():
        get_peft_model(model, config).save_pretrained(str(path))
    return path
