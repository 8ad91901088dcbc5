"""The loss without an fp32 copy of bf16 logits (`train.loss`): same loss and gradient as the
plain fp32 cross-entropy within tolerance, fp32 logits bitwise unchanged, and what it keeps is
what the memory plan counts."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pcbench.train import loss as chunked
from pcbench.train import memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created within (alive at once), by weak references; storages of
    `existing` tensors (and views of them) are not counted."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._free, s.nbytes())
                    weakref.finalize(s, self.seen.discard, key)
        return out


def _case(rows=600, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::7] = -100  # ignored positions
    return logits, targets


def test_chunked_loss_and_gradient_equal_the_plain_fp32_path(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * 1000)  # 64 rows a chunk: ten chunks
    logits, targets = _case()
    got = chunked.cross_entropy(logits, targets)
    got.backward()
    g_got, logits.grad = logits.grad, None
    ref = F.cross_entropy(logits.float(), targets)
    ref.backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    assert g_got.dtype == torch.bfloat16
    # the same fp32 gradient rounded to bf16 (summation order aside): within one bf16 step
    assert torch.allclose(g_got.float(), logits.grad.float(), rtol=2 ** -7, atol=1e-9)
    assert (g_got[::7] == 0).all()


def test_fp32_logits_take_the_plain_path_bitwise():
    logits, targets = _case()
    x = logits.detach().float().requires_grad_()
    got = chunked.cross_entropy(x.view(2, 300, -1), targets.view(2, 300))
    got.backward()
    g, x.grad = x.grad, None
    ref = F.cross_entropy(x, targets)
    ref.backward()
    assert torch.equal(got, ref) and torch.equal(g, x.grad)


@pytest.mark.parametrize("plain", [False, True])
def test_what_the_loss_keeps_is_what_the_plan_counts(monkeypatch, plain):
    """bf16 logits of 600 tokens x 4,096 vocabulary in chunks of 64 rows: the peak of the storages
    the loss's forward and backward create (beyond the logits) is their gradient plus the chunk's
    fp32 temporaries, i.e. the plan's bf16 logits term less the logits; the plain fp32 loss would
    create ~12 bytes per logit."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * 4096)
    logits, targets = _case(600, 4096)
    with LiveBytes(logits) as m:
        if plain:
            F.cross_entropy(logits.float(), targets).backward()
        else:
            chunked.cross_entropy(logits, targets).backward()
    n = logits.numel()
    print(f"{'plain' if plain else 'chunked'}: {m.peak} bytes created at the peak ({m.peak / n:.2f} per logit)")
    planned = memory.logits_bytes(600, 4096, "bf16") - 2 * n  # the kept bf16 logits are the input here
    if plain:
        assert m.peak > 2 * planned and m.peak >= 11 * n
    else:
        assert abs(m.peak - planned) <= 0.05 * planned, (m.peak, planned)
