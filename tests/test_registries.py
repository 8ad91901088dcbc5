"""The registries of model families (`presets.FAMILIES`) and executors (`pcbench.run.executors`): each
entry implements its interface, an unknown name is one clear line, and a new entry is all a new
family needs."""

from __future__ import annotations

import dataclasses

import pytest

from pcbench.spec import presets
from pcbench.spec.config import ModelSpec, SpecError


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
    from pcbench.train import memory
    from pcbench import models

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


def test_each_executor_implements_the_interface():
    from pcbench.run.executors import EXECUTORS, Executor

    assert list(EXECUTORS) == ["local", "debug", "slurm"]
    for name, ex in EXECUTORS.items():
        assert isinstance(ex, Executor) and ex.name == name
        assert type(ex).run is not Executor.run  # the abstract method is implemented
        assert ex.verb == ("submitted" if ex.submits else "run")
    assert [n for n, ex in EXECUTORS.items() if ex.submits] == ["slurm"]  # the others run in-process


def test_unknown_executor_is_one_line(tmp_path):
    import subprocess
    import sys

    from pcbench.run.executors import named

    with pytest.raises(SpecError) as e:
        named("kubernetes")
    assert str(e.value) == "--executor: unknown executor 'kubernetes'; choose from local, debug, slurm"
    p = subprocess.run([sys.executable, "-m", "pcbench.cli", "run", str(tmp_path / "g.yaml"), "--executor", "k8s"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice: 'k8s' (choose from" in p.stderr and "Traceback" not in p.stderr


def test_in_process_executors_say_what_was_interrupted():
    from pcbench.train import interrupts
    from pcbench.run.executors import EXECUTORS

    stop = interrupts.Interrupted(2, 7)
    stop.run_id = "base-1"
    assert EXECUTORS["local"].interrupted(stop) == "run base-1 recorded interrupted at step 7, its checkpoints kept"
    stop.run_id = None
    assert EXECUTORS["debug"].interrupted(stop) == "no run was in progress"
    assert EXECUTORS["slurm"].interrupted(stop) == "stopped waiting (the SLURM jobs go on)"


class _FakeSubmitit:
    """Stands in for `submitit.AutoExecutor` (no SLURM here): records parameters and submissions."""

    made: list = []

    def __init__(self, folder, cluster):
        self.cluster, self.params, self.batched = cluster, {}, []
        _FakeSubmitit.made.append(self)

    def update_parameters(self, **kw):
        self.params.update(kw)

    def batch(self):
        import contextlib

        return contextlib.nullcontext()

    def submit(self, job):
        from types import SimpleNamespace

        self.batched.append(job.run_id)
        return SimpleNamespace(job_id=str(100 + sum(len(e.batched) for e in _FakeSubmitit.made)))


def test_slurm_executor_submits_stages_with_afterok(tmp_path, monkeypatch):
    """Through the registry: one submission per stage, the dependent one `afterok` on the base's
    job, each run recorded submitted with its job id; nothing trains."""
    import submitit

    from pcbench.run import launch
    from pcbench.grid import load_grid
    from test_launch import tiny_grid

    monkeypatch.setattr(_FakeSubmitit, "made", [])
    monkeypatch.setattr(submitit, "AutoExecutor", _FakeSubmitit)
    grid = load_grid(tiny_grid(tmp_path))
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    out = launch.submit(grid, store, "slurm", log_dir=tmp_path / "logs")
    assert len(out.submitted) == 3 and not out.blocked and not out.failed
    base, comp = _FakeSubmitit.made
    assert base.cluster == "slurm" and base.params["name"] == "pcbench-base"
    assert base.params["slurm_partition"] == "debug" and base.params["timeout_min"] == 10
    assert "dependency" not in base.params.get("slurm_additional_parameters", {})
    base_id = next(r.id for r in grid.runs if r.stage == "base")
    job = store.status(base_id)["job_id"]
    assert comp.params["name"] == "pcbench-compress"
    assert comp.params["slurm_additional_parameters"] == {"dependency": f"afterok:{job}", "kill-on-invalid-dep": "yes"}
    assert sorted(comp.batched) == sorted(r.id for r in grid.runs if r.stage == "compress")
    for r in grid.runs:
        st = store.status(r.id)
        assert st["state"] == "submitted" and st["executor"] == "slurm" and st["job_id"] == str(out.jobs[r.id].job_id)


def test_debug_executor_runs_in_process(tmp_path):
    from pcbench.run import launch
    from pcbench.grid import load_grid
    from test_launch import tiny_grid

    grid = load_grid(tiny_grid(tmp_path, base_steps=10))
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    out = launch.submit(grid, store, "debug", progress=False, log_dir=tmp_path / "logs")
    assert len(out.submitted) == 3 and not out.failed and not out.blocked, out
    assert all(store.state(r.id) == "completed" for r in grid.runs)
