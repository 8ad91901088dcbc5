"""Model cards (issue 24): every export carries README.md in Hugging Face's format, read back with
`huggingface_hub.ModelCard.load`, its numbers those of the run's final record; `pcbench eval` adds
its scores. Quiet logs: off a terminal, `pcbench compress` prints no third-party progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcbench import card
from pcbench.util import outputs, quiet
from test_cli_errors import base_model, cli, compress_args  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def check_card(model_dir: Path, final: dict, spec: dict, method: str) -> dict:
    """The card of `model_dir` loads, its metadata is valid HF model-card metadata, it is one of the
    export's own files, and its numbers are the final record's."""
    from huggingface_hub import ModelCard, ModelCardData

    assert card.NAME in outputs.own_files(model_dir)
    c = ModelCard.load(model_dir / card.NAME)
    data = c.data.to_dict()
    ModelCardData(**data, ignore_metadata_errors=False)  # raises on malformed metadata (model-index too)
    head = yaml.safe_load(c.content.split("---")[1])
    assert head == data
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["pcbench", method]
    f = data["pcbench"]
    plan = final.get("plan", {})
    assert f["method"] == method and f["compression_requested"] == spec["compress"]["compression"]
    assert f["compression_achieved"] == plan["achieved"]
    assert (f["params_before"], f["params_after"], f["widths"]) == (plan["params_before"], plan["params_after"],
                                                                    plan["widths"])
    assert f["importance"] == spec["compress"]["importance"]
    assert (f["tokens"], f["steps"], f["corpus"]) == (final["tokens"], final["steps"], spec["data"]["corpus"])
    for k in ("train_loss_last100", "final_train_loss", "heldout_loss"):
        assert f[k] == final[k], k
    from pcbench import __version__

    assert f["pcbench"] == __version__
    assert yaml.safe_load(c.text.split("```yaml\n")[1].split("```")[0]) == spec  # the run's spec
    return data


def test_compress_export_has_a_card_and_an_off_terminal_log_without_bars(base_model, tmp_path):  # noqa: F811
    """`pcbench compress` as its own process, stderr a pipe and no progress switch inherited."""
    out = tmp_path / "pc50"
    env = {k: v for k, v in os.environ.items() if k not in {**quiet.EVERYWHERE, **quiet.OFF_TERMINAL}}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = compress_args(base_model, out, "0.5", "--steps", "2", "--batch-size", "4")
    args[args.index("hpr")] = "pc"
    r = subprocess.run([sys.executable, "-m", "pcbench.cli", *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "it/s]" not in log and "%|" not in log, log
    final = json.loads((tmp_path / "pc50.pcbench" / "record" / "final.json").read_text())
    assert card.read(out)["run"].startswith("compress-")  # named as a grid's stage `compress` would
    from huggingface_hub import ModelCard

    run_spec = yaml.safe_load(ModelCard.load(out / card.NAME).text.split("```yaml\n")[1].split("```")[0])
    assert run_spec["compress"]["method"] == "pc" and run_spec["model"]["path"] == str(base_model.resolve())
    check_card(out, final, run_spec, "pc")


def test_scores_are_added_to_a_pcbench_models_card(tmp_path):
    """`card.add_scores` (what `pcbench eval` calls): HF's model-index, `pcbench.scores` and one table,
    replaced on a second scoring; a directory that is not a pcbench model is never written."""
    from huggingface_hub import ModelCard

    spec = {"model": {"name": "smollm2-135m"}, "data": {"corpus": "books", "eval_corpus": "sotu", "eval_split": "test"},
            "train": {"seed": 0}, "compress": {"method": "hpr", "compression": 0.5, "importance": "random",
                                               "importance_seed": 0}}
    final = {"kind": "hpr", "steps": 3, "tokens": 96, "train_loss_last100": 5.5, "final_train_loss": 5.25,
             "heldout_loss": 5.75, "last_k": 3, "plan": {"achieved": 0.5, "params_before": 10, "params_after": 5,
                                                          "widths": {"d_model": 8}}}
    model = tmp_path / "model"
    with outputs.staging(model) as tmp:
        card.write(tmp, spec, final, "compress-0123456789")
        (tmp / "config.json").write_text("{}")
        outputs.install(tmp, model, "model", "test")
    check_card(model, final, spec, "hpr")
    assert ModelCard.load(model / card.NAME).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for avg in (0.25, 0.5):
        scores = {"tasks": {"pcb_cloze": {"acc": avg, "acc_stderr": 0.1}, "pcb_continuation": {"acc_norm": avg}},
                  "primary": {"pcb_cloze": "acc", "pcb_continuation": "acc_norm"}, "average": avg,
                  "num_fewshot": 0, "limit": 4, "lm_eval_version": "0.4.13"}
        assert card.add_scores(model, scores) == model / card.NAME
    c = ModelCard.load(model / card.NAME)
    check_card(model, final, spec, "hpr")
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in c.data.eval_results] == \
        [("pcb_cloze", "acc", 0.5), ("pcb_continuation", "acc_norm", 0.5)]
    assert c.data.pcbench["scores"]["tasks"]["pcb_cloze"] == {"metric": "acc", "value": 0.5, "stderr": 0.1}
    assert c.text.count("## Downstream scores") == 1 and "| pcb_cloze | acc | 0.5000 |" in c.text
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / card.NAME).write_text("# mine\n")
    assert card.add_scores(other, scores) is None and (other / card.NAME).read_text() == "# mine\n"


def test_a_scored_card_still_verifies_and_keeps_the_exports_digest(tmp_path):
    """`pcbench eval DIR` rewrites the card of a pcbench model: the model still verifies (a second
    eval, `export`, the runs that load it), its recorded digest (what a run's final record names) is
    unchanged, a card killed before its rewrite still verifies, and other damage is still named."""
    from pcbench.util.verify import Damaged, sha256_bytes

    spec = {"model": {"name": "gpt2-nano"}, "train": {"seed": 0}}
    final = {"kind": "pretrain", "steps": 3, "tokens": 96, "train_loss_last100": 5.5, "heldout_loss": 5.75}
    model = tmp_path / "model"
    with outputs.staging(model) as tmp:
        card.write(tmp, spec, final, "base-0123456789")
        (tmp / "config.json").write_text("{}")
        outputs.install(tmp, model, "model", "test")
    digest = outputs.output_digest(outputs.verify_output(model))
    before = (model / card.NAME).read_bytes()
    scores = {"tasks": {"pcb_cloze": {"acc": 0.5}}, "primary": {"pcb_cloze": "acc"}, "average": 0.5,
              "num_fewshot": 0, "limit": 4, "lm_eval_version": "0.4.13"}
    for _ in range(2):
        assert card.add_scores(model, scores) == model / card.NAME
        assert outputs.output_digest(outputs.verify_output(model)) == digest  # a second eval, export, a run
    assert (model / card.NAME).read_bytes() != before
    (model / card.NAME).write_bytes(before)  # killed between the marker and the card: the old card
    outputs.verify_output(model)
    outputs.record_rewrite(model, card.NAME, sha256_bytes(b"other"))
    outputs.verify_output(model)
    (model / card.NAME).write_bytes(before.replace(b"pcbench", b"pcbench!", 1))
    with pytest.raises(Damaged, match="README.md"):
        outputs.verify_output(model)
    (model / card.NAME).write_bytes(before)
    (model / "config.json").write_text("{} ")
    with pytest.raises(Damaged, match="config.json"):
        outputs.verify_output(model)


def test_a_users_readme_in_a_pcbench_model_is_kept(tmp_path):
    """A README.md the user wrote into a pcbench model is theirs: a new export keeps it (no card)."""
    staged, target = tmp_path / "staged", tmp_path / "model"
    for d in (staged, target):
        d.mkdir()
        (d / "config.json").write_text("{}")
    outputs.write_marker(target, "model", ["config.json"])
    (staged / card.NAME).write_text("card")
    (target / card.NAME).write_text("my notes")
    card.keep_users_card(staged, target)
    assert not (staged / card.NAME).exists()
    outputs.write_marker(target, "model", ["config.json", card.NAME])  # pcbench's own card: replaced
    (staged / card.NAME).write_text("card")
    card.keep_users_card(staged, target)
    assert (staged / card.NAME).read_text() == "card"


def test_base_model_is_named_where_it_is_a_hub_id(tmp_path):
    assert card.base_model({"model": {"name": "smollm2-135m"}}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.base_model({"model": {"name": "llama3.2-1b"}}) == "meta-llama/Llama-3.2-1B"
    assert card.base_model({"model": {"name": "hf", "path": "org/some-model"}}) == "org/some-model"
    assert card.base_model({"model": {"name": "hf", "path": str(tmp_path)}}) is None  # a local directory
    assert card.base_model({"model": {"name": "hf", "path": "run:base-0123456789"}}) is None
    assert card.base_model({"model": {"name": "gpt2-nano"}}) is None  # trained from scratch


@pytest.mark.slow
def test_grid_export_card_and_eval_scores(tmp_path):
    """A grid run's export and its `pcbench export` copy carry the card of the run's final record;
    `pcbench eval` of the copy adds the scores it printed."""
    from huggingface_hub import ModelCard

    from pcbench.grid import load_grid
    from pcbench.run import launch
    from pcbench.run.jobs import RunJob
    from test_launch import tiny_grid

    path = tiny_grid(tmp_path, name="carded", base_steps=6)
    g = yaml.safe_load(path.read_text())
    g["stages"]["compress"]["axes"]["method"] = ["hpr"]
    g["stages"]["compress"]["spec"]["train"]["steps"] = 3
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    launch._prepare(store, grid)
    for run in grid.runs:
        RunJob(str(store.root), str(store.work), run.id, progress=False)()
    rid = next(r.id for r in grid.runs if r.stage == "compress")
    final = store.final(rid)
    from pcbench.run.jobs import resolved_train_spec
    from pcbench.spec.config import to_dict

    spec = to_dict(resolved_train_spec(store.run(rid), store)[0])
    check_card(Path(final["export_path"]), final, spec, "hpr")
    assert card.read(final["export_path"])["run"] == rid
    copy = tmp_path / "copy"
    rc, _, err = cli("export", path, "--results", tmp_path / "results", "--work", tmp_path / "work", rid, copy)
    assert rc == 0, err
    check_card(copy, final, spec, "hpr")
    rc, out, err = cli("eval", copy, "--tasks", "pcb_cloze", "--limit", "4", "--batch-size", "4", "--threads", "1")
    assert rc == 0, err
    scores = json.loads(out)
    c = ModelCard.load(copy / card.NAME)
    assert [(r.dataset_name, r.metric_value) for r in c.data.eval_results] == \
        [("pcb_cloze", scores["tasks"]["pcb_cloze"][scores["primary"]["pcb_cloze"]])]
    check_card(copy, final, spec, "hpr")
    # the base's export (pretraining) has a card too
    base = store.final(next(r.id for r in grid.runs if r.stage == "base"))
    assert ModelCard.load(Path(base["export_path"]) / card.NAME).data.tags == ["pcbench", "pretrain"]


@pytest.mark.slow
def test_on_a_terminal_compress_shows_one_pcbench_bar(base_model, tmp_path):  # noqa: F811
    """Under a pseudo-terminal: pcbench's own bar, none of transformers' (loading, writing shards)."""
    import pty
    import re

    import fcntl
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    env = {k: v for k, v in os.environ.items() if k not in {**quiet.EVERYWHERE, **quiet.OFF_TERMINAL}}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="120")
    args = compress_args(base_model, tmp_path / "m", "0.5", "--steps", "3", "--batch-size", "4")
    p = subprocess.Popen([sys.executable, "-m", "pcbench.cli", *args], env=env, stdin=child, stdout=child,
                         stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    assert p.wait(timeout=600) == 0
    log = b"".join(chunks).decode(errors="replace")
    bars = set(re.findall(r"([A-Za-z][\w .-]*?):\s+\d+%\|", log))
    assert bars == {"hpr"}, log[-3000:]  # the run's own bar, labelled with its kind
