"""Scores and masks: the Wanda math, one small function per idea.

A mask is a bool tensor shaped like the (out, in) weight; True marks a weight to prune.
Every function here mirrors a line of the Wanda reference code (``lib/prune.py``) so that
the zeros are the published algorithm's, including how ties are broken.
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, in fp32. ``input_sq_norm`` holds the squared input norm per column: (in,)
    for a (..., in) weight, or (experts, in) for an (experts, rows, in) MoE view (per expert)."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(-2)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest scores of every row.

    Equals the reference's ``torch.sort(stable=True)`` + first-k selection, ties included
    (among equal scores the lower column index goes first), but finds the cut with
    ``kthvalue`` instead of sorting every row.
    """
    k = int(scores.shape[1] * sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    at_most = scores <= threshold
    if bool((at_most.sum(dim=1) == k).all()):  # no tie straddles the cut: the common case
        return at_most
    below = scores < threshold
    ties = scores == threshold
    room = k - below.sum(dim=1, keepdim=True)
    return below | (ties & (ties.cumsum(dim=1) <= room))


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each score's position in its row's stable ascending order.

    ``ranks < int(in * s)`` is then ``row_topk_mask(scores, s)`` for every s: one comparison
    per weight, which is what makes re-pruning with cached statistics fast on a CPU.
    """
    cols = scores.shape[1]
    dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    order = scores.argsort(dim=1, stable=True)
    positions = torch.arange(cols, dtype=dtype, device=scores.device).expand_as(order)
    return torch.empty(scores.shape, dtype=dtype, device=scores.device).scatter_(1, order, positions)


def mask_from_ranks(ranks: torch.Tensor, sparsity: float) -> torch.Tensor:
    return ranks < int(ranks.shape[1] * sparsity)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: prune the n lowest scores in every group of m consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M needs in_features divisible by M; got {cols} and M={m}")
    groups = scores.reshape(rows, cols // m, m)
    lowest = groups.topk(n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def _mask_given_alpha(
    scores: torch.Tensor, sorted_scores: torch.Tensor, cumsum: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, float]:
    """Prune, per row, the lowest scores whose running sum stays within alpha * row sum."""
    budget = scores.sum(dim=1, keepdim=True) * alpha
    count = (cumsum <= budget).sum(dim=1, keepdim=True)
    threshold = sorted_scores.gather(1, (count - 1).clamp(min=0))
    mask = (scores <= threshold) & (count > 0)
    return mask, mask.float().mean().item()


def variant_mask(scores: torch.Tensor, sparsity: float, tolerance: float = 0.001) -> torch.Tensor:
    """The reference's ``use_variant``: find alpha by bisection so the matrix hits ``sparsity``."""
    sorted_scores = scores.sort(dim=1, stable=True).values
    cumsum = sorted_scores.cumsum(dim=1)
    alpha, low, high = 0.4, 0.0, 0.8
    mask, achieved = _mask_given_alpha(scores, sorted_scores, cumsum, alpha)
    while abs(achieved - sparsity) > tolerance and high - low >= tolerance:
        if achieved > sparsity:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask, achieved = _mask_given_alpha(scores, sorted_scores, cumsum, alpha)
    return mask


def matrix_threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's magnitude pruning: one threshold for the whole matrix, ``<=`` it is pruned."""
    if sparsity == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = int(scores.numel() * sparsity)  # the reference thresholds at sorted[k]
    threshold = scores.flatten().kthvalue(min(k + 1, scores.numel())).values
    return scores <= threshold
