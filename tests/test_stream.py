"""Layer streaming and the one layer-by-layer loop give bitwise what an independent computation
gives: the references' statistics from plain forwards of the whole in-memory model with hooks on
its linears, the paper's sequential procedure fed the same way, perplexity from plain forwards of
the windows. Then streamed equals in memory for masks, rewritten weights, logits, generation and
allocation."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_loop import feed_layer
from tiny import ARCHS, MOE_ARCHS, random_ids, save_tiny_chat_model, streamed_tiny

from evaluation import allocate as al
from evaluation.generate import DecodingSettings, generate
from evaluation.lab import Lab
from evaluation.perplexity import encoded
from prune.recipe import CalibrationSpec, Recipe, parse_sparsity
from prune.sparsegpt import inverse_hessian, sparsegpt_prune
from runtime.models import LoadedModel, load
from runtime.pruner import Pruner
from runtime.stats import calibration_statistics

CALIBRATION = CalibrationSpec(source="c4", nsamples=4, seqlen=64)


@pytest.fixture(autouse=True)
def unshared_stats_cache(monkeypatch, tmp_path):
    """Every statistics file goes to a folder of its own, never read back: each placement computes
    its own statistics (they would otherwise share one file: same model, same ids)."""
    monkeypatch.setattr("runtime.pruner.cache_dir", lambda *parts: Path(tempfile.mkdtemp(dir=tmp_path)))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----- the independent computations ----------------------------------------------------------------
@torch.no_grad()
def reference_statistics(model, names: list[str], ids: torch.Tensor, kind: str, stop_after) -> dict:
    """The references' ``add_batch`` (Wanda's squared column norms, SparseGPT's ``2/n sum x x^T``)
    on every module in ``names``, fed by plain forwards of the whole model, one sequence at a time,
    stopped after the decoder layer ``stop_after``."""
    found: dict[str, torch.Tensor] = {}
    seen = dict.fromkeys(names, 0)

    def add_batch(name):
        def hook(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()  # (columns, tokens)
            columns = x.shape[0]
            n = seen[name]
            if kind == "norms":
                acc = found.setdefault(name, torch.zeros(columns))
                acc *= n / (n + 1)
                acc += torch.norm(x, p=2, dim=1) ** 2 / (n + 1)
            else:
                acc = found.setdefault(name, torch.zeros(columns, columns))
                acc *= n / (n + 1)
                x = math.sqrt(2 / (n + 1)) * x
                acc += x.matmul(x.t())
            seen[name] = n + 1

        return hook

    feed_layer(model, stop_after, ids, {model.get_submodule(n): add_batch(n) for n in names})
    return found


@torch.no_grad()
def paper_sequential(lm: LoadedModel, ids: torch.Tensor, method: str, sparsity: float) -> None:
    """The papers' layer-by-layer procedure on a model in memory, by other means than the engine:
    each layer's statistics from plain forwards with the earlier layers already pruned; Wanda zeroes
    per row the int(in * s) lowest |W| * ||X||_2 after a stable sort; SparseGPT solves on the
    layer's Hessian (``prune.sparsegpt``, the method itself)."""
    model, roles = lm.model, lm.roles
    kind = "norms" if method == "wanda" else "hessian"
    for i, layer in enumerate(roles.layers(model)):
        names = roles.modules_in_layer(i)
        stats = reference_statistics(model, names, ids, kind, layer)
        for name in names:
            weight = model.get_submodule(name).weight
            if method == "wanda":
                metric = weight.abs() * torch.sqrt(stats[name].reshape(1, -1))
                order = torch.sort(metric, dim=-1, stable=True)[1]
                mask = torch.zeros_like(metric, dtype=torch.bool)
                mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
                weight[mask] = 0
            else:
                hinv, dead = inverse_hessian(stats[name])
                new, mask = sparsegpt_prune(weight, hinv, dead, sparsity, None)
                weight.copy_(new.to(weight.dtype))
                weight[mask] = 0


def plain_perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """The protocol with one plain call of the whole model per window."""
    nll = 0.0
    for k in range(windows):
        inputs = ids[:, k * seqlen : (k + 1) * seqlen]
        logits = model(inputs, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), inputs[:, 1:].reshape(-1)
        )
        nll += loss.float().item() * seqlen
    return math.exp(nll / (windows * seqlen))


# ----- tiny models: every family ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_families_stream_bitwise(arch, tmp_path):
    memory, streamed = streamed_tiny(arch, tmp_path, "disk")
    assert all(name.startswith(streamed.roles.layers_path) for name in streamed.stream.store.keys())
    layer_weight = next(streamed.roles.layers(streamed.model)[0].parameters())
    assert layer_weight.is_meta  # nothing of the layers is held outside the store
    ids = random_ids(4, 64)  # longer than Gemma-3's sliding window (32): its layers differ
    names = [n for layer in range(memory.roles.num_layers) for n in memory.roles.modules_in_layer(layer)]
    last = memory.roles.layers(memory.model)[-1]
    kinds = ["norms"] if arch in MOE_ARCHS else ["norms", "hessian"]
    for kind in kinds:  # the dense pass, held in memory and streamed, vs the references' hooks
        expected = reference_statistics(memory.model, names, ids, kind, last)
        for lm in (memory, streamed):
            stats = calibration_statistics(lm, ids, 1, kind=kind)
            found = stats.sq_norms if kind == "norms" else stats.hessians
            assert _same({n: found[n] for n in names}, expected), (kind, lm.stream is not None)
    methods = ["wanda"] if arch in MOE_ARCHS else ["wanda", "sparsegpt"]
    memory_pruner, streamed_pruner = Pruner(memory), Pruner(streamed)  # each restores before pruning
    for method, mode in itertools.product(methods, ("cached", "sequential")):
        recipe = Recipe(model=arch, method=method, stats_mode=mode, sparsity=parse_sparsity("all=0.5"))
        a = memory_pruner.prune(recipe, ids=ids)
        b = streamed_pruner.prune(recipe, ids=ids)
        assert a.report.pruned == b.report.pruned > 0
        assert _same(a.masks, b.masks), (method, mode)
        assert _same(a.values, b.values), (method, mode)
    # the pruned model's logits: one plain call in memory vs one layer-by-layer pass and the head
    recipe = Recipe(model=arch, stats_mode="cached", sparsity=parse_sparsity("all=0.5"))
    result = streamed_pruner.prune(recipe, ids=ids)
    memory_pruner.apply(result.state)
    windows = random_ids(3, 64, seed=1)
    logits_of = streamed.window_logits(windows, 1, lambda done, steps: None)
    for k in range(3):
        expected = memory.model(windows[k : k + 1], use_cache=False).logits
        assert torch.equal(logits_of(k, windows[k : k + 1]), expected)
        assert torch.equal(streamed.model(windows[k : k + 1], use_cache=False).logits, expected)  # hooks path
    assert all(p.is_meta for layer in streamed.roles.layers(streamed.model) for p in layer.parameters())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_sequential_pruning_is_the_papers_procedure(method, tmp_path):
    memory, streamed = streamed_tiny("llama", tmp_path, "cpu")
    ids = random_ids(4, 32)
    recipe = Recipe(model="llama", method=method, stats_mode="sequential", sparsity=parse_sparsity("all=0.5"))
    result = Pruner(streamed, batch_size=1).prune(recipe, ids=ids)
    reference = copy.deepcopy(memory)
    paper_sequential(reference, ids, method, 0.5)
    Pruner(memory).apply(result.state)
    names = [n for layer in range(memory.roles.num_layers) for n in memory.roles.modules_in_layer(layer)]
    pruned = {n: memory.model.get_submodule(n).weight for n in names}
    assert _same(pruned, {n: reference.model.get_submodule(n).weight for n in names})
    assert result.report.pruned == sum(int((w == 0).sum()) for w in pruned.values()) > 0


def test_streamed_state_is_reversible(tmp_path):
    memory, streamed = streamed_tiny("llama", tmp_path, "cpu")
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


# ----- a tiny model folder loaded as users load one: perplexity and allocation -----------------------
TEXT = " ".join(
    f"The {w} of the {v} was {u}, and the {v} said {w} again."
    for w, v, u in itertools.product(
        ("river", "stone", "garden", "letter"), ("city", "child", "window"), ("quiet", "late", "bright")
    )
)


def test_streamed_perplexity_and_allocation_equal_in_memory(tmp_path):
    folder = save_tiny_chat_model(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    labs = {store: Lab(load(str(folder), streaming=store)) for store in ("off", "disk")}
    assert labs["disk"].loaded.stream is not None and labs["off"].loaded.stream is None
    memory = labs["off"].loaded
    ids = encoded(memory.tokenizer, str(text))[0]
    windows = ids.numel() // 32
    assert windows >= 3
    recipe = Recipe(model=memory.name, stats_mode="cached", sparsity=parse_sparsity("all=0.5"))
    pruned = {store: lab.prune(recipe, ids=random_ids(4, 32)) for store, lab in labs.items()}
    assert _same(pruned["off"].masks, pruned["disk"].masks)
    expected = plain_perplexity(memory.model, ids, 32, windows)  # the pruned model in memory
    for lab in labs.values():
        assert lab.perplexity(str(text), 32, None).perplexity == expected
        lab.restore()
    # allocation (study allocate): OWL's outlier ratios read every layer's dense weights
    calibration = CalibrationSpec(source="file", path=str(text), nsamples=4, seqlen=32)
    calib_ids = labs["off"].calibration_ids(calibration)
    layers = memory.roles.layers(memory.model)
    expected_ratios = []
    for i in range(len(layers)):
        names = memory.roles.modules_in_layer(i)
        norms = reference_statistics(memory.model, names, calib_ids, "norms", layers[-1])
        scores = [
            (memory.model.get_submodule(n).weight.abs() * torch.sqrt(norms[n].reshape(1, -1))).flatten()
            for n in names
        ]
        flat = torch.cat(scores)
        expected_ratios.append(float((flat > 5.0 * flat.mean()).float().mean()))
    shape = al.shapes(labs["off"])
    curves = {r: [(0.0, 0.0), (1.0, w)] for r, w in zip(shape, (1, 1, 4, 2, 3, 3, 5), strict=True)}
    allocations = {}
    for store, lab in labs.items():
        assert al.outlier_ratios(lab, calibration) == expected_ratios
        base = Recipe(model=memory.name, stats_mode="cached", calibration=calibration)
        allocations[store] = al.allocate(lab, 0.5, curves, bounds=(0.0, 0.9), base=base)
    assert allocations["disk"].sparsity == allocations["off"].sparsity
    assert len(set(expected_ratios)) > 1  # the layers differ: the offsets are not all zero


# ----- the real SmolLM2 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_labs():
    return {store: Lab(load("smollm2-135m-instruct", streaming=store)) for store in ("off", "cpu", "disk")}


@pytest.mark.model
@pytest.mark.parametrize("mode", ["cached", "sequential"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_smollm2_streamed_equals_in_memory(smollm2_labs, method, mode):
    """The disk store here; the CPU store is the tiny tests' and the generation test's."""
    recipe = Recipe(
        method=method,
        stats_mode=mode,
        sparsity=parse_sparsity("all=0.5"),
        layers=(0, 6) if method == "sparsegpt" else None,  # solves take seconds a layer on CPU
        calibration=CALIBRATION,
    )
    labs = {store: smollm2_labs[store] for store in ("off", "disk")}
    results = {
        store: (lab.prune(recipe), lab.perplexity("wikitext2", 128, 4).perplexity)
        for store, lab in labs.items()
    }
    (memory, ppl), (streamed, streamed_ppl) = results["off"], results["disk"]
    assert ppl > labs["off"].dense_perplexity("wikitext2", 128, 4).perplexity  # pruning cost something
    assert _same(memory.masks, streamed.masks) and _same(memory.values, streamed.values)
    assert streamed.report.pruned == memory.report.pruned
    assert streamed_ppl == ppl  # bitwise: same floats in the same order
    for lab in labs.values():
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
