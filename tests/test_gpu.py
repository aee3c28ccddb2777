"""GPU code paths (skipped without CUDA; CI has none, the lent H200 runs them)."""

import dataclasses

import pytest
import torch
from tiny import random_ids, tiny_model

from prune.recipe import Recipe, parse_sparsity
from runtime.pruner import Pruner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_gpu(arch: str, dtype: torch.dtype):
    lm = tiny_model(arch)
    lm.model.to("cuda", dtype)
    return dataclasses.replace(lm, device=torch.device("cuda"), dtype=dtype)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_gpu_masks_match_cpu_in_fp32(arch):
    ids = random_ids(8, 64)
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"))
    cpu = Pruner(tiny_model(arch), batch_size=4).prune(recipe, ids=ids).masks
    gpu = Pruner(on_gpu(arch, torch.float32), batch_size=4).prune(recipe, ids=ids).masks
    same = sum(int((cpu[k] == gpu[k].cpu()).sum()) for k in cpu)
    assert same / sum(m.numel() for m in cpu.values()) > 0.999


def test_gpu_bf16_cached_reprune_and_bitwise_restore():
    lm = on_gpu("llama", torch.bfloat16)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    pruner = Pruner(lm)
    assert not pruner.use_ranks  # kthvalue on the GPU
    first = pruner.prune(Recipe(sparsity=parse_sparsity("all=0.5"), stats_mode="cached"), ids=random_ids())
    second = pruner.prune(
        Recipe(sparsity=parse_sparsity("attn=0.25,mlp=0.75"), stats_mode="cached"), ids=random_ids()
    )
    assert first.calibration_passes == 1 and second.calibration_passes == 0
    assert pruner.dense.device.type == "cuda"
    q = lm.roles.targets[(0, "q")].weight(lm.model)
    assert ((q == 0).sum(dim=1) == 16).all()
    pruner.restore()
    assert all(torch.equal(p, dense[n]) for n, p in lm.model.named_parameters())


def test_measured_24_on_a_tiny_model_restores_the_weights():
    from evaluation.speed import measure_24, semi_structured_support

    if not semi_structured_support()[0]:
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    lm = on_gpu("llama", torch.float16)
    pruner = Pruner(lm)
    pruner.prune(
        Recipe(sparsity=parse_sparsity("all=0.5"), structure="2:4", stats_mode="cached"), ids=random_ids()
    )
    before = {n: p for n, p in lm.model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    result = measure_24(lm.model, lm.roles, prefill=(2, 64), decode_batches=(1, 4), decode_steps=4, repeats=1)
    assert result.converted > 0 and result.sparse_weight_bytes < result.dense_weight_bytes
    assert len(result.timings) == 3 and all(p.dense_s > 0 and p.sparse_s > 0 for p in result.timings)
    assert result.max_logit_error < 0.05
    after = dict(lm.model.named_parameters())
    assert all(after[n] is before[n] and torch.equal(after[n], values[n]) for n in before)
    assert all(isinstance(line, str) for line in result.lines())
