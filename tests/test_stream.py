"""Layer streaming gives bitwise the same masks, rewritten weights, logits and perplexity as the
model held in memory: same float operations, one decoder layer at a time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import ARCHS, MOE_ARCHS, random_ids, tiny_model

from evaluation.generate import DecodingSettings, generate
from evaluation.lab import Lab
from evaluation.perplexity import window_logits
from prune.recipe import CalibrationSpec, Recipe, parse_sparsity
from runtime.models import LoadedModel, _load_streamed, load
from runtime.pruner import Pruner

CALIBRATION = CalibrationSpec(source="c4", nsamples=4, seqlen=64)


def _streamed_tiny(arch: str, folder, store: str) -> LoadedModel:
    """A tiny random model saved as safetensors, loaded back with its layers streamed."""
    tiny = tiny_model(arch)
    tiny.model.save_pretrained(folder, safe_serialization=True)
    kwargs = dict(revision=None, trust_remote_code=False)
    model, stream = _load_streamed(
        str(folder), torch.float32, torch.device("cpu"), store, "cpu", kwargs, True
    )
    model.config.use_cache = False
    return tiny, LoadedModel(arch, model, None, stream.roles, torch.device("cpu"), torch.float32, "x", stream)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_families_stream_bitwise(arch, tmp_path):
    memory, streamed = _streamed_tiny(arch, tmp_path, "disk")
    for name, _ in streamed.stream.store.items() if hasattr(streamed.stream.store, "items") else []:
        assert name.startswith(streamed.roles.layers_path)
    layer_weight = next(streamed.roles.layers(streamed.model)[0].parameters())
    assert layer_weight.is_meta  # nothing of the layers is held outside the store
    ids = random_ids(4, 64)  # longer than Gemma-3's sliding window (32): its layers differ
    methods = ["wanda"] if arch in MOE_ARCHS else ["wanda", "sparsegpt"]
    memory_pruner, streamed_pruner = Pruner(memory), Pruner(streamed)  # each restores before pruning
    for method in methods:
        for mode in ("cached", "sequential"):
            recipe = Recipe(model=arch, method=method, stats_mode=mode, sparsity=parse_sparsity("all=0.5"))
            a = memory_pruner.prune(recipe, ids=ids)
            b = streamed_pruner.prune(recipe, ids=ids)
            assert a.report.pruned == b.report.pruned > 0
            assert _same(a.masks, b.masks), (method, mode)
            assert _same(a.values, b.values), (method, mode)
    # the pruned model's logits: one model call vs one layer-by-layer pass and the replayed head
    recipe = Recipe(model=arch, stats_mode="cached", sparsity=parse_sparsity("all=0.5"))
    result = streamed_pruner.prune(recipe, ids=ids)
    memory_pruner.apply(result.masks)
    windows = random_ids(3, 64, seed=1)
    for k in range(3):
        expected = memory.model(windows[k : k + 1], use_cache=False).logits
        assert torch.equal(
            window_logits(streamed.model, windows, 1, streamed.stream, lambda event: None)(
                k, windows[k : k + 1]
            ),
            expected,
        )
        assert torch.equal(streamed.model(windows[k : k + 1], use_cache=False).logits, expected)  # hooks path
    assert layer_weight.is_meta and all(
        p.is_meta for layer in streamed.roles.layers(streamed.model) for p in layer.parameters()
    )


@pytest.fixture(scope="module")
def smollm2_labs():
    return {store: Lab(load("smollm2-135m-instruct", streaming=store)) for store in ("off", "cpu", "disk")}


@pytest.mark.model
@pytest.mark.parametrize("mode", ["cached", "sequential"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_smollm2_streamed_equals_in_memory(smollm2_labs, method, mode):
    recipe = Recipe(
        method=method,
        stats_mode=mode,
        sparsity=parse_sparsity("all=0.5"),
        layers=(0, 6) if method == "sparsegpt" else None,  # solves take seconds a layer on CPU
        calibration=CALIBRATION,
    )
    results = {}
    for store, lab in smollm2_labs.items():
        pruned = lab.prune(recipe)
        results[store] = (pruned, lab.perplexity("wikitext2", 128, 4).perplexity)
    (memory, ppl), dense_ppl = results["off"], smollm2_labs["off"].dense_perplexity("wikitext2", 128, 4)
    assert ppl > dense_ppl.perplexity  # pruning cost something
    for store in ("cpu", "disk"):
        streamed, streamed_ppl = results[store]
        assert _same(memory.masks, streamed.masks) and _same(memory.values, streamed.values)
        assert streamed.report.pruned == memory.report.pruned
        assert streamed_ppl == ppl  # bitwise: same floats in the same order
    for lab in smollm2_labs.values():
        lab.restore()


@pytest.mark.model
def test_smollm2_streamed_generation_and_memory(smollm2_labs):
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"), stats_mode="cached", calibration=CALIBRATION)
    settings = DecodingSettings(max_new_tokens=8)
    answers = {}
    for store, lab in smollm2_labs.items():
        lab.prune(recipe)
        answers[store] = generate(
            lab.loaded.model, lab.loaded.tokenizer, "The capital of France is", settings
        )
    assert answers["cpu"] == answers["disk"] == answers["off"]
    streamed = smollm2_labs["disk"]
    memory = streamed.memory()
    assert memory["dense_copy_bytes"] == 0 and "disk" in memory["dense_copy_on"]
    assert streamed.loaded.stream.layer_bytes() < memory["weights_bytes"] / 20  # one of 30 layers
    with streamed.dense():
        dense = generate(
            streamed.loaded.model, streamed.loaded.tokenizer, "The capital of France is", settings
        )
    with smollm2_labs["off"].dense():
        assert dense == generate(
            smollm2_labs["off"].loaded.model,
            smollm2_labs["off"].loaded.tokenizer,
            "The capital of France is",
            settings,
        )
    for lab in smollm2_labs.values():
        lab.restore()


def test_streamed_state_is_reversible(tmp_path):
    memory, streamed = _streamed_tiny("llama", tmp_path, "cpu")
    ids = random_ids(4, 32)
    before = {name: t.clone() for name, t in streamed.stream.store.items()}
    pruner = Pruner(streamed)
    recipe = Recipe(model="llama", method="sparsegpt", sparsity=parse_sparsity("all=0.5"))
    pruner.prune(recipe, ids=ids)
    pruner.prune(dataclasses.replace(recipe, method="magnitude"), ids=ids)
    assert _same(before, dict(streamed.stream.store))  # the store never holds a pruned weight
    pruner.restore()
    windows = random_ids(2, 32, seed=2)
    assert torch.equal(
        streamed.model(windows, use_cache=False).logits, memory.model(windows, use_cache=False).logits
    )


@pytest.mark.model
def test_the_memory_plan_streams_a_model_too_big_for_the_budget_and_refuses_with_numbers(smollm2_labs):
    from runtime.memory import MemoryPlanError, Workload

    small = Workload(nsamples=4, seqlen=64, batch_size=1, eval_windows=4, eval_seqlen=128)
    loaded = load("smollm2-135m-instruct", max_memory="cpu=600MB", workload=small)
    assert loaded.plan.mode == "streamed" and loaded.stream is not None
    assert loaded.stream.store_kind == loaded.plan.store == "disk"  # a CPU reads layers from disk
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"), stats_mode="cached", calibration=CALIBRATION)
    lab = Lab(loaded)
    assert _same(lab.prune(recipe).masks, smollm2_labs["off"].prune(recipe).masks)
    smollm2_labs["off"].restore()
    assert load("smollm2-135m-instruct", workload=small).plan.mode == "in-memory"
    with pytest.raises(MemoryPlanError, match=r"GiB.*--max-memory"):
        load("smollm2-135m-instruct", max_memory="cpu=100MB", workload=small)
    with pytest.raises(MemoryPlanError, match="streaming off"):
        load("smollm2-135m-instruct", max_memory="cpu=600MB", workload=small, streaming="off")
