"""Model size presets as data (no torch): what specs validate against and plans count from.

`pcbench.models` builds networks from these; `pcbench.config`, the grid, the memory planner and
the preflight checks read them without importing torch or transformers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

SIZE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff")


@dataclass(frozen=True)
class Preset:
    """A model size. `weights` names a source of pretrained weights (None: train from scratch)."""

    family: str  # gpt2 | llama
    layers: int
    d_model: int
    heads: int
    d_ff: int
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    tokenizer: str = "gpt2"
    weights: Optional[str] = None  # "smollm2-gguf" | "hub:<id>" | "path" | None
    description: str = ""
    vocab: Optional[int] = None  # hub presets: the checkpoint's vocabulary (shape-only planning)
    tied: bool = False  # hub presets: the checkpoint ties its embedding and head


PRESETS: dict[str, Preset] = {
    # The paper's GPT-2-style bases (d_ff = 4 d, head_dim 64, GPT-2 tokenizer).
    "gpt2-300m": Preset("gpt2", 16, 1024, 16, 4096, description="paper's 300M base"),
    "gpt2-800m": Preset("gpt2", 24, 1536, 24, 6144, description="paper's 800M base"),
    # CPU-sized GPT-2-style models (byte-level BPE trained on the book corpus).
    "gpt2-nano": Preset("gpt2", 2, 32, 2, 128, head_dim=16, tokenizer="bpe-512",
                        description="~60k params: default CPU study"),
    "gpt2-tiny": Preset("gpt2", 2, 64, 2, 256, head_dim=32, tokenizer="bpe-512",
                        description="~165k params: mini CPU study"),
    "gpt2-small": Preset("gpt2", 4, 128, 4, 512, head_dim=32, tokenizer="bpe-4096",
                         description="~1.3M params"),
    "llama-tiny": Preset("llama", 2, 64, 4, 192, kv_heads=2, head_dim=16, tokenizer="bpe-512",
                         description="tiny SwiGLU/GQA model for tests"),
    "llama-bench": Preset("llama", 4, 256, 4, 1024, kv_heads=2, head_dim=64, tokenizer="bpe-4096",
                          description="the step-cost benchmark model"),
    # Real pretrained Llama-family models.
    "smollm2-135m": Preset("llama", 30, 576, 9, 1536, kv_heads=3, head_dim=64, tokenizer="model",
                           weights="smollm2-gguf", description="SmolLM2-135M-Instruct (packaged GGUF)"),
    # Any Llama-family checkpoint given by `model.path` (its config decides the sizes).
    "hf": Preset("llama", 0, 0, 1, 0, tokenizer="model", weights="path",
                 description="a Llama-family HF checkpoint from model.path"),
    "llama3.2-1b": Preset("llama", 16, 2048, 32, 8192, kv_heads=8, head_dim=64, tokenizer="model",
                          weights="hub:meta-llama/Llama-3.2-1B",
                          description="Llama-3.2-1B from a path or the HF cache", vocab=128256, tied=True),
    "llama3.1-8b": Preset("llama", 32, 4096, 32, 14336, kv_heads=8, head_dim=128, tokenizer="model",
                          weights="hub:meta-llama/Llama-3.1-8B",
                          description="Llama-3.1-8B from a path or the HF cache", vocab=128256),
}


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


def param_count(p: Preset, vocab: int) -> int:
    """Parameters of a from-scratch model of preset `p` (as `models.build_config` builds it: no
    biases, untied head, RMSNorm weights; gpt2: ungated FFN, llama: gated), counted without torch.
    Equal to `models.count_params(...)["total"]` (tests/test_layers.py checks every preset)."""
    hd = p.head_dim or p.d_model // p.heads
    kv = p.kv_heads or p.heads
    attn = p.d_model * hd * (2 * p.heads + 2 * kv)  # q, o; k, v
    ffn = (2 if p.family == "gpt2" else 3) * p.d_model * p.d_ff
    layer = attn + ffn + 2 * p.d_model  # two norms
    return 2 * vocab * p.d_model + p.layers * layer + p.d_model  # embedding, head, final norm
