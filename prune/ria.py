"""RIA: relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"), and its
channel permutation for N:M sparsity, transcribed from the reference's ``lib/prune.py``
(``prune_ria``, ``--reallocation`` with ``--importance_score sum``, then ``--lsa``).

Score: ``(|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * (||X_j||_2) ** a``, a = 0.5.

The column sum runs over the role's own matrix: all its rows (every head of an interleaved
GPT-NeoX/Falcon view), per expert for an (experts, rows, in) MoE view. For a role that is a row
slice of a fused matrix (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``) that is the slice alone, not the
whole fused ``nn.Linear`` the reference would sum over: the lab treats each role as its own matrix
(its own sparsity), so RIA on a fused model scores as it does on the same model stored unfused
(the reference's Llama, where q, k and v are separate linears).
"""

from __future__ import annotations

import torch

from prune.masks import nm_mask

RIA_A = 0.5  # the reference's --a: the exponent of the activation norm
GAIN_CHUNK = 32  # groups per step of the assignment gains (rows x 32 x groups floats at a time)


def ria_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor, a: float = RIA_A) -> torch.Tensor:
    """Relative importance times the activation norm to the power ``a``, in fp32; shapes as
    ``prune.masks.wanda_scores`` ((in,) norms, or (experts, in) for an (experts, rows, in) view)."""
    w = weight.abs().float()
    if input_sq_norm.dim() == 2:  # per expert: each expert's rows are its own matrix
        column_sum = w.sum(dim=-2, keepdim=True)
    else:
        column_sum = w.reshape(-1, w.shape[-1]).sum(dim=0)
    row_sum = w.sum(dim=-1, keepdim=True)
    return (w / column_sum + w / row_sum) * input_sq_norm.float().sqrt().unsqueeze(-2) ** a


def reallocated_order(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The reference's heuristic channel reallocation: columns sorted by their score sum, the i-th
    sorted chunk of in/M columns dealt to slot i of every group (every other chunk reversed)."""
    cols = scores.shape[1]
    sorted_idx = torch.sort(scores.sum(dim=0))[1]
    index = torch.zeros_like(sorted_idx)
    for i in range(1, m + 1):
        chunk = sorted_idx[int(cols * (i - 1) / m) : int(cols * i / m)]
        index[i - 1 :: m] = chunk if i % 2 == 1 else chunk.flip(0)
    return index


def _assignment_step(scores: torch.Tensor, column: int, n: int, m: int) -> torch.Tensor:
    """One round of the reference's ``lsa``: slot ``column`` of every group is reassigned so the
    kept score of all groups together is largest (a linear sum assignment over groups).

    ``gain[g, h]``, the score N:M keeps in group g with slot ``column`` taken from group h, is what
    the reference gets by sorting every such block, computed without the sort: with ``k = m - n``
    kept of m and ``o_k`` the k-th largest of g's other m - 1 scores in a row, the row keeps
    ``top_k(others) + max(0, a - o_k)`` for the incoming score a."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    groups, k = cols // m, m - n
    blocks = scores.reshape(rows, groups, m)
    incoming = blocks[:, :, column]  # (rows, h)
    top = blocks[:, :, torch.arange(m) != column].topk(k, dim=-1).values  # (rows, g, k), largest first
    kth = top[..., -1]
    gain = top.sum(dim=-1).sum(dim=0)[:, None].repeat(1, groups)
    for g in range(0, groups, GAIN_CHUNK):
        gap = incoming[:, None, :] - kth[:, g : g + GAIN_CHUNK, None]  # (rows, g chunk, h)
        gain[g : g + GAIN_CHUNK] += gap.clamp(min=0).sum(dim=0)
    chosen = torch.as_tensor(linear_sum_assignment(gain.numpy(), maximize=True)[1], dtype=torch.long)
    order = torch.arange(cols)
    order[torch.arange(groups) * m + column] = chosen * m + column
    return order


def channel_order(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The reference's channel permutation of a (rows, in) score matrix: reallocation, then one
    assignment round per slot of the M-group (``--lsa`` without ``--fast``). Group g is the input
    columns ``order[g*m:(g+1)*m]``."""
    scores = scores.float().cpu()
    order = reallocated_order(scores, m)
    for column in range(m):
        order = order[_assignment_step(scores[:, order], column, n, m)]
    return order


def permuted_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M in the permuted column order, folded back onto the original columns: the mask is on the
    weight as it is (the model's function is that of the masked weight, nothing is reordered). In
    the original order the groups are not contiguous: each row prunes exactly n of the M columns
    of every group ``order[g*m:(g+1)*m]``."""
    order = channel_order(scores, n, m).to(scores.device)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    mask[:, order] = nm_mask(scores[:, order], n, m)
    return mask
