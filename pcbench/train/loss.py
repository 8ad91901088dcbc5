"""Cross-entropy of low-precision logits without a full fp32 copy of them.

Under bf16 autocast the head gives bf16 logits [rows, vocab]; `F.cross_entropy(logits.float(), ...)`
then keeps an fp32 copy, log-softmax's fp32 output, and in the backward their fp32 gradients:
~14 bytes per logit, several fp32 copies of one micro-batch's logits (at Llama-3's 128,256
vocabulary and 16k tokens, 28 GiB). `chunked_cross_entropy` computes the same loss in fp32, one
chunk of rows at a time, and keeps only the bf16 logits and one fp32 log-sum-exp per row; the
backward recomputes each chunk's softmax in fp32 and writes the gradient in the logits' dtype.
What stays is the logits and their gradient (2 + 2 bytes per logit) plus `CHUNK_TEMPORARIES` fp32
tensors of one chunk (`chunk_rows`). fp32 logits take the plain path (the CPU studies' numerics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk (rows x vocab): 2^25 fp32 values, 128 MiB per temporary.
CHUNK_ELEMENTS = 2 ** 25
# fp32 temporaries of one chunk alive at once (forward: the chunk in fp32 and exp's output inside
# logsumexp; backward: the chunk in fp32 and its softmax).
CHUNK_TEMPORARIES = 2


def chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk at this vocabulary."""
    return max(1, CHUNK_ELEMENTS // vocab)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, vocab = logits.shape
        rows = chunk_rows(vocab)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        for a in range(0, n, rows):
            lse[a:a + rows] = torch.logsumexp(logits[a:a + rows].float(), dim=1)
        count = valid.sum()
        loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(logits, safe, valid, lse, count)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, safe, valid, lse, count = ctx.saved_tensors
        n, vocab = logits.shape
        rows = chunk_rows(vocab)
        out = torch.empty_like(logits)
        scale = (grad / count).float()
        for a in range(0, n, rows):
            p = logits[a:a + rows].float()
            p.sub_(lse[a:a + rows, None]).exp_()
            p.scatter_add_(1, safe[a:a + rows, None], -valid[a:a + rows, None].float())
            p.mul_(valid[a:a + rows, None] * scale)
            out[a:a + rows] = p
        return out, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `logits` [..., vocab] against `targets` [...]: fp32 logits through
    `F.cross_entropy` (unchanged), lower-precision ones chunk by chunk in fp32 (no fp32 copy)."""
    flat, t = logits.flatten(0, -2), targets.flatten()
    if logits.dtype == torch.float32:
        return F.cross_entropy(flat, t, ignore_index=ignore_index)
    return _ChunkedCE.apply(flat, t, ignore_index)
