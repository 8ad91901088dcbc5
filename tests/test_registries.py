"""The registries of model families (`presets.FAMILIES`) and executors (`pcbench.executors`): each
entry implements its interface, an unknown name is one clear line, and a new entry is all a new
family needs."""

from __future__ import annotations

import dataclasses

import pytest

from pcbench import presets
from pcbench.config import ModelSpec, SpecError


def test_presets_are_the_families_presets():
    assert list(presets.PRESETS) == [n for f in presets.FAMILIES.values() for n in f.presets]
    for name, p in presets.PRESETS.items():
        assert name in presets.FAMILIES[p.family].presets


def test_each_family_builds_its_own_class():
    import transformers

    from pcbench import models

    for fam_name, fam in presets.FAMILIES.items():
        cls = getattr(transformers, fam.config_class)
        assert cls.model_type == fam.model_type, fam_name
        name = next(n for n, p in fam.presets.items() if p.weights is None)
        config = models.build_config(ModelSpec(name=name), 512, 64)
        assert type(config) is cls and config.hidden_act == fam.hidden_act
        mlp = models._meta_model(config).model.layers[0].mlp
        assert hasattr(mlp, "gate_proj") == fam.gated, fam_name


def test_unknown_family_is_one_line():
    from pcbench import models

    with pytest.raises(SpecError) as e:
        models.family("gpt3")
    assert str(e.value) == "model.family: unknown model family 'gpt3'; known: gpt2, llama"


def test_a_new_family_is_one_entry(monkeypatch):
    """Registering a family (here Mistral) with a preset is enough to build, count and plan it."""
    from pcbench import memory, models

    tiny = presets.Preset(2, 64, 4, 192, kv_heads=2, head_dim=16, tokenizer="bpe-512")
    fam = presets.Family("MistralConfig", "mistral", "silu", gated=True, presets={"mistral-tiny": tiny})
    monkeypatch.setitem(presets.FAMILIES, "mistral", fam)
    monkeypatch.setitem(presets.PRESETS, "mistral-tiny", dataclasses.replace(tiny, family="mistral"))
    spec = ModelSpec(name="mistral-tiny")
    spec.validate("model")
    config = models.build_config(spec, 512, 64)
    assert config.model_type == "mistral"
    p = presets.resolved_preset(spec)
    assert presets.param_count(p, 512) == models.count_params(config)["total"]
    assert "mistral" not in memory._PLAIN_MLP
