"""Grid expansion: derived values, stable ids, the DAG, filters, and clear errors for bad grids."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pcbench.spec.config import SpecError
from pcbench.grid import GridSpec, expand, from_dict, load_grid
from pcbench.models import build_config, count_params
from pcbench.spec.config import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "defaults": {"data": {"tokenizer": "bpe-512", "seq_len": 32}, "train": {"batch_size": 4}},
    "stages": {
        "base": {"axes": {"ratio": [20, 80]},
                 "spec": {"model": {"name": "gpt2-nano"}, "train": {"tokens": "${ratio * params}"}}},
        "compress": {"from": "base",
                     "axes": {"method": ["hpr", "pc"], "level": [0.5, 0.65]},
                     "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                              "compress": {"method": "${method}", "compression": "${level}"},
                              "train": {"steps": 3}},
                     "overrides": [{"when": {"method": "pc"}, "set": {"optim": {"lr": 0.0005}}}]},
    },
}


def grid(d):
    return expand(from_dict(GridSpec, copy.deepcopy(d), "grid"))


def test_expansion_derived_values_and_dag():
    g = grid(BASE)
    base = [r for r in g.runs if r.stage == "base"]
    comp = [r for r in g.runs if r.stage == "compress"]
    assert len(base) == 2 and len(comp) == 8
    params = count_params(build_config(ModelSpec(name="gpt2-nano"), 512, 32))["total"]
    assert sorted(r.spec.train.tokens for r in base) == [20 * params, 80 * params]
    for r in comp:
        parent = next(b for b in base if b.id == r.deps[0])
        assert r.spec.model.path == f"run:{parent.id}"
        assert r.labels["ratio"] == parent.labels["ratio"]  # labels inherited
        assert r.spec.optim.lr == (0.0005 if r.labels["method"] == "pc" else 0.001)
        assert r.spec.compress.compression == r.labels["level"]
    order = [r.id for r in g.runs]
    assert all(order.index(d) < order.index(r.id) for r in g.runs for d in r.deps)


def test_ids_are_stable_under_unrelated_edits():
    ids = {r.id for r in grid(BASE).runs}
    more = copy.deepcopy(BASE)
    more["stages"]["compress"]["axes"]["level"].append(0.35)  # a new axis value
    more["stages"]["compress"]["resources"] = {"gpus_per_node": 4}  # resources are not identity
    more["description"] = "edited"
    ids2 = {r.id for r in grid(more).runs}
    assert ids <= ids2 and len(ids2) == len(ids) + 4
    changed = copy.deepcopy(BASE)
    changed["stages"]["compress"]["spec"]["train"]["steps"] = 4  # a real change renames its runs
    ids3 = {r.id for r in grid(changed).runs}
    assert {i for i in ids if i.startswith("base")} <= ids3
    assert not ({i for i in ids if i.startswith("compress")} & ids3)


def test_exclude_where_and_select():
    d = copy.deepcopy(BASE)
    d["stages"]["compress"]["axes"]["seed"] = [0, 1]
    d["stages"]["compress"]["spec"]["train"]["seed"] = "${seed}"
    d["stages"]["compress"]["exclude"] = [{"seed": 1, "level": 0.65}]
    d["stages"]["compress"]["where"] = {"ratio": 80}
    g = grid(d)
    comp = [r for r in g.runs if r.stage == "compress"]
    assert len(comp) == 2 * 2 * 2 - 2  # one base; seed 1 only at level 0.5
    assert all(r.labels["ratio"] == 80 for r in comp)
    sel = g.select("method=pc,level=0.5")
    assert {r.stage for r in sel} == {"base", "compress"}  # dependencies come along
    assert all(r.labels["method"] == "pc" for r in sel if r.stage == "compress")
    with pytest.raises(SpecError, match="matches no run"):
        g.select("method=xyz")


@pytest.mark.parametrize("mutate,field,reason", [
    (lambda d: d["stages"]["compress"].__setitem__("from", "bases"), "stages.compress.from", "did you mean 'base'"),
    (lambda d: d["stages"]["base"].__setitem__("from", "compress"), "stages", "cycle"),
    (lambda d: d["stages"]["compress"]["axes"].__setitem__("levle", [0.5]), "stages.compress.axes.levle",
     "not used"),
    (lambda d: d["stages"]["base"]["spec"]["train"].__setitem__("tokens", "${ratoi * params}"),
     "stages.base.spec.train.tokens", "unknown name 'ratoi'"),
    (lambda d: d["stages"]["base"]["spec"]["train"].__setitem__("tokns", 5), "train.tokns", "did you mean 'tokens'"),
    (lambda d: d["stages"]["base"]["spec"]["model"].__setitem__("name", "gpt5"), "model.name", "unknown model"),
    (lambda d: d["stages"]["compress"]["spec"]["compress"].__setitem__("compression", 1.5),
     "compress.compression", "fraction"),
    (lambda d: d["stages"]["compress"]["spec"]["train"].__setitem__("steps", "many"), "train.steps", "integer"),
    (lambda d: d["stages"]["base"].__setitem__("stage_typo", 1), "stages.base.stage_typo", "unknown field"),
    (lambda d: d["stages"]["compress"]["axes"].__setitem__("seed", [0, 1]) or
     d["stages"]["compress"]["spec"].__setitem__("note", "${seed}"), "note", "unknown field"),
])
def test_bad_grids_fail_naming_the_field(mutate, field, reason):
    d = copy.deepcopy(BASE)
    mutate(d)
    with pytest.raises(SpecError) as e:
        grid(d)
    assert field in str(e.value) and reason in str(e.value)


def test_axis_that_changes_nothing_is_refused():
    d = copy.deepcopy(BASE)
    d["stages"]["compress"]["axes"]["seed"] = [0, 1]
    d["stages"]["compress"]["overrides"].append({"when": {"seed": 1}, "set": {}})  # used, but changes nothing
    with pytest.raises(SpecError, match="same spec"):
        grid(d)


def test_tune_adds_dependencies_on_the_sweep():
    d = copy.deepcopy(BASE)
    d["stages"]["sweep"] = {"from": "base", "where": {"ratio": 80},
                            "axes": {"method": ["hpr", "pc"], "lr": [0.001, 0.003]},
                            "spec": {"model": {"name": "hf", "path": "run:${parent.id}"},
                                     "compress": {"method": "${method}"}, "optim": {"lr": "${lr}"},
                                     "train": {"steps": 2}}}
    d["stages"]["compress"]["tune"] = {"stage": "sweep", "field": "optim.lr", "match": ["method"]}
    g = grid(d)
    by = g.by_id()
    for r in g.runs:
        if r.stage == "compress":
            sweep_deps = [by[x] for x in r.deps if by[x].stage == "sweep"]
            assert len(sweep_deps) == 2 and all(x.labels["method"] == r.labels["method"] for x in sweep_deps)
    assert g.stage_order().index("sweep") < g.stage_order().index("compress")


@pytest.mark.parametrize("name", ["default", "mini", "paper_gpt2", "paper_llama3_1b", "smollm2"])
def test_shipped_experiments_expand(name):
    path = ROOT / "experiments" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    g = load_grid(path)
    assert g.runs and len({r.id for r in g.runs}) == len(g.runs)


def test_paper_gpt2_grid_has_table_a2_cells():
    g = load_grid(ROOT / "experiments" / "paper_gpt2.yaml")
    main = [r for r in g.runs if r.stage == "compress"]
    # Table A.2: 2 sizes x 2 ratios x 3 levels x 5 budgets x 2 methods.
    assert len(main) == 120
    cells = {(r.labels["model"], r.labels["ratio"], r.labels["compression"], r.labels["tokens"], r.labels["method"])
             for r in main}
    assert len(cells) == 120
    assert {r.spec.data.seq_len for r in main} == {512} and {r.spec.train.batch_size for r in main} == {512}
    assert {r.labels["tokens"] for r in main} == {1.25e9, 2.5e9, 5e9, 7.5e9, 10e9}


def test_spelling_out_a_default_keeps_the_id():
    ids = {r.id for r in grid(BASE).runs}
    d = copy.deepcopy(BASE)
    d["defaults"]["train"]["log_every"] = 10  # the default value, written out
    d["defaults"]["optim"] = {"weight_decay": 0.1}
    assert {r.id for r in grid(d).runs} == ids
