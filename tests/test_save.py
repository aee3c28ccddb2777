"""Saving a model of any placement: the folder is what ``save_pretrained`` writes for a model in
memory, loads with plain ``AutoModelForCausalLM.from_pretrained``, and a streamed or quantized
model's folder holds the same weights (the same zeros) as the in-memory one. A failed save leaves
no folder behind and an existing one as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import ARCHS, MOE_ARCHS, random_ids, streamed_tiny, tiny_model

from evaluation.lab import Lab
from prune.recipe import Recipe, parse_sparsity
from runtime import save as save_module
from runtime.pruner import Pruner
from runtime.save import SaveError, save_model


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, read with safetensors itself (all shards)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def loaded_back(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_in_memory_save_is_what_save_pretrained_writes(arch, tmp_path):
    lm = tiny_model(arch)
    Pruner(lm).prune(Recipe(model=arch, method="magnitude", sparsity=parse_sparsity("all=0.5")))
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    assert save_model(lm, ours) == ours
    lm.model.save_pretrained(stock, safe_serialization=True)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in stock.iterdir())
    assert same(saved_tensors(ours), saved_tensors(stock))
    assert json.loads((ours / "config.json").read_text()) == json.loads((stock / "config.json").read_text())
    assert same(loaded_back(ours), lm.model.state_dict())  # the pruned weights, tied ones included


def test_a_sharded_save_writes_the_shards_and_index_save_pretrained_writes(monkeypatch, tmp_path):
    lm = tiny_model("llama")
    monkeypatch.setattr(save_module, "_max_shard_size", lambda: "60KB")
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    save_model(lm, ours)
    lm.model.save_pretrained(stock, safe_serialization=True, max_shard_size="60KB")
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    assert index == json.loads((stock / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert same(loaded_back(ours), lm.model.state_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2_moe"])
@pytest.mark.parametrize("store", ["cpu", "disk"])
def test_a_streamed_save_holds_the_in_memory_weights(arch, store, tmp_path):
    memory, streamed = streamed_tiny(arch, tmp_path / "checkpoint", store)
    dense_store = {name: t.clone() for name, t in streamed.stream.store.items()}
    method = "wanda" if arch in MOE_ARCHS else "sparsegpt"  # SparseGPT also rewrites kept weights
    recipe = Recipe(model=arch, method=method, sparsity=parse_sparsity("all=0.5"))
    ids = random_ids(4, 32)
    a = Pruner(memory).prune(recipe, ids=ids)
    b = Pruner(streamed).prune(recipe, ids=ids)
    assert b.report.pruned == a.report.pruned > 0
    save_model(memory, tmp_path / "memory")
    save_model(streamed, tmp_path / "streamed")
    expected = memory.model.state_dict()
    assert same(loaded_back(tmp_path / "streamed"), expected)
    assert same(saved_tensors(tmp_path / "streamed"), saved_tensors(tmp_path / "memory"))
    assert same(dense_store, dict(streamed.stream.store))  # the store still holds the dense model
    assert all(p.is_meta for layer in streamed.roles.layers(streamed.model) for p in layer.parameters())


def test_a_quantized_lab_saves_the_full_precision_pruned_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    lab = Lab(tiny_model("llama"))
    recipe = Recipe(model="llama", method="wanda", sparsity=parse_sparsity("all=0.5"))
    state = lab.prune(recipe, ids=random_ids(4, 32)).state
    expected = {name: t.clone() for name, t in lab.loaded.model.state_dict().items()}
    lab.quantized("nf4", state)
    lab.restore()
    lab.save(tmp_path / "out", state)  # the state is applied for the save, then taken off again
    assert same(loaded_back(tmp_path / "out"), expected)
    assert lab.pruner.state.is_dense


def test_a_failed_save_leaves_no_folder_and_keeps_the_old_one(monkeypatch, tmp_path):
    lm = tiny_model("llama")
    target = tmp_path / "out"
    save_model(lm, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    Pruner(lm).prune(Recipe(model="llama", method="magnitude", sparsity=parse_sparsity("all=0.5")))
    written = []

    def disk_full(file, tensor, meta, name):
        written.append(name)
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    monkeypatch.setattr(save_module, "_write_tensor", disk_full)
    with pytest.raises(SaveError, match=f"cannot save the model to {target}: No space left on device"):
        save_model(lm, target)
    assert len(written) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder beside it
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_a_save_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "out" / "model", tmp_path / "file"):
        with pytest.raises(SaveError, match=f"to {target}: {tmp_path / 'file'} is a file, not a folder"):
            save_model(tiny_model("llama"), target)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
