"""SparseGPT (Frantar & Alistarh, 2023): prune one matrix and update the weights it keeps.

The published procedure, line for line (the reference's ``SparseGPT.fasterprune`` without its
quantizer): the Hessian of the layer's reconstruction loss ``H = 2/n sum x x^T`` is dampened by 1%
of its mean diagonal and turned into the upper Cholesky factor of its inverse; columns are visited
in blocks of 128; each block chooses its mask adaptively (unstructured: the lowest
``w^2 / [H^-1]_jj^2`` over the whole block; N:M: the lowest n of every m columns, chosen when the
walk reaches them), and the error of every pruned weight is spread over the columns not yet
visited through the inverse Hessian.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 128
DAMPING = 0.01  # of the mean diagonal of H


def inverse_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened inverse, dead columns). Dead columns (inputs that are
    always zero) get a unit diagonal, as in the reference; their weights are pruned."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = DAMPING * torch.mean(torch.diag(h))
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    return torch.linalg.cholesky(h, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight in fp32, mask of the pruned weights) for one (out, in) matrix."""
    w = weight.float().clone()
    w[:, dead] = 0
    rows, columns = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if nm is None:
            scores = w1**2 / torch.diag(hinv1).reshape(1, -1) ** 2
            mask1 = _block_mask(scores, sparsity)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            column = w1[:, i]
            d = hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                scores = w1[:, i : i + nm[1]] ** 2 / torch.diag(hinv1)[i : i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(scores, nm[0], dim=1, largest=False)[1], True)
            q = column.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (column - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w, pruned | dead.reshape(1, -1).expand(rows, -1)


def _block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's threshold: the score at sorted position int(numel * s), ``<=`` it pruned."""
    k = int(scores.numel() * sparsity)  # 0 still prunes the minimum, as the reference does
    if k >= scores.numel():  # s = 1, where the reference would index past the end
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.flatten().kthvalue(k + 1).values
    return scores <= threshold
