"""The prepare stage on the local SLURM cluster: a several-task job array and a finalising job,
training jobs that wait for it (afterok), and the same store bytes as a local prepare."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from pcbench.data import shards
from pcbench.grid import load_grid
from pcbench.run import launch

from test_prepare import _private, _shard_files, mirror  # noqa: F401 (a fixture)
from test_slurm_grid import wait_done

pytestmark = pytest.mark.slurm
C4_OWN = shards.StoreRef("c4", "bpe-512", "train", "c4")  # a bpe-<N> of the grid is trained on its corpus
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # CI time (issue 23): another test of this class runs by default
def test_slurm_prepare_array_then_training_and_the_same_bytes_as_local(slurm_cluster, mirror, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("PCBENCH_PROGRESS", "0")
    g = {"name": "prep", "prepare": {"partition": "debug", "timeout_min": 10, "cpus_per_task": 1},
         "defaults": {"data": {"corpus": "c4", "tokenizer": "bpe-512", "seq_len": 64, "eval_batches": 0},
                      "train": {"batch_size": 8, "threads": 1, "device": "cpu"}},
         "resources": {"partition": "debug", "timeout_min": 10, "cpus_per_task": 1},
         "stages": {"base": {"spec": {"model": {"name": "gpt2-nano"}, "train": {"steps": 300}}}}}  # more than the corpus
    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump(g))
    grid = load_grid(path)
    store = launch.store_for(grid, tmp_path / "results", tmp_path / "work")
    out = launch.submit(grid, store, "slurm", log_dir=tmp_path / "logs")
    (run,) = grid.runs
    job = store.status(run.id)["job_id"]
    info = slurm_cluster.run("scontrol", "show", "job", str(job), check=False).stdout
    after = launch.named("slurm").after
    assert after and (f"afterok:{after}" in info or store.state(run.id) in ("running", "completed")), info
    states = wait_done(store, [run.id])
    assert states == {run.id: "completed"}, store.status(run.id)
    array = slurm_cluster.run("sacct", "-n", "-X", "-P", "--name=pcbench-prepare", "-o", "JobID,State",
                              check=False).stdout.split()
    assert len([a for a in array if a.endswith("COMPLETED")]) >= 4, array  # one task per source file
    assert out.submitted == [run.id]
    slurm_shards = _shard_files(shards.Prepared(C4_OWN, shards.store_dir(C4_OWN), {}, [], [], [], 0))
    slurm_stream = np.asarray(shards.open_store(C4_OWN).tokens)
    # The same store from a local prepare with 2 workers, in another cache.
    (tmp_path / "local").mkdir()
    monkeypatch.setenv("PCBENCH_CACHE", str(_private(tmp_path / "local")))
    local = shards.prepare_store(C4_OWN, need=300 * 8 * 65, workers=2, log=lambda m: None)
    assert local.manifest["complete"] and len(local.manifest["shards"]) == 4
    assert np.array_equal(np.asarray(shards.open_store(C4_OWN).tokens), slurm_stream)
    assert _shard_files(local) == slurm_shards
