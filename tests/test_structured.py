"""Structured pruning (heads, MLP channels, whole layers): scores against transcriptions of the
published references (FLAP's ``prune_wanda_sp``, ShortGPT's block influence), removing equals
zeroing, grouped attention kept in whole groups, bitwise restore, and the saved smaller model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from evaluation.lab import Lab
from prune.errors import RecipeError
from prune.recipe import Recipe
from prune.roles import role_map
from runtime.models import LoadedModel
from tests.tiny import VOCAB, random_ids, tiny_model

HEAD_DIM = 16  # tiny models: hidden 64, 4 heads


def _recipe(model: str, structure: str, **sparsity) -> Recipe:
    return Recipe(model=model, structure=structure, sparsity=sparsity, stats_mode="cached")


def _tiny_llama(kv_heads: int, seed: int = 0) -> LoadedModel:
    """A tiny random Llama with ``kv_heads`` key/value heads for its 4 query heads."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=96,
        max_position_embeddings=256,
        use_cache=False,
    )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    return LoadedModel("llama", model, None, role_map(model), torch.device("cpu"), torch.float32, "random")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ----- transcriptions of the references -------------------------------------------------------------
def _wrapped_gpt_scaler_rows(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict:
    """Wanda's ``WrappedGPT.add_batch`` (FLAP's copy): scaler_row over calibration samples one by
    one, from forward hooks on the modules."""
    state = {name: [torch.zeros(model.get_submodule(name).in_features), 0] for name in names}

    def hook(name):
        def add_batch(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()
            row, n = state[name]
            row *= n / (n + 1)
            state[name][1] = n + 1
            row += torch.norm(x, p=2, dim=1) ** 2 / (n + 1)

        return add_batch

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for sample in ids:
            model(sample[None], use_cache=False)
    for h in handles:
        h.remove()
    return {name: row for name, (row, _) in state.items()}


def _flap_wanda_sp(weight: torch.Tensor, scaler_row: torch.Tensor, head_dim: int | None) -> torch.Tensor:
    """FLAP ``prune_wanda_sp``: |W| * sqrt(scaler_row), mean over rows; o_proj: summed per head."""
    metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))
    metric = metric.mean(axis=0)
    return metric.reshape(-1, head_dim).sum(dim=1) if head_dim else metric


def _shortgpt_bi(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """ShortGPT's block influence from ``output_hidden_states`` of plain full-model calls: per
    layer, the mean over tokens of 1 - cos(hidden[i], hidden[i+1]). transformers' last entry is
    after the final RMSNorm, whose weights are ones in a fresh model: a per-token scale, which
    leaves the cosine as it is."""
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    totals, count = None, 0
    with torch.no_grad():
        for sample in ids:
            hidden = model(sample[None], output_hidden_states=True, use_cache=False).hidden_states
            values = []
            for x, y in zip(hidden[:-1], hidden[1:], strict=True):
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
                sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True).T)
                values.append((1 - sim.diagonal()).sum())
            totals = torch.stack(values) if totals is None else totals + torch.stack(values)
            count += sample.numel()
    return (totals / count).tolist()


# ----- the tests ----------------------------------------------------------------------------------
def test_wanda_sp_scores_and_kept_units_match_flap():
    from prune.structured import head_scores, wanda_sp_columns

    lm, ids = _tiny_llama(kv_heads=2), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.o_proj", "mlp.down_proj")]
    rows = _wrapped_gpt_scaler_rows(lm.model, ids, names)
    structure = lab.prune(_recipe("llama", "channels", attn=0.5, mlp=0.25), ids=ids).state.structure
    norms = lab.pruner.cached_statistics(ids)[0].sq_norms  # what the lab scored with (cached)
    with lab.dense() as model:
        for i in range(3):
            o_name, down_name = names[2 * i], names[2 * i + 1]
            o_w, down_w = model.get_submodule(o_name).weight, model.get_submodule(down_name).weight
            heads = _flap_wanda_sp(o_w, rows[o_name], HEAD_DIM)
            channels = _flap_wanda_sp(down_w, rows[down_name], None)
            torch.testing.assert_close(head_scores(o_w, norms[o_name], HEAD_DIM), heads, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(
                wanda_sp_columns(down_w, norms[down_name]), channels, rtol=1e-5, atol=1e-7
            )
            kept_group = int(heads.reshape(2, 2).sum(dim=1).argmax())  # kv head g: query heads 2g, 2g+1
            assert structure.kv_heads[i] == (kept_group,)
            assert structure.q_heads[i] == (2 * kept_group, 2 * kept_group + 1)
            assert list(structure.channels[i]) == sorted(
                torch.argsort(channels, descending=True)[:72].tolist()
            )


def _zeroed(model: nn.Module, structure, num_heads: int, num_kv: int, intermediate: int) -> nn.Module:
    """A copy of the dense model with the removed units' weights zeroed: q, k, v rows and o columns
    of removed heads, down columns of removed channels (what removing them must equal)."""
    zeroed = copy.deepcopy(model)
    for i, layer in enumerate(zeroed.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for h in set(range(num_heads)) - set(structure.q_heads[i]):
            attn.q_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            attn.o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        for h in set(range(num_kv)) - set(structure.kv_heads[i]):
            attn.k_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            attn.v_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
        for c in set(range(intermediate)) - set(structure.channels[i]):
            mlp.down_proj.weight[:, c] = 0
    return zeroed


@pytest.mark.parametrize("kv_heads", [2, 1, 4])
def test_removing_units_equals_zeroing_them_and_groups_stay_whole(kv_heads):
    lm, ids = _tiny_llama(kv_heads), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    dense = copy.deepcopy(lm.model)
    state = lab.prune(_recipe("llama", "channels", attn=0.5, mlp=0.25), ids=ids).state
    s = state.structure
    zeroed = _zeroed(dense, s, 4, kv_heads, 96)
    torch.testing.assert_close(_logits(lab.loaded.model, ids), _logits(zeroed, ids), rtol=1e-4, atol=1e-5)
    config = lab.loaded.model.config
    assert config.intermediate_size == 72 and config.head_dim == HEAD_DIM
    group = 4 // kv_heads
    for i in range(3):
        if kv_heads > 1:  # whole groups: every kept query head's kv head is kept, groups stay full
            assert len(s.kv_heads[i]) == kv_heads // 2
            assert sorted(s.q_heads[i]) == sorted(
                h for g in s.kv_heads[i] for h in range(g * group, (g + 1) * group)
            )
        else:  # multi-query: query heads go, the one kv head stays
            assert s.kv_heads[i] == (0,) and len(s.q_heads[i]) == 2
        shrunk = lab.loaded.model.model.layers[i].self_attn
        assert shrunk.q_proj.weight.shape[0] == len(s.q_heads[i]) * HEAD_DIM
        assert shrunk.k_proj.weight.shape[0] == len(s.kv_heads[i]) * HEAD_DIM
    assert (config.num_attention_heads, config.num_key_value_heads) == (len(s.q_heads[0]), len(s.kv_heads[0]))


def test_depth_ranking_equals_shortgpt_block_influence():
    lm, ids = _tiny_llama(kv_heads=2, seed=1), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    reference = _shortgpt_bi(lm.model, ids)
    dense = copy.deepcopy(lm.model)
    result = lab.prune(_recipe("llama", "depth", all=0.34), ids=ids)  # 1 of 3 layers
    torch.testing.assert_close(
        torch.tensor(result.calibration["block_influence"]), torch.tensor(reference), rtol=1e-4, atol=1e-6
    )
    lowest = min(range(3), key=lambda i: reference[i])
    assert result.state.structure.layers == tuple(i for i in range(3) if i != lowest)
    model = lab.loaded.model
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    del dense.model.layers[lowest]  # the reference: the dense model without that layer
    dense.config.num_hidden_layers = 2
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids))
    with torch.no_grad():  # the kv cache still works with renumbered layers
        cached = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, use_cache=True)
        plain = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize(
    "structure,sparsity", [("channels", {"attn": 0.5, "mlp": 0.5}), ("depth", {"all": 0.5})]
)
def test_dense_model_restored_bitwise(structure, sparsity):
    lm, ids = _tiny_llama(kv_heads=2), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    config = lm.model.config.to_dict()
    roles = lm.roles
    state = lab.prune(_recipe("llama", structure, **sparsity), ids=ids).state
    assert sum(p.numel() for p in lab.loaded.model.parameters()) < sum(p.numel() for p in before.values())
    lab.restore()
    after = dict(lab.loaded.model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert lab.loaded.model.config.to_dict() == config
    assert lab.loaded.roles is roles
    with lab.using(state) as model:  # switching back and forth through the state object
        pruned = _logits(model, ids)
    assert all(torch.equal(p, before[n]) for n, p in lab.loaded.model.named_parameters())
    with lab.using(state) as model:
        assert torch.equal(_logits(model, ids), pruned)


def test_saved_structured_model_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    lm, ids = _tiny_llama(kv_heads=2), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    dense_folder = lab.save(tmp_path / "dense")
    state = lab.prune(_recipe("llama", "channels", attn=0.5, mlp=0.5), ids=ids).state
    expected = _logits(lab.loaded.model, ids)
    lab.restore()
    folder = lab.save(tmp_path / "pruned", state)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert loaded.config.num_attention_heads == 2 and loaded.config.num_key_value_heads == 1
    assert loaded.config.intermediate_size == 48
    torch.testing.assert_close(_logits(loaded, ids), expected)
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.safetensors"))  # noqa: E731
    assert size(folder) < size(dense_folder)
    assert lab.state.is_dense  # the save's state was temporary


def test_structured_refuses_other_families_and_mixed_rates():
    lab = Lab(tiny_model("phi"), batch_size=2)
    with pytest.raises(RecipeError, match="Llama family"):
        lab.prune(_recipe("phi", "channels", mlp=0.5), ids=random_ids())
    with pytest.raises(RecipeError, match="one rate"):
        Recipe(structure="channels", sparsity={"q": 0.5, "o": 0.2})
    with pytest.raises(RecipeError, match="method wanda"):
        Recipe(structure="depth", method="magnitude", sparsity={"all": 0.25})


def test_side_by_side_speed_reports_sizes_and_what_to_expect():
    from evaluation.speed import side_by_side

    lm, ids = _tiny_llama(kv_heads=2), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    dense = sum(p.numel() for p in lm.model.parameters())
    channels = lab.prune(_recipe("llama", "channels", attn=0.5, mlp=0.5), ids=ids).state
    speed = side_by_side(lab, channels, prompt=8, new_tokens=2, repeats=1)
    assert speed.pruned.parameters < speed.dense.parameters == dense
    assert speed.pruned.weight_bytes == 4 * speed.pruned.parameters
    assert "smaller" in speed.note and speed.to_dict()["ratios"]["parameters"] < 1
    masks = lab.prune(Recipe(model="llama", sparsity={"all": 0.5}, stats_mode="cached"), ids=ids).state
    speed = side_by_side(lab, masks, prompt=8, new_tokens=2, repeats=1)
    assert speed.pruned.parameters == speed.dense.parameters
    assert "no speedup is expected" in speed.note
    assert lab.state is masks  # the lab's state is as it was


def test_kept_head_count_divides_the_hidden_size():
    """transformers' Llama configs refuse a head count that does not divide hidden_size (on save
    and load): 3 of 4 heads in a 64-wide model cannot be, so the rate goes to the nearest count."""
    from prune.structured import kept_heads

    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert kept_heads(scores, 4, 0.25, 64) == ((0, 1, 2, 3), (0, 1, 2, 3))  # 3 heads: not allowed; tie
    assert kept_heads(scores, 4, 0.4, 64) == ((0, 2), (0, 2))  # 2 heads: the two best
    assert kept_heads(scores, 4, 0.25, 96) == ((0, 2, 3), (0, 2, 3))  # 96 / 3: allowed


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models_shrink_save_and_load(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, ids = tiny_model(arch), random_ids(4, 16)
    lab = Lab(lm, batch_size=2)
    for structure, sparsity in (("channels", {"attn": 0.5, "mlp": 0.5}), ("depth", {"all": 0.34})):
        state = lab.prune(_recipe(arch, structure, **sparsity), ids=ids).state
        expected = _logits(lab.loaded.model, ids)
        folder = lab.save(tmp_path / structure, state)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(loaded, ids), expected)
