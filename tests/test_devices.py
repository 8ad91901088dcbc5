"""One device resolution (`pcbench.util.devices.resolve_device`) for training, evaluation and benchmarks."""

from __future__ import annotations

import pytest
import torch

from pcbench.util import devices


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_picks_cuda_only_where_there_is_one(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert devices.resolve_device("cpu", 3) == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert devices.resolve_device("auto", 2) == (torch.device("cuda", 2) if cuda else torch.device("cpu"))
    if cuda:
        assert devices.resolve_device("cuda", 1) == torch.device("cuda", 1)
        assert devices.resolve_device("cuda:3") == torch.device("cuda", 3)


def test_cuda_without_a_gpu_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for pref in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=rf"train.device is '{pref}' but no CUDA device is available"):
            devices.resolve_device(pref, 0, "train.device")
    assert devices.resolve_device("meta") == torch.device("meta")  # other names as torch reads them


def test_every_caller_uses_it():
    from pcbench import bench, evaluate
    from pcbench.train import distributed

    assert bench.resolve_device is devices.resolve_device
    assert evaluate.resolve_device is devices.resolve_device
    assert distributed.resolve_device is devices.resolve_device
