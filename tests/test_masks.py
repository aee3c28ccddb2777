"""The mask primitives against direct transcriptions of the Wanda reference code."""

import pytest
import torch

from prune.masks import (
    mask_from_ranks,
    matrix_threshold_mask,
    nm_mask,
    row_ranks,
    row_topk_mask,
    variant_mask,
    wanda_scores,
)
from prune.methods import METHODS, method_mask


def reference_row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """lib/prune.py: sort(stable=True) per row, the first int(in * s) indices are pruned."""
    mask = torch.zeros_like(metric, dtype=torch.bool)
    indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
    return mask.scatter_(1, indices, True)


def reference_nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for ii in range(metric.shape[1]):
        if ii % m == 0:
            tmp = metric[:, ii : ii + m].float()
            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return mask


def reference_variant_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    def given_alpha(alpha, sort_res, tmp_metric, sum_before):
        thres_cumsum = sum_before * alpha
        sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
        thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdims=True) - 1)
        w_mask = metric <= thres
        return w_mask, (w_mask == True).sum() / w_mask.numel()  # noqa: E712 - as in the reference

    sort_res = torch.sort(metric, dim=-1, stable=True)
    tmp_metric = torch.cumsum(sort_res[0], dim=1)
    sum_before = metric.sum(dim=1)
    alpha, alpha_hist = 0.4, [0.0, 0.8]
    w_mask, cur = given_alpha(alpha, sort_res, tmp_metric, sum_before)
    while (torch.abs(cur - sparsity) > 0.001) and (alpha_hist[1] - alpha_hist[0] >= 0.001):
        if cur > sparsity:
            alpha_new = (alpha + alpha_hist[0]) / 2.0
            alpha_hist[1] = alpha
        else:
            alpha_new = (alpha + alpha_hist[1]) / 2.0
            alpha_hist[0] = alpha
        alpha = alpha_new
        w_mask, cur = given_alpha(alpha, sort_res, tmp_metric, sum_before)
    return w_mask


def reference_magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    metric = torch.abs(weight)
    thresh = torch.sort(metric.flatten())[0][int(weight.numel() * sparsity)]
    return metric <= thresh


@pytest.fixture
def scores():
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    norms = torch.rand(96) * 4
    return wanda_scores(weight, norms)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0])
def test_row_mask_equals_reference(scores, sparsity):
    mask = row_topk_mask(scores, sparsity)
    assert torch.equal(mask, reference_row_mask(scores, sparsity))
    assert (mask.sum(dim=1) == int(96 * sparsity)).all()


def test_row_mask_breaks_ties_like_a_stable_sort():
    # Quantized weights give many equal scores; the reference keeps the lower column first.
    torch.manual_seed(1)
    scores = torch.randint(0, 5, (32, 40)).float()
    for sparsity in (0.3, 0.5, 0.8):
        assert torch.equal(row_topk_mask(scores, sparsity), reference_row_mask(scores, sparsity))


def test_ranks_give_the_same_masks_for_every_sparsity(scores):
    ranks = row_ranks(scores)
    assert ranks.dtype == torch.int16
    for sparsity in torch.linspace(0, 1, 21).tolist():
        assert torch.equal(mask_from_ranks(ranks, sparsity), reference_row_mask(scores, sparsity))
    tied = torch.randint(0, 3, (16, 30)).float()
    assert torch.equal(mask_from_ranks(row_ranks(tied), 0.5), reference_row_mask(tied, 0.5))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_is_exact(scores, n, m):
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(48, 96 // m, m)
    assert (groups.sum(dim=2) == n).all()
    assert torch.equal(mask, reference_nm_mask(scores, n, m))


def test_nm_mask_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(4, 10), 2, 4)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6])
def test_variant_equals_reference(scores, sparsity):
    mask = variant_mask(scores, sparsity)
    assert torch.equal(mask, reference_variant_mask(scores, sparsity))
    assert abs(mask.float().mean().item() - sparsity) < 0.01


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_matrix_magnitude_equals_reference(sparsity):
    torch.manual_seed(2)
    weight = torch.randn(64, 64)
    mask = matrix_threshold_mask(weight.abs(), sparsity)
    assert torch.equal(mask, reference_magnitude_mask(weight, sparsity))


def test_wanda_scores_weigh_columns_by_input_norm():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    sq_norm = torch.tensor([9.0, 1.0])  # column norms 3 and 1
    assert torch.equal(wanda_scores(weight, sq_norm), torch.tensor([[3.0, 2.0], [9.0, 0.5]]))
    # the input norm decides: column 1 has the larger weight but the smaller activation
    assert method_mask(METHODS["wanda"], weight, sq_norm, 0.5)[0].tolist() == [False, True]
    assert method_mask(METHODS["magnitude-row"], weight, None, 0.5)[0].tolist() == [True, False]
