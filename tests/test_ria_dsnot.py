"""RIA (scores, per-matrix and per-row masks, channel permutation for N:M) and DSnoT (the mask
refinement and its input moments), each against a transcription of its reference code written here:
biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py`` (``prune_ria``)
and zyxxmu/DSnoT ``lib/prune.py`` (``prune_DSnoT``), ``lib/layerwrapper.py`` (``WrappedGPT``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from tiny import random_ids, tiny_model

from prune.dsnot import MAX_CYCLE_TIME, UPDATE_THRESHOLD, dsnot_mask
from prune.jobs import job_size
from prune.methods import METHODS, method_mask
from prune.recipe import Recipe, RecipeError
from prune.ria import channel_order, permuted_nm_mask, ria_scores
from runtime.pruner import Pruner


# ----- transcriptions of the references -------------------------------------------------------------
def ref_ria_metric(W: torch.Tensor, scaler_row: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    return (
        torch.abs(W) / torch.sum(torch.abs(W), dim=0)
        + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)
    ) * (torch.sqrt(scaler_row.reshape((1, -1)))) ** a


def ref_nm(W_metric: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    W_mask = torch.zeros_like(W_metric) == 1
    for ii in range(W_metric.shape[1]):
        if ii % prune_m == 0:
            tmp = W_metric[:, ii : (ii + prune_m)].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    return W_mask


def ref_channel_permutation(W_metric: torch.Tensor, prune_n: int, prune_m: int):
    """``--reallocation --importance_score sum --lsa`` (blocks = 1): the index and the final mask."""
    sorted_idx = torch.sort(torch.sum(W_metric, dim=0))[1]
    index = torch.zeros_like(sorted_idx)
    for ii in range(1, prune_m + 1):
        part = sorted_idx[int(W_metric.shape[1] * (ii - 1) / prune_m) : int(W_metric.shape[1] * ii / prune_m)]
        index[ii - 1 :: prune_m] = part if ii % 2 == 1 else part.flip(0)
    shape = W_metric.shape[1] // prune_m
    rows = torch.arange(shape)

    def lsa(W_metric, lsa_column):
        score_matrix = torch.zeros(shape, shape)
        for row in range(shape):
            strip_idx = torch.zeros(1, shape, prune_m).long()
            block_columns = torch.arange(prune_m)
            block_columns = block_columns[block_columns != lsa_column]
            strip_idx[:, :, 0] = (rows * prune_m).reshape(1, -1) + lsa_column
            strip_idx[:, :, 1:] = (
                block_columns.reshape(1, 1, -1) + torch.arange(row, row + 1).reshape(-1, 1, 1) * prune_m
            )
            tmp = W_metric[:, strip_idx].transpose(1, 0).transpose(2, 1)
            W_mask = torch.zeros_like(tmp)
            tmp_index = torch.sort(tmp, dim=-1)[1]
            W_mask.scatter_(dim=-1, index=tmp_index[:, :, :, :prune_n], value=1)
            score_matrix[:, row : row + 1] = torch.sum(
                torch.sum((tmp * (W_mask == 0)), dim=-1), dim=-1
            ).transpose(1, 0)
        score_matrix = score_matrix.transpose(1, 0)
        col_indices = torch.LongTensor(linear_sum_assignment(score_matrix.numpy(), maximize=True)[1])
        idx = torch.arange(W_metric.shape[1]).long()
        idx[rows * prune_m + lsa_column] = col_indices * prune_m + lsa_column
        return idx

    for lsa_column in range(prune_m):
        index = index[lsa(W_metric[:, index], lsa_column)]
    W_mask = torch.zeros_like(W_metric) == 1
    W_mask[:, index] = ref_nm(W_metric[:, index], prune_n, prune_m)
    return index, W_mask


def ref_moments(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """WrappedGPT.add_batch, one (1, tokens, columns) sequence at a time: scaler_row, sum_metric_row, var."""
    columns = inputs[0].shape[-1]
    scaler_row, sum_metric_row = torch.zeros(columns), torch.zeros(columns)
    var, nsamples, ntokens = torch.zeros(columns), 0, 0
    for inp in inputs:
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t().type(torch.float32)
        var_inp = torch.var(inp, dim=1, unbiased=False, keepdim=True)
        num_inp = inp.shape[1]
        var = var_inp if ntokens == 0 else (var * ntokens + var_inp * num_inp) / (ntokens + num_inp)
        ntokens += num_inp
        scaler_row *= nsamples / (nsamples + tmp)
        sum_metric_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
        sum_metric_row += torch.sum(inp, dim=1) / nsamples
    return scaler_row, sum_metric_row, var.flatten()


def ref_reorder(input_tensor: torch.Tensor) -> torch.Tensor:
    positive_indices = (
        torch.arange(0, input_tensor.shape[1]).to(torch.float64).repeat(input_tensor.shape[0], 1)
    )
    negative_indices = positive_indices.clone()
    positive_indices[~(input_tensor > 0)] = float("inf")
    negative_indices[~(input_tensor < 0)] = float("inf")
    positive_value = torch.flip(torch.sort(positive_indices, dim=1)[0], dims=[1])
    negative_value = torch.sort(negative_indices, dim=1)[0]
    negative_value[negative_value == float("inf")] = 0
    positive_value[positive_value == float("inf")] = 0
    return (positive_value + negative_value).to(torch.int64)


def ref_dsnot(W, scaler_row, sum_metric_row, var, initial_metric, sparsity, prune_n=0, prune_m=0):
    """prune_DSnoT's mask for one linear, the reference's default flags (without_same_sign True)."""
    DSnoT_metric = W * sum_metric_row.reshape((1, -1))
    initial_metric = initial_metric.clone()
    weight_mask = torch.zeros_like(initial_metric) == 1

    def pointers(last):
        lst = torch.zeros((W.shape[0], 2), dtype=torch.long)
        lst[:, 1] = last
        upd = torch.ones((W.shape[0], 2), dtype=torch.long)
        upd[:, 1] = -1
        return lst, upd

    if prune_n != 0:
        prune_idx, res_idx = [], []
        for ii in range(0, initial_metric.shape[1], prune_m):
            order = torch.sort(initial_metric[:, ii : ii + prune_m].float(), dim=1)[1] + ii
            prune_idx.append(order[:, :prune_n])
            res_idx.append(order[:, prune_n:])
            weight_mask.scatter_(1, order[:, :prune_n], True)
        initial_prune_indices, initial_res_indices = torch.cat(prune_idx, 1), torch.cat(res_idx, 1)
        metric_for_regrowing = DSnoT_metric.clone()
        metric_for_regrowing.scatter_(1, initial_res_indices, 0)
        reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
        initialize_error_sign = torch.sign(reconstruction_error)
        metric_for_regrowing /= torch.pow(var.reshape((1, -1)), 1)
        _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
        lst, upd = pointers(regrowing_indices_block.shape[-1] - 1)
        initial_metric.scatter_(1, initial_prune_indices, float("inf"))
        W_metric_max_value = torch.max(initial_metric, dim=1, keepdim=True)[0] + 1
        cycle_time = 1
        update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
        while not (torch.all(update_mask == False) or cycle_time > MAX_CYCLE_TIME):  # noqa: E712
            cycle_time += 1
            which = (reconstruction_error > 0).int().to(torch.int64)
            at = torch.gather(lst, 1, which)
            regrowing_indice = torch.gather(regrowing_indices_block, 1, at)
            regrowing_metric = DSnoT_metric.gather(1, regrowing_indice)
            start = regrowing_indice - regrowing_indice % prune_m
            block_indices = torch.arange(0, prune_m).repeat(start.shape[1], 1) + start
            pruning_block = torch.gather(initial_metric, 1, block_indices)
            _, pruning_indice = torch.topk(pruning_block, 1, dim=1, largest=False)
            pruning_indice += start
            pruning_metric = DSnoT_metric.gather(1, pruning_indice)
            after = reconstruction_error + pruning_metric - regrowing_metric
            update_mask = (
                update_mask
                & (initialize_error_sign == torch.sign(after))
                & (abs(reconstruction_error) > UPDATE_THRESHOLD)
            )
            initial_metric.scatter_(1, pruning_indice, W_metric_max_value)
            weight_mask.scatter_(1, pruning_indice, update_mask)
            weight_mask.scatter_(1, regrowing_indice, ~update_mask)
            reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
            reconstruction_error -= torch.where(
                update_mask, regrowing_metric, torch.zeros_like(regrowing_metric)
            )
            lst.scatter_(1, which, at + upd.gather(1, which))
        return weight_mask
    _, sorted_initial_indice = torch.sort(initial_metric, dim=-1, stable=True)
    sparsity_num = int(initial_metric.shape[1] * sparsity)
    res_sparsity_num = sorted_initial_indice.shape[1] - sparsity_num
    initial_prune_indices, initial_res_indices = torch.split(
        sorted_initial_indice, [sparsity_num, res_sparsity_num], 1
    )
    weight_mask.scatter_(1, initial_prune_indices, True)
    metric_for_regrowing = DSnoT_metric.clone()
    wanda_metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    metric_for_regrowing.scatter_(1, initial_res_indices, 0)
    reconstruction_error = torch.sum(metric_for_regrowing, dim=1, keepdim=True)
    metric_for_regrowing /= torch.pow(var.reshape((1, -1)), 1)
    _, regrowing_indices_block = torch.sort(metric_for_regrowing, dim=1, stable=True)
    wanda_metric.scatter_(1, initial_prune_indices, float("inf"))
    wanda_res_indices, _ = torch.split(
        torch.sort(wanda_metric, dim=1, stable=True)[1], [res_sparsity_num, sparsity_num], 1
    )
    pruning_indices_block = torch.gather(
        wanda_res_indices, 1, ref_reorder(torch.gather(DSnoT_metric, 1, wanda_res_indices))
    )
    regrow_lst, regrow_upd = pointers(regrowing_indices_block.shape[-1] - 1)
    prune_lst, prune_upd = pointers(pruning_indices_block.shape[-1] - 1)
    update_mask = torch.ones_like(reconstruction_error, dtype=torch.bool)
    cycle_time = 0
    while not (torch.all(update_mask == False) or cycle_time >= MAX_CYCLE_TIME):  # noqa: E712
        cycle_time += 1
        which = (reconstruction_error > 0).int().to(torch.int64)
        at = torch.gather(regrow_lst, 1, which)
        regrowing_indice = torch.gather(regrowing_indices_block, 1, at)
        regrowing_metric = DSnoT_metric.gather(1, regrowing_indice)
        regrow_lst.scatter_(1, which, at + regrow_upd.gather(1, which))
        which = (reconstruction_error < 0).int().to(torch.int64)
        at = torch.gather(prune_lst, 1, which)
        pruning_indice = torch.gather(pruning_indices_block, 1, at)
        pruning_metric = DSnoT_metric.gather(1, pruning_indice)
        prune_lst.scatter_(1, which, at + prune_upd.gather(1, which))
        update_mask = update_mask & (abs(reconstruction_error) > UPDATE_THRESHOLD)  # without_same_sign
        weight_mask.scatter_(1, pruning_indice, update_mask)
        weight_mask.scatter_(1, regrowing_indice, ~update_mask)
        reconstruction_error += torch.where(update_mask, pruning_metric, torch.zeros_like(pruning_metric))
        reconstruction_error -= torch.where(update_mask, regrowing_metric, torch.zeros_like(regrowing_metric))
    return weight_mask


# ----- helpers -----------------------------------------------------------------------------------------
def layer_inputs(lm, module: str, ids: torch.Tensor) -> list[torch.Tensor]:
    """The module's input for each calibration sequence, one forward per sequence (forward hooks)."""
    seen: list[torch.Tensor] = []
    handle = lm.model.get_submodule(module).register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    try:
        with torch.no_grad():
            for row in ids:
                lm.model(row[None])
    finally:
        handle.remove()
    return seen


def random_layer(rows: int, cols: int, seed: int):
    """A weight and input moments shaped like a real layer's (positive norms and variances)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    x = torch.randn(8, 64, cols, generator=g) * torch.rand(cols, generator=g) + 0.3 * torch.randn(
        cols, generator=g
    )
    return W, *ref_moments([s[None] for s in x])


def wanda_metric(W, scaler_row):
    return torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))


# ----- RIA ---------------------------------------------------------------------------------------------
def test_ria_scores_and_masks_equal_the_reference():
    W, scaler_row, _, _ = random_layer(48, 96, 0)
    metric = ref_ria_metric(W, scaler_row)
    assert torch.equal(ria_scores(W, scaler_row), metric)
    thresh = torch.sort(metric.flatten())[0][int(W.shape[0] * W.shape[1] * 0.5)]  # the default: per matrix
    assert torch.equal(method_mask(METHODS["ria"], W, scaler_row, 0.5), metric <= thresh)
    per_row = torch.zeros_like(metric, dtype=torch.bool)  # --per_outneuron
    per_row.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, : int(96 * 0.6)], True)
    assert torch.equal(method_mask(METHODS["ria-row"], W, scaler_row, 0.6), per_row)
    assert torch.equal(method_mask(METHODS["ria"], W, scaler_row, 0.5, (2, 4)), ref_nm(metric, 2, 4))
    # an (experts, rows, in) view: each expert is its own matrix, with its own norms
    experts = torch.stack([W, 2 * W.flip(0)])
    norms = torch.stack([scaler_row, scaler_row.flip(0)])
    expected = torch.stack([ref_ria_metric(experts[e], norms[e]) for e in range(2)])
    assert torch.allclose(ria_scores(experts, norms), expected, rtol=1e-6, atol=0)


def test_ria_masks_of_a_tiny_model_equal_the_reference_from_hooked_norms():
    lm, ids = tiny_model("llama"), random_ids(3, 24)
    inputs = {
        name: layer_inputs(lm, f"model.layers.0.{name}", ids)
        for name in ("self_attn.q_proj", "mlp.down_proj")
    }
    dense = {name: lm.model.get_submodule(f"model.layers.0.{name}").weight.clone() for name in inputs}
    pruner = Pruner(lm)  # on the CPU: per-row masks come from the rank cache
    recipe = Recipe(model="x", method="ria", sparsity={"all": 0.5}, stats_mode="cached")
    matrix = pruner.prune(recipe, ids=ids).masks
    rows = pruner.prune(dataclasses.replace(recipe, method="ria-row", sparsity={"all": 0.3}), ids=ids).masks
    for role, name in (("q", "self_attn.q_proj"), ("down", "mlp.down_proj")):
        W = dense[name]
        metric = ref_ria_metric(W, ref_moments(inputs[name])[0])
        thresh = torch.sort(metric.flatten())[0][int(W.shape[0] * W.shape[1] * 0.5)]
        assert torch.equal(matrix[(0, role)], metric <= thresh)
        per_row = torch.zeros_like(metric, dtype=torch.bool)
        per_row.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * 0.3)], True)
        assert torch.equal(rows[(0, role)], per_row)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_the_channel_permutation_equals_the_reference_and_keeps_n_of_every_permuted_group(n, m):
    W, scaler_row, _, _ = random_layer(32, 128, 1)
    metric = ref_ria_metric(W, scaler_row)
    index, mask = ref_channel_permutation(metric, n, m)
    order = channel_order(metric, n, m)
    assert torch.equal(order, index)
    assert torch.equal(permuted_nm_mask(metric, n, m), mask)
    assert not torch.equal(order, torch.arange(128))
    # the invariant: n of the M columns of every permuted group order[g*M:(g+1)*M], in every row
    # (in the original order the groups are not contiguous, so plain N:M need not hold there)
    groups = mask[:, order].reshape(32, 128 // m, m).sum(dim=2)
    assert bool((groups == n).all())
    kept = lambda mask: float((metric * ~mask).sum())  # noqa: E731
    assert kept(mask) > kept(ref_nm(metric, n, m))  # what the permutation is for


def test_a_permuted_mask_is_a_mask_on_the_original_weights():
    """Logits of the lab's RIA 2:4 + permutation state equal those of the reference's mask, applied
    to the same weights, unpermuted: the permutation leaves the model's function alone."""
    lm, ids = tiny_model("llama", seed=2), random_ids(2, 16)
    recipe = Recipe(
        model="x",
        method="ria",
        structure="2:4",
        permute=True,
        sparsity={"all": 0.5},
        stats_mode="cached",
        layers=(0, 1),
    )
    pruner = Pruner(lm)
    stats, _ = pruner.cached_statistics(ids)
    result = pruner.prune(recipe, ids=ids)
    with torch.no_grad():
        lab_logits = lm.model(ids).logits
    pruner.restore()
    for layer, role, target in [item for item in lm.roles.items() if item[0] == 0]:
        weight = target.weight(lm.model)
        _, mask = ref_channel_permutation(ref_ria_metric(weight, stats.sq_norms[target.stats_key]), 2, 4)
        assert torch.equal(result.masks[(layer, role)], mask)
        weight[mask] = 0
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, lab_logits)


# ----- DSnoT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_equals_the_reference(nm):
    W, scaler_row, sums, var = random_layer(64, 512, 3)
    initial = wanda_metric(W, scaler_row)
    n, m = nm or (0, 0)
    expected = ref_dsnot(W, scaler_row, sums, var, initial, 0.5, n, m)
    start = ref_nm(initial, *nm) if nm else method_mask(METHODS["wanda"], W, scaler_row, 0.5)
    assert int(expected.sum()) == int(
        start.sum()
    )  # the reference stays within each row's pruned weights here
    refined = dsnot_mask(W, start, scaler_row, sums, var, initial, nm)
    assert torch.equal(refined, expected)
    assert int((refined != start).sum()) > 64  # it did swap weights
    assert torch.equal(method_mask(METHODS["wanda"], W, scaler_row, 0.5, nm, moments=(sums, var)), expected)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_dsnot_keeps_every_rows_count_and_the_nm_pattern(nm):
    """Few pruned weights per row (64 columns, 20%): where the reference runs out of them and
    prunes extra kept weights, the lab's swaps stop instead."""
    W, scaler_row, sums, var = random_layer(64, 64, 4)
    initial = torch.abs(W)
    sparsity = 0.5 if nm else 0.2
    start = method_mask(METHODS["magnitude-row"], W, None, sparsity, nm)
    refined = dsnot_mask(W, start, scaler_row, sums, var, initial, nm)
    assert torch.equal(refined.sum(dim=1), start.sum(dim=1))
    if nm:
        assert bool((refined.reshape(64, -1, nm[1]).sum(dim=2) == nm[0]).all())
    assert not torch.equal(refined, start)
    n, m = nm or (0, 0)
    reference = ref_dsnot(W, scaler_row, sums, var, initial, sparsity, n, m)
    assert not torch.equal(reference.sum(dim=1), start.sum(dim=1))  # why the guard is there


def test_moments_equal_hooked_statistics_and_come_back_from_disk():
    lm, ids = tiny_model("llama"), random_ids(3, 20)
    pruner = Pruner(lm)
    norms, source = pruner.cached_statistics(ids)
    assert source == "cached: computed" and not norms.sums
    stats, source = pruner.cached_statistics(ids, kind="moments")
    assert source == "cached: computed"  # a norms cache is never read as moments
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj"):
        scaler_row, sum_metric_row, var = ref_moments(layer_inputs(lm, name, ids))
        assert torch.allclose(stats.sq_norms[name], scaler_row, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stats.sums[name], sum_metric_row, rtol=1e-5, atol=1e-5)
        assert torch.allclose(stats.variances[name], var, rtol=1e-5, atol=1e-6)
    again, source = Pruner(lm).cached_statistics(ids, kind="moments")
    assert source == "cached: disk"
    assert all(torch.equal(again.variances[k], v) for k, v in stats.variances.items())
    assert again.sums.keys() == stats.sums.keys()


def test_dsnot_runs_in_both_modes_bypasses_the_rank_cache_and_skips_mlp_as_the_reference():
    lm, ids = tiny_model("llama"), random_ids(4, 32)
    pruner = Pruner(lm)
    plain = pruner.prune(Recipe(model="x", sparsity={"all": 0.5}, stats_mode="cached"), ids=ids).masks
    base = Recipe(model="x", sparsity={"all": 0.5}, refine="dsnot", stats_mode="cached")
    cached = pruner.prune(base, ids=ids).masks
    sequential = pruner.prune(dataclasses.replace(base, stats_mode="sequential"), ids=ids).masks
    assert torch.equal(cached[(0, "q")], sequential[(0, "q")])  # layer 0 sees the same inputs
    assert not torch.equal(cached[(0, "q")], plain[(0, "q")])
    assert torch.equal(cached[(0, "down")], plain[(0, "down")])  # --skip_layer mlp
    assert all(bool((mask.sum(dim=1) == mask.shape[1] // 2).all()) for mask in cached.values())


def test_streamed_dsnot_and_ria_masks_equal_the_in_memory_ones(tmp_path):
    from tiny import streamed_tiny

    memory, streamed = streamed_tiny("llama", tmp_path, "cpu")
    ids = random_ids(3, 24)
    recipes = [
        Recipe(model="x", sparsity={"all": 0.5}, refine="dsnot", stats_mode=mode)
        for mode in ("cached", "sequential")
    ] + [Recipe(model="x", method="ria", structure="2:4", permute=True, sparsity={"all": 0.5}, layers=(0, 1))]
    pruners = Pruner(memory), Pruner(streamed)  # each restores its dense model before pruning
    for recipe in recipes:
        a, b = (pruner.prune(recipe, ids=ids).masks for pruner in pruners)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


# ----- recipe, job size, command line --------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(method="ria", permute=True), "N:M structures with ria"),
        (dict(method="wanda", structure="2:4", permute=True), "N:M structures with ria"),
        (dict(method="magnitude", refine="dsnot"), "same count in every row"),
        (dict(method="sparsegpt", refine="dsnot"), "same count in every row"),
        (dict(method="ria", structure="2:4", permute=True, refine="dsnot"), "same count in every row"),
        (dict(refine="owl"), "refine is one of"),
    ],
)
def test_bad_refinements_get_clear_errors(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**fields)


def test_magnitude_with_dsnot_calibrates_and_the_job_size_says_so():
    recipe = Recipe(method="magnitude", structure="2:4", refine="dsnot", stats_mode="cached")
    size = job_size(recipe, "prune")
    assert (size.calibration_passes, size.statistics) == (1, "moments")
    assert job_size(dataclasses.replace(recipe, refine="none"), "prune").calibration_passes == 0
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe


def test_the_command_line_offers_ria_permutation_and_dsnot(tmp_path):
    from cli.run import build_recipe, parser

    args = parser().parse_args(["--method", "ria", "--structure", "2:4", "--permute"])
    assert (build_recipe(args).method, build_recipe(args).permute) == ("ria", True)
    args = parser().parse_args(["--method", "ria-row", "--refine", "dsnot"])
    assert build_recipe(args).refine == "dsnot"


@pytest.mark.model
def test_a_cli_run_prunes_with_ria_and_dsnot(tmp_path, capsys):
    from tiny import save_tiny_chat_model

    from cli.run import run

    model = save_tiny_chat_model(tmp_path / "model")
    quick = ["--nsamples", "2", "--seqlen", "32", "--eval", "none", "--quiet"]
    assert run(["--model", str(model), "--method", "ria-row", "--refine", "dsnot", *quick]) == 0
    output = json.loads(capsys.readouterr().out)
    assert (output["recipe"]["method"], output["recipe"]["refine"]) == ("ria-row", "dsnot")
    assert output["prune"]["calibration_passes"] == 1
