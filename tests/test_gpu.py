"""GPU code paths (skipped without CUDA; CI has none, the lent H200 runs them)."""

import dataclasses

import pytest
import torch
from tiny import random_ids, tiny_model

from prune.pruner import Pruner
from prune.recipe import Recipe, parse_sparsity

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
