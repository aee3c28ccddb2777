"""SparseGPT against a transcription of the reference's ``SparseGPT.fasterprune`` (the Wanda
repository's ``lib/sparsegpt.py`` without its quantizer), per-role sparsity, cached Hessians and
bitwise restore; on the real SmolLM2, the engine's sequential SparseGPT equals the reference loop."""

from __future__ import annotations

import math

import pytest
import torch
from reference_loop import feed_layer, linears
from tiny import random_ids, tiny_model
from torch import nn

from evaluation.lab import Lab
from prune.recipe import CalibrationSpec, Recipe, parse_sparsity
from prune.roles import ROLES
from prune.sparsegpt import inverse_hessian, sparsegpt_prune
from runtime.pruner import Pruner
from runtime.stats import RunningHessian


class ReferenceSparseGPT:
    """The reference class, transcribed: Hessian by add_batch, then fasterprune in place."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.data.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        del self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    tmp = (
                        W1[:, i : (i + prune_m)] ** 2
                        / (torch.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
                    )
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


@pytest.mark.parametrize("structure", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(48, 200), (32, 256)])
def test_solve_equals_the_reference_fasterprune(structure, shape):
    torch.manual_seed(0)
    rows, columns = shape
    linear = nn.Linear(columns, rows, bias=False)
    inputs = torch.randn(6, 40, columns) * torch.rand(columns)  # uneven column scales
    inputs[..., 3] = 0  # a dead input column
    reference = ReferenceSparseGPT(linear)
    ours = RunningHessian(columns, torch.device("cpu"))
    for sequence in inputs:
        reference.add_batch(sequence.unsqueeze(0), None)
    ours.add(inputs)  # all at once: one sequence at a time inside
    assert torch.equal(ours.hessian, reference.H)
    weight = linear.weight.data.clone()
    hinv, dead = inverse_hessian(ours.hessian)
    new, mask = sparsegpt_prune(weight, hinv, dead, 0.5, structure)
    n, m = structure or (0, 0)
    reference.fasterprune(0.5, n, m)
    theirs = linear.weight.data
    assert torch.equal(new == 0, theirs == 0)
    assert torch.equal(mask, theirs == 0)
    assert torch.allclose(new, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(new[~mask], weight[~mask])  # kept weights were updated
    if structure:
        assert ((mask.reshape(rows, -1, m).sum(dim=2)) >= n).all()
    else:
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.01)


def recipe(sparsity: str, **kwargs) -> Recipe:
    return Recipe(model="llama", method="sparsegpt", sparsity=parse_sparsity(sparsity), **kwargs)


@pytest.mark.parametrize("stats_mode", ["sequential", "cached"])
def test_per_role_sparsity_and_bitwise_restore(stats_mode):
    lm = tiny_model("llama")
    pruner = Pruner(lm)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    asked = {"q": 0.25, "k": 0.5, "v": 0.75, "o": 0.0, "gate": 0.4, "up": 0.5, "down": 0.6}
    result = pruner.prune(
        Recipe(model="llama", method="sparsegpt", sparsity=asked, stats_mode=stats_mode), ids=random_ids()
    )
    for role in ROLES:
        assert result.report.roles[role].sparsity == pytest.approx(asked[role], abs=0.01), role
    o = lm.roles.targets[(0, "o")].module + ".weight"
    assert torch.equal(dict(lm.model.named_parameters())[o], dense[o])  # o = 0 stays dense
    q = lm.roles.targets[(1, "q")]
    kept = q.weight(lm.model) != 0
    assert not torch.equal(q.weight(lm.model)[kept], dense[q.module + ".weight"][kept])  # updated
    pruner.restore()
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, dense[name]), name


def test_hessians_are_shared_by_linears_reading_the_same_input_and_cached():
    lm = tiny_model("llama")
    pruner = Pruner(lm)
    ids = random_ids()
    stats, source = pruner.cached_statistics(ids, kind="hessian")
    name = lm.roles.targets
    assert stats.hessians[name[(0, "q")].module] is stats.hessians[name[(0, "k")].module]
    assert stats.hessians[name[(0, "q")].module] is stats.hessians[name[(0, "v")].module]
    assert stats.hessians[name[(0, "gate")].module] is stats.hessians[name[(0, "up")].module]
    assert stats.hessians[name[(0, "o")].module] is not stats.hessians[name[(0, "q")].module]
    assert source == "cached: computed" and pruner.calibration_passes == 1
    first = pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=ids)
    second = pruner.prune(recipe("attn=0.3,mlp=0.6", stats_mode="cached"), ids=ids)
    assert first.calibration_passes == 0 and second.calibration_passes == 0  # only the solves
    assert second.stats_source == "cached: memory"
    assert second.report.roles["q"].sparsity == pytest.approx(0.3, abs=0.01)


def test_nm_sparsegpt_is_exact_per_group():
    lm = tiny_model("qwen2")
    Pruner(lm).prune(
        Recipe(model="qwen2", method="sparsegpt", structure="2:4", sparsity={"all": 0.5}), ids=random_ids()
    )
    for _, _, target in lm.roles.items():
        weight = target.weight(lm.model)
        assert ((weight == 0).reshape(weight.shape[0], -1, 4).sum(dim=2) == 2).all()


def test_a_temporary_dense_switch_brings_the_updated_weights_back():
    lm = tiny_model("llama")
    lab = Lab(lm)
    lab.prune(recipe("all=0.5", stats_mode="cached"), ids=random_ids(), key="s")
    pruned = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with lab.dense() as model:
        assert not torch.equal(
            lm.roles.targets[(0, "q")].weight(model), pruned[lm.roles.targets[(0, "q")].module + ".weight"]
        )
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, pruned[name]), name


def test_sparsegpt_refuses_use_variant():
    from prune.errors import RecipeError

    with pytest.raises(RecipeError, match="use_variant"):
        Recipe(method="sparsegpt", use_variant=True)


# ----- the real model ---------------------------------------------------------------------------------
@torch.no_grad()
def reference_sparsegpt(model, ids: torch.Tensor, sparsity: float, num_layers: int) -> None:
    """The reference loop by other means: each layer's Hessians from full forward passes (batch 1)
    of the model with the earlier layers already pruned, then fasterprune on every linear."""
    for i in range(num_layers):
        layer = model.model.layers[i]
        gpts = {m: ReferenceSparseGPT(m) for m in linears(layer).values()}
        feed_layer(
            model,
            layer,
            ids,
            {m: lambda _m, inp, out, g=g: g.add_batch(inp[0].data, out.data) for m, g in gpts.items()},
        )
        for gpt in gpts.values():
            gpt.fasterprune(sparsity)


@pytest.mark.model
def test_sequential_sparsegpt_equals_the_reference_on_smollm2(smollm2):
    pruner = Pruner(smollm2, batch_size=1)
    spec = CalibrationSpec(source="c4", nsamples=4, seqlen=128, seed=0)
    recipe = Recipe(method="sparsegpt", sparsity=parse_sparsity("all=0.5"), layers=[0, 2], calibration=spec)
    ids = pruner.calibration_ids(spec)
    pruner.prune(recipe, ids=ids)
    layers = smollm2.model.model.layers[:2]
    ours = {n: m.weight.detach().clone() for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
    pruner.restore()
    try:
        reference_sparsegpt(smollm2.model, ids, 0.5, 2)
        theirs = {n: m.weight.detach().clone() for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
    finally:
        pruner.dense.restore()
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:
        assert torch.equal(ours[name] == 0, theirs[name] == 0), name
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-5), name


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox", "falcon"])
def test_fused_and_viewed_matrices(arch):
    """Row slices of fused q/k/v (Phi-3, GPT-2), per-head views (GPT-NeoX, Falcon), transposed
    Conv1D: each role is solved on its own rows with the module's Hessian, then restored bitwise."""
    lm = tiny_model(arch)
    pruner = Pruner(lm)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    result = pruner.prune(
        Recipe(model=arch, method="sparsegpt", sparsity={"q": 0.25, "k": 0.5, "v": 0.75, "mlp": 0.5}),
        ids=random_ids(),
    )
    assert result.report.roles["q"].sparsity == pytest.approx(0.25, abs=0.01)
    assert result.report.roles["v"].sparsity == pytest.approx(0.75, abs=0.01)
    assert result.report.roles["down"].sparsity == pytest.approx(0.5, abs=0.01)
    assert result.report.roles["o"].pruned == 0
    pruner.restore()
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, dense[name]), name
