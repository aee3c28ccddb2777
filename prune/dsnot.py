"""DSnoT: training-free prune-and-grow refinement of a sparse mask (Zhang et al., ICLR 2024,
"Dynamic Sparse No Training"), transcribed from the reference's ``lib/prune.py`` (``prune_DSnoT``)
with its default flags.

Per output row, the expected reconstruction error of the mask is the sum over pruned weights of
``W_ij * E[sum_t x_tj]`` (``sums``: the per-sequence column sum, averaged over sequences). Each
cycle regrows the pruned weight that shrinks the error most (relative to its input variance) and
prunes a kept weight in its stead, until the error falls under the threshold or the cycles run out:
unstructured, the kept weight chosen from the Wanda order, its sign against the error's; N:M, the
lowest initial score of the regrown weight's own M-group, so the group keeps its pattern.

The reference's defaults: ``--max_cycle_time 50``, ``--update_threshold 0.1``,
``--pow_of_var_regrowing 1``, ``--without_same_sign True`` (its ``type=bool`` flag is always true
as given: the unstructured stop ignores the sign; the N:M branch always checks it). Its default
``--skip_layer mlp`` leaves MLP matrices with their initial mask: ``REFINED_ROLES``.

One guard is added (``_swap``): a row changes only by a swap, a pruned weight regrown for a kept
one pruned. The reference keeps walking a row's regrowing order after the row stopped and after
its pruned weights of one sign ran out (its order sorts every column, kept ones at zero), and then
prunes kept weights (or, N:M, un-prunes a weight of an exhausted group): more or fewer zeros than
asked, which happens in rows with fewer than ``MAX_CYCLE_TIME`` pruned weights of one sign (small
matrices, low sparsity). Wherever the reference's writes are swaps, the two agree exactly.
"""

from __future__ import annotations

import torch

from prune.roles import ATTENTION_ROLES

MAX_CYCLE_TIME = 50
UPDATE_THRESHOLD = 0.1
POW_OF_VAR_REGROWING = 1.0
WITHOUT_SAME_SIGN = True
REFINED_ROLES = ATTENTION_ROLES  # the reference's --skip_layer mlp


def refines(refine: str, role: str) -> bool:
    """Whether a recipe's ``refine`` has DSnoT refine this role's mask."""
    return refine == "dsnot" and role in REFINED_ROLES


def reorder_indices(values: torch.Tensor) -> torch.Tensor:
    """The reference's ``return_reorder_indice``: positions of the positive entries last to first,
    then of the negative ones first to last (each row laid over the other, zeros padding)."""
    positions = (
        torch.arange(values.shape[1], device=values.device).to(torch.float64).repeat(values.shape[0], 1)
    )
    positive, negative = positions.clone(), positions.clone()
    positive[~(values > 0)] = float("inf")
    negative[~(values < 0)] = float("inf")
    positive = torch.sort(positive, dim=1)[0].flip(dims=[1])
    negative = torch.sort(negative, dim=1)[0]
    negative[negative == float("inf")] = 0
    positive[positive == float("inf")] = 0
    return (positive + negative).to(torch.int64)


def _regrowing_order(error_metric: torch.Tensor, mask: torch.Tensor, var: torch.Tensor) -> tuple:
    """The rows' reconstruction errors, their signs, and the pruned weights in regrowing order."""
    regrow = error_metric.clone()
    regrow[~mask] = 0
    error = regrow.sum(dim=1, keepdim=True)
    if POW_OF_VAR_REGROWING:
        regrow /= torch.pow(var.reshape(1, -1), POW_OF_VAR_REGROWING)
    return error, torch.sign(error), torch.sort(regrow, dim=1, stable=True)[1]


def _ends(rows: int, last: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pointers per row into an order (front, back) and their steps (+1, -1)."""
    pointers = torch.zeros((rows, 2), dtype=torch.long, device=device)
    pointers[:, 1] = last
    steps = torch.ones((rows, 2), dtype=torch.long, device=device)
    steps[:, 1] = -1
    return pointers, steps


def _swap(
    mask: torch.Tensor, update: torch.Tensor, prune_index: torch.Tensor, regrow_index: torch.Tensor
) -> torch.Tensor:
    """Prune ``prune_index`` and regrow ``regrow_index`` in the rows still updating, where that is a
    swap (the one kept, the other pruned); a row that cannot swap stops. The rows that update."""
    update = update & ~mask.gather(1, prune_index) & mask.gather(1, regrow_index)
    mask.scatter_(1, prune_index, update | mask.gather(1, prune_index))
    mask.scatter_(1, regrow_index, ~update & mask.gather(1, regrow_index))
    return update


def _take(order: torch.Tensor, pointers: torch.Tensor, steps: torch.Tensor, end: torch.Tensor):
    """The next index of each row from its front (end 0) or back (end 1), advancing that pointer."""
    at = pointers.gather(1, end)
    index = order.gather(1, at)
    pointers.scatter_(1, end, at + steps.gather(1, end))
    return index


@torch.no_grad()
def dsnot_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    sq_norm: torch.Tensor,
    sums: torch.Tensor,
    var: torch.Tensor,
    initial_scores: torch.Tensor,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The refined mask of a (rows, in) weight (True = pruned). ``mask``: the initial one, the same
    count in every row (unstructured) or N:M; ``initial_scores``: the scores it came from (the N:M
    branch prunes by them); ``sq_norm``, ``sums``, ``var``: per input column statistics."""
    w = weight.float()
    error_metric = w * sums.float().reshape(1, -1)
    mask = mask.clone()
    error, sign, regrowing = _regrowing_order(error_metric, mask, var.float())
    regrow_at, regrow_steps = _ends(w.shape[0], regrowing.shape[1] - 1, w.device)
    if nm is not None:
        return _nm_cycles(
            error_metric, mask, error, sign, regrowing, regrow_at, regrow_steps, initial_scores, nm[1]
        )
    kept = int((~mask[0]).sum())
    wanda = w.abs() * torch.sqrt(sq_norm.float().reshape(1, -1))
    wanda[mask] = float("inf")
    kept_order = torch.sort(wanda, dim=1, stable=True)[1][:, :kept]
    pruning = kept_order.gather(1, reorder_indices(error_metric.gather(1, kept_order)))
    prune_at, prune_steps = _ends(w.shape[0], pruning.shape[1] - 1, w.device)
    update = torch.ones_like(error, dtype=torch.bool)
    cycle = 0
    while not (torch.all(~update) or cycle >= MAX_CYCLE_TIME):
        cycle += 1
        regrow_index = _take(regrowing, regrow_at, regrow_steps, (error > 0).long())
        regrow_metric = error_metric.gather(1, regrow_index)
        prune_index = _take(pruning, prune_at, prune_steps, (error < 0).long())
        prune_metric = error_metric.gather(1, prune_index)
        after = error + prune_metric - regrow_metric
        update = update & (error.abs() > UPDATE_THRESHOLD)
        if not WITHOUT_SAME_SIGN:
            update = update & (sign == torch.sign(after))
        update = _swap(mask, update, prune_index, regrow_index)
        error += torch.where(update, prune_metric, torch.zeros_like(prune_metric))
        error -= torch.where(update, regrow_metric, torch.zeros_like(regrow_metric))
    return mask


def _nm_cycles(
    error_metric: torch.Tensor,
    mask: torch.Tensor,
    error: torch.Tensor,
    sign: torch.Tensor,
    regrowing: torch.Tensor,
    regrow_at: torch.Tensor,
    regrow_steps: torch.Tensor,
    initial_scores: torch.Tensor,
    m: int,
) -> torch.Tensor:
    """The reference's N:M branch: the weight pruned in exchange is the lowest initial score of the
    regrown weight's own M-group (pruned and already exchanged weights excluded), sign checked."""
    scores = initial_scores.float().clone()
    scores[mask] = float("inf")
    ceiling = torch.max(scores, dim=1, keepdim=True)[0] + 1
    offsets = torch.arange(0, m, device=scores.device)
    update = torch.ones_like(error, dtype=torch.bool)
    cycle = 1
    while not (torch.all(~update) or cycle > MAX_CYCLE_TIME):
        cycle += 1
        regrow_index = _take(regrowing, regrow_at, regrow_steps, (error > 0).long())
        regrow_metric = error_metric.gather(1, regrow_index)
        start = regrow_index - regrow_index % m
        block = scores.gather(1, offsets.repeat(start.shape[1], 1) + start)
        prune_index = torch.topk(block, 1, dim=1, largest=False)[1] + start
        prune_metric = error_metric.gather(1, prune_index)
        after = error + prune_metric - regrow_metric
        update = update & (sign == torch.sign(after)) & (error.abs() > UPDATE_THRESHOLD)
        scores.scatter_(1, prune_index, ceiling)
        update = _swap(mask, update, prune_index, regrow_index)
        error += torch.where(update, prune_metric, torch.zeros_like(prune_metric))
        error -= torch.where(update, regrow_metric, torch.zeros_like(regrow_metric))
    return mask
