"""Role maps of the layouts beyond Llama's: GPT-NeoX, Falcon, mixture-of-experts, and unknown
model types found by module names. Tiny random models; see tests/test_engine.py for the
per-role sparsity and restore tests, which run over every architecture in ``tiny.ARCHS``."""

import pytest
import torch
from tiny import ARCHS, MOE_ARCHS, random_ids, tiny_model

from prune.recipe import Recipe, RecipeError, parse_sparsity
from runtime.pruner import Pruner

ROUTERS = ("mlp.gate.weight", "shared_expert_gate.weight")


def recipe(sparsity: str, **kwargs) -> Recipe:
    return Recipe(model="tiny", sparsity=parse_sparsity(sparsity), **kwargs)


def zeros_per_row(weight: torch.Tensor) -> torch.Tensor:
    return (weight == 0).reshape(-1, weight.shape[-1]).sum(dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_prunable_matrix_once_and_never_a_router(arch):
    lm = tiny_model(arch)
    roles = lm.roles
    covered = [name for _, _, t in roles.items() for name in t.param_names()]
    layers = roles.layers_path
    matrices = {
        name
        for name, p in lm.model.named_parameters()
        if name.startswith(layers + ".") and p.dim() >= 2 and not name.endswith(ROUTERS)
    }
    assert set(covered) == matrices
    assert not any(name.endswith(ROUTERS) for name in covered)
    # every weight of those matrices is in exactly one role, and views edit the model in place
    with torch.no_grad():
        for name in matrices:
            lm.model.get_parameter(name).zero_()
        for _, _, t in roles.items():
            for view in t.views(lm.model):
                view += 1
    for name in matrices:
        assert (lm.model.get_parameter(name) == 1).all(), name
    assert roles.note is None


def test_neox_interleaved_qkv_each_get_their_own_sparsity():
    lm = tiny_model("gpt_neox")
    Pruner(lm).prune(recipe("q=0.25,k=0.5,v=0.0"), ids=random_ids())
    cfg = lm.model.config
    for layer in range(cfg.num_hidden_layers):
        fused = lm.model.gpt_neox.layers[layer].attention.query_key_value.weight
        heads = fused.view(cfg.num_attention_heads, 3, -1, cfg.hidden_size)  # rows: (head, q|k|v, dim)
        assert (zeros_per_row(heads[:, 0]) == 16).all()
        assert (zeros_per_row(heads[:, 1]) == 32).all()
        assert (zeros_per_row(heads[:, 2]) == 0).all()


@pytest.mark.parametrize("arch", ["falcon", "falcon_new", "falcon_classic"])
def test_falcon_qkv_follows_the_attention_forward(arch, monkeypatch):
    """The q, k and v rows the role map names are the ones FalconAttention.forward splits into the
    query, key and value states it attends with (caught at torch's SDPA, which the attention calls
    in every transformers 5 release the requirements admit: 5.20 inline, later through its
    attention interface)."""
    lm = tiny_model(arch)
    with torch.no_grad():
        for i, role in enumerate("qkv"):
            lm.roles.targets[(0, role)].weight(lm.model).fill_(i + 1.0)  # in place, through the view
    seen = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def capture(query, key, value, *args, **kwargs):
        if not seen:  # the first call is layer 0's
            seen.update(q=query, k=key, v=value)
        return sdpa(query, key, value, *args, **kwargs)

    def one_hot_input(_module, args):  # the fused output is then the weight's column 0
        x = torch.zeros_like(args[0])
        x[..., 0] = 1.0
        return (x,)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
    monkeypatch.setattr(lm.model.config, "_attn_implementation", "sdpa")
    lm.model.transformer.h[0].self_attention.query_key_value.register_forward_pre_hook(one_hot_input)
    # Two tokens: with one, transformers 5.25 folds grouped query heads into the sequence axis.
    with torch.no_grad():
        lm.model(torch.tensor([[5, 6]]), use_cache=False)
    q, k, v = seen["q"], seen["k"], seen["v"]
    q0, k0 = q[:, :, 0], k[:, :, 0]  # position 0, where the rotary embedding is the identity
    assert torch.allclose(q0, torch.ones_like(q0)) and torch.allclose(k0, torch.full_like(k0, 2.0))
    assert torch.allclose(v, torch.full_like(v, 3.0))
    assert q.shape[1] == lm.model.config.num_attention_heads


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_roles_are_every_experts_rows(arch):
    lm = tiny_model(arch)
    block = lm.model.model.layers[0].mlp
    experts = block.experts
    e, two_i, h = experts.gate_up_proj.shape
    gate, up, down = (lm.roles.targets[(0, r)] for r in ("gate", "up", "down"))
    routed = [t.pieces()[0] for t in (gate, up, down)]
    assert [t.experts for t in routed] == [e, e, e]
    assert routed[0].weight(lm.model).shape == (e, two_i // 2, h)
    assert torch.equal(routed[0].weight(lm.model), experts.gate_up_proj[:, : two_i // 2])  # gate first
    assert torch.equal(routed[1].weight(lm.model), experts.gate_up_proj[:, two_i // 2 :])
    assert routed[2].weight(lm.model).shape == (e, h, two_i // 2)
    if arch == "qwen2_moe":  # the shared expert belongs to the same roles
        assert [len(t.parts) for t in (gate, up, down)] == [2, 2, 2]
        assert gate.parts[1].module.endswith("mlp.shared_expert.gate_proj")
        assert lm.roles.targets[(1, "gate")].module.endswith("layers.1.mlp.gate_proj")  # dense layer
    shapes = lm.roles.shapes(lm.model)
    assert shapes["down"][1] == two_i // 2 and shapes["gate"][1] == h


def _direct_expert_norms(lm, ids):
    """Per expert, from the tokens its router sends it: sum of x^2 over those tokens of the MoE
    block's input and of act(x gate^T) * (x up^T), divided by the number of sequences."""
    blocks = {}
    captured = {}
    handles = []
    for i, layer in enumerate(lm.model.model.layers):
        if hasattr(layer.mlp, "experts"):
            blocks[i] = layer.mlp

            def keep(_module, args, i=i):
                captured[i] = args[0]

            handles.append(layer.mlp.register_forward_pre_hook(keep))
    with torch.no_grad():
        lm.model(ids, use_cache=False)
    for h in handles:
        h.remove()
    act = torch.nn.functional.silu
    norms, tokens = {}, {}
    for i, block in blocks.items():
        x = captured[i].reshape(-1, captured[i].shape[-1])
        _, _, index = block.gate(x)
        w = block.experts.gate_up_proj
        half = w.shape[1] // 2
        e = w.shape[0]
        gate_up, down, count = (
            torch.zeros(e, x.shape[1]),
            torch.zeros(e, half),
            torch.zeros(e, dtype=torch.long),
        )
        for expert in range(e):
            xe = x[(index == expert).any(dim=-1)]
            count[expert] = xe.shape[0]
            gate_up[expert] = (xe**2).sum(0) / ids.shape[0]
            inner = act(xe @ w[expert, :half].t()) * (xe @ w[expert, half:].t())
            down[expert] = (inner**2).sum(0) / ids.shape[0]
        name = f"model.layers.{i}.mlp.experts"
        norms[f"{name}.gate_up_proj"], norms[f"{name}.down_proj"], tokens[name] = gate_up, down, count
    return norms, tokens


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_statistics_are_per_expert_from_routed_tokens(arch):
    lm = tiny_model(arch)
    ids = random_ids(4, 32)
    stats, _ = Pruner(lm).cached_statistics(ids)
    norms, tokens = _direct_expert_norms(lm, ids)
    assert set(stats.expert_tokens) == set(tokens)
    for name, count in tokens.items():
        assert torch.equal(stats.expert_tokens[name], count), name
        assert int(count.sum()) == ids.numel() * lm.model.config.num_experts_per_tok
    for key, direct in norms.items():
        module = key.rsplit(".", 1)[0]
        reached = tokens[module] > 0
        assert torch.allclose(stats.sq_norms[key][reached], direct[reached], rtol=1e-4, atol=1e-6), key
        assert (stats.sq_norms[key][~reached] == 1).all()  # unreached: magnitude scores


def test_unreached_experts_are_reported_and_pruned_by_magnitude():
    lm = tiny_model("mixtral")
    for layer in lm.model.model.layers:  # a router that always prefers experts 0 and 1
        layer.mlp.gate.weight.zero_()
    ids = random_ids(seed=11)  # ids no other test uses: the statistics' disk cache is keyed by them
    pruner = Pruner(lm)
    result = pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=ids)
    _, tokens = _direct_expert_norms(lm, ids)
    never = {name: (count == 0).nonzero().flatten().tolist() for name, count in tokens.items()}
    assert any(never.values())
    assert result.calibration["unreached_experts"] == {k: v for k, v in never.items() if v}
    # an unreached expert's rows lose their smallest-magnitude half, like any other row
    name, unreached = next(iter(result.calibration["unreached_experts"].items()))
    pruner.restore()
    dense = lm.model.get_parameter(f"{name}.down_proj")[unreached[0]].clone()
    pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=ids)
    pruned = lm.model.get_parameter(f"{name}.down_proj")[unreached[0]]
    k = dense.shape[1] // 2
    expected = dense.abs().argsort(dim=1, stable=True)[:, :k]
    assert (pruned.gather(1, expected) == 0).all() and (zeros_per_row(pruned) == k).all()
    sequential = pruner.prune(recipe("all=0.5", stats_mode="sequential"), ids=ids)
    assert sequential.calibration["unreached_experts"] == result.calibration["unreached_experts"]


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral", "qwen2_moe"])
def test_nm_structure_on_views_and_experts(arch):
    lm = tiny_model(arch)
    Pruner(lm).prune(recipe("all=0.5", structure="2:4"), ids=random_ids())
    for _, _, target in lm.roles.items():
        for view in target.views(lm.model):
            groups = (view == 0).reshape(-1, view.shape[-1] // 4, 4).sum(dim=2)
            assert (groups == 2).all()


def test_sequential_and_cached_agree_on_the_first_moe_layer():
    lm = tiny_model("qwen3_moe")
    pruner = Pruner(lm)
    ids = random_ids(4, 32)
    seq = pruner.prune(recipe("all=0.5", layers=[0, 1]), ids=ids).masks
    cached = pruner.prune(recipe("all=0.5", layers=[0, 1], stats_mode="cached"), ids=ids).masks
    assert seq.keys() == cached.keys() and all(torch.equal(seq[k], cached[k]) for k in seq)


def test_sparsegpt_refuses_experts_clearly():
    from prune.methods import METHODS

    if "sparsegpt" not in METHODS:
        pytest.skip("no sparsegpt method")
    lm = tiny_model("mixtral")
    with pytest.raises(RecipeError, match="mixture-of-experts"):
        Pruner(lm).prune(recipe("all=0.5", method="sparsegpt"), ids=random_ids())


def test_unknown_model_type_with_llama_names_prunes_with_a_note():
    from evaluation.lab import Lab

    lm = tiny_model("llama_named")
    assert lm.roles.model_type == "llama_named" and lm.roles.layers_path == "model.layers"
    assert "found by module names" in lm.roles.note and "llama_named" in lm.roles.note
    result = Pruner(lm).prune(recipe("all=0.5"), ids=random_ids())
    assert result.report.linear_sparsity == pytest.approx(0.5)
    assert Lab(lm).model_info()["roles_note"] == lm.roles.note


def test_real_llama_named_families_are_found_by_names():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from prune.roles import role_map

    small = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    small.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for cls in ("SmolLM3Config", "Olmo2Config", "GraniteConfig"):
        if not hasattr(tf, cls):
            continue
        model = AutoModelForCausalLM.from_config(getattr(tf, cls)(**small, num_key_value_heads=2))
        roles = role_map(model)
        assert roles.note and roles.num_layers == 2 and len(roles.roles) == 7, cls
