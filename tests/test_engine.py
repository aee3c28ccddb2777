"""The engine on tiny random-weight models of every supported family."""

import dataclasses
import json

import pytest
import torch
from tiny import ARCHS, NO_GATE, random_ids, tiny_model

from prune.errors import LabError
from prune.recipe import CalibrationSpec, Recipe, RecipeError, parse_sparsity
from prune.roles import ROLES, UnsupportedArchitecture, role_map
from prune.state import PrunedState
from runtime.models import ModelLoadError, load
from runtime.pruner import Pruner


def recipe(sparsity: str, **kwargs) -> Recipe:
    return Recipe(model="tiny", sparsity=parse_sparsity(sparsity), **kwargs)


def zeros_per_row(weight: torch.Tensor) -> torch.Tensor:
    return (weight == 0).sum(dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_role_map_covers_every_matrix_once(arch):
    lm = tiny_model(arch)
    roles = lm.roles
    expected = ROLES if arch not in NO_GATE else ("q", "k", "v", "o", "up", "down")
    assert roles.roles == expected
    # every role's rows together cover each role-holding matrix exactly once
    covered: dict[str, int] = {}
    for _, _, t in roles.items():
        for part, view in zip(t.pieces(), t.views(lm.model), strict=True):
            covered[part.name] = covered.get(part.name, 0) + view.numel()
    for name, count in covered.items():
        assert count == lm.model.get_parameter(name).numel(), name
    assert sum(roles.param_counts(lm.model).values()) == sum(covered.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_per_role_sparsity_is_exact_and_reversible(arch):
    lm = tiny_model(arch)
    pruner = Pruner(lm)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    asked = {"q": 0.25, "k": 0.5, "v": 0.75, "o": 0.0, "up": 0.5, "down": 0.6}
    if "gate" in lm.roles.roles:
        asked["gate"] = 0.4
    result = pruner.prune(Recipe(model=arch, sparsity=asked), ids=random_ids())
    pruned = dict.fromkeys(lm.roles.roles, 0)
    for layer, role, target in lm.roles.items():
        for view in target.views(lm.model):  # (rows, in), or (heads | experts, rows, in) views
            weight = view.reshape(-1, view.shape[-1])
            want = int(weight.shape[1] * asked[role])
            assert (zeros_per_row(weight) == want).all(), (arch, layer, role)
            pruned[role] += want * weight.shape[0]
    for role, count in lm.roles.param_counts(lm.model).items():
        assert result.report.roles[role].sparsity == pytest.approx(pruned[role] / count)
        assert result.report.roles[role].requested == pytest.approx(asked[role])
    o_name = lm.roles.targets[(0, "o")].module + ".weight"
    assert torch.equal(dict(lm.model.named_parameters())[o_name], dense[o_name])  # o=0 stays dense
    pruner.restore()
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, dense[name]), name


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_fused_matrices_keep_each_roles_own_sparsity(arch):
    lm = tiny_model(arch)
    Pruner(lm).prune(recipe("q=0.25,k=0.5,v=0.0"), ids=random_ids())
    fused = lm.roles.targets[(0, "q")]
    full = lm.model.get_submodule(fused.module).weight
    full = full.t() if fused.transposed else full  # GPT-2's Conv1D stores (in, out)
    q_rows, k_rows, v_rows = (lm.roles.targets[(0, r)].rows for r in ("q", "k", "v"))
    assert (zeros_per_row(full[q_rows[0] : q_rows[1]]) == full.shape[1] // 4).all()
    assert (zeros_per_row(full[k_rows[0] : k_rows[1]]) == full.shape[1] // 2).all()
    assert (zeros_per_row(full[v_rows[0] : v_rows[1]]) == 0).all()


def test_conv1d_statistics_follow_the_input_dimension():
    lm = tiny_model("gpt2")
    stats, _ = Pruner(lm).cached_statistics(random_ids())
    up = lm.roles.targets[(0, "up")]
    down = lm.roles.targets[(0, "down")]
    assert stats.sq_norms[up.module].shape == (64,)  # c_fc: 64 -> 256
    assert stats.sq_norms[down.module].shape == (256,)  # c_proj: 256 -> 64


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt"])
@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_nm_structure_is_exact(arch, structure):
    n, m = (int(x) for x in structure.split(":"))
    lm = tiny_model(arch)
    Pruner(lm).prune(recipe("all=0.5", structure=structure), ids=random_ids())
    for _, _, target in lm.roles.items():
        weight = target.weight(lm.model)
        groups = (weight == 0).reshape(weight.shape[0], -1, m).sum(dim=2)
        assert (groups == n).all()


def test_cached_and_sequential_agree_on_the_first_layer_and_differ_later():
    lm = tiny_model("llama")
    pruner = Pruner(lm)
    ids = random_ids(8, 32)
    first = {"layers": [0, 1]}
    seq = pruner.prune(recipe("all=0.5", stats_mode="sequential", **first), ids=ids).masks
    cached = pruner.prune(recipe("all=0.5", stats_mode="cached", **first), ids=ids).masks
    assert seq.keys() == cached.keys() and all(torch.equal(seq[k], cached[k]) for k in seq)
    seq = pruner.prune(recipe("all=0.5", stats_mode="sequential"), ids=ids).masks
    cached = pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=ids).masks
    assert all(torch.equal(seq[(0, r)], cached[(0, r)]) for r in ROLES)
    assert not all(torch.equal(seq[(2, r)], cached[(2, r)]) for r in ROLES)  # pruned inputs matter


def test_sequential_masks_do_not_depend_on_batch_size():
    lm = tiny_model("qwen2")
    ids = random_ids(6, 32)
    one = Pruner(lm, batch_size=1).prune(recipe("all=0.5"), ids=ids).masks
    Pruner(lm).restore()
    lm2 = tiny_model("qwen2")
    three = Pruner(lm2, batch_size=3).prune(recipe("all=0.5"), ids=ids).masks
    same = sum(int((one[k] == three[k]).sum()) for k in one)
    total = sum(one[k].numel() for k in one)
    assert same / total > 0.999


def test_cached_reprune_needs_no_calibration_pass():
    lm = tiny_model("llama")
    pruner = Pruner(lm)
    ids = random_ids()
    first = pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=ids)
    second = pruner.prune(recipe("attn=0.2,mlp=0.7", stats_mode="cached"), ids=ids)
    assert first.calibration_passes + second.calibration_passes <= 1
    assert second.calibration_passes == 0 and second.stats_source == "cached: memory"
    assert second.report.roles["q"].sparsity == pytest.approx(int(64 * 0.2) / 64)
    assert second.report.roles["down"].sparsity == pytest.approx(int(96 * 0.7) / 96)


def test_layer_range_and_per_layer_overrides():
    lm = tiny_model("llama")
    r = recipe("all=0.5", layers=[1, 3], per_layer={2: {"q": 0.75}})
    result = Pruner(lm).prune(r, ids=random_ids())
    per_layer = result.report.per_layer
    assert all(v == 0 for v in per_layer[0].values())
    assert per_layer[1]["q"] == 0.5 and per_layer[2]["q"] == 0.75 and per_layer[2]["k"] == 0.5


def test_magnitude_needs_no_calibration():
    lm = tiny_model("opt")
    result = Pruner(lm).prune(recipe("all=0.5", method="magnitude"))
    assert result.stats_source == "none" and result.calibration_passes == 0
    assert result.report.linear_sparsity == pytest.approx(0.5, abs=0.01)


def test_report_counts():
    lm = tiny_model("llama")
    result = Pruner(lm).prune(recipe("all=0.5"), ids=random_ids())
    report = result.report
    assert report.pruned == sum(int((t.weight(lm.model) == 0).sum()) for _, _, t in lm.roles.items())
    assert report.linear_sparsity == pytest.approx(0.5)
    assert report.total_params == sum(p.numel() for p in lm.model.parameters())
    assert report.total_sparsity == pytest.approx(report.pruned / report.total_params)
    assert sum(report.pruned_per_layer) == report.pruned


# ----- recipes and bad input --------------------------------------------------------------------
def test_recipe_round_trips_through_json_and_yaml(tmp_path):
    r = Recipe(
        sparsity=parse_sparsity("attn=0.3,down=0.6"),
        structure="2:4",
        layers=[0, 10],
        per_layer={3: {"q": 0.1}},
        calibration=CalibrationSpec(source="generated", nsamples=4),
    )
    for name in ("r.json", "r.yaml"):
        r.save(tmp_path / name)
        assert Recipe.load(tmp_path / name) == r
    assert json.loads(r.to_json())["sparsity"] == {"attn": 0.3, "down": 0.6}
    assert [r.sparsity_for(0, x) for x in ROLES] == [0.3, 0.3, 0.3, 0.3, 0.0, 0.0, 0.6]
    assert r.realised_sparsity(0, "q") == 0.5 and r.realised_sparsity(0, "gate") == 0.0  # 2:4


def test_recipes_are_frozen_values():
    r = Recipe(sparsity=parse_sparsity("all=0.5"), layers=[0, 10])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.method = "magnitude"
    with pytest.raises(TypeError, match="frozen"):
        r.sparsity["q"] = 0.9
    with pytest.raises(TypeError, match="frozen"):
        r.per_layer.update({1: {"q": 0.1}})
    changed = dataclasses.replace(r, sparsity={"q": 0.25})
    assert r.sparsity == {"all": 0.5} and changed.sparsity == {"q": 0.25} and changed.layers == (0, 10)
    with pytest.raises(RecipeError, match=r"\[0, 1\]"):
        dataclasses.replace(r, sparsity={"q": 1.5})  # replace validates too


def test_a_role_beats_its_group_and_all():
    r = Recipe(
        sparsity=parse_sparsity("all=0.5,mlp=0.6,down=0.7,attention=0.2"), per_layer={1: {"attn": 0.9}}
    )
    assert [r.sparsity_for(0, x) for x in ROLES] == [0.2, 0.2, 0.2, 0.2, 0.6, 0.6, 0.7]
    assert [r.sparsity_for(1, x) for x in ROLES] == [0.9, 0.9, 0.9, 0.9, 0.6, 0.6, 0.7]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: parse_sparsity("q=1.5"), r"\[0, 1\]"),
        (lambda: parse_sparsity("q=-0.1"), r"\[0, 1\]"),
        (lambda: parse_sparsity("qq=0.5"), "unknown role 'qq'"),
        (lambda: parse_sparsity("q0.5"), "role=fraction"),
        (lambda: Recipe(structure="4:4"), "0 < N < M"),
        (lambda: Recipe(structure="5:4"), "0 < N < M"),
        (lambda: Recipe(structure="two:four"), "N:M"),
        (lambda: Recipe(method="obc"), "unknown method"),
        (lambda: Recipe(layers=[5, 2]), "layers"),
        (lambda: Recipe(method="magnitude", use_variant=True), "use_variant"),
        (lambda: Recipe.from_dict({"modle": "x"}), "unknown recipe fields: modle"),
        (lambda: Recipe.from_dict({"sparsity": {"q": 2}}), r"\[0, 1\]"),
        (lambda: Recipe.from_dict({"calibration": {"nsamples": 0}}), "nsamples"),
        (lambda: Recipe.from_dict({"calibration": {"nsamples": "many"}}), "nsamples"),
        (lambda: Recipe.from_dict({"evaluation": {"seqlen": 1}}), "seqlen"),
        (lambda: Recipe.from_dict({"calibration": [1, 2]}), "mapping"),
        (lambda: Recipe.from_dict({"per_layer": {"x": {"q": 0.1}}}), "layer numbers"),
    ],
)
def test_bad_recipes_get_clear_errors(make, message):
    with pytest.raises(RecipeError, match=message):
        make()


def test_roles_the_model_lacks_are_refused():
    lm = tiny_model("phi")
    with pytest.raises(RecipeError, match="no gate role"):
        Pruner(lm).prune(recipe("gate=0.5"), ids=random_ids())


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitecture, match="supported: .*llama"):
        role_map(model)


def test_unknown_model_id_gets_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model"):
        load(str(tmp_path / "no-such-model"))


def test_a_failure_while_applying_masks_leaves_the_dense_weights_bitwise(monkeypatch):

    lm = tiny_model("llama")
    pruner = Pruner(lm)
    dense = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    state = pruner.prune(recipe("all=0.5", stats_mode="cached"), ids=random_ids()).state
    masks = state.masks
    pruner.restore()
    calls = {"n": 0}
    real = torch.Tensor.masked_fill_

    def fail_halfway(weight, mask, value):
        calls["n"] += 1
        if calls["n"] > len(masks) // 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(weight, mask, value)

    monkeypatch.setattr(torch.Tensor, "masked_fill_", fail_halfway)
    with pytest.raises(torch.OutOfMemoryError):
        pruner.apply(state)
    monkeypatch.undo()
    assert calls["n"] > 1 and pruner.masks == {}
    for name, param in lm.model.named_parameters():
        assert torch.equal(param, dense[name]), name


def test_the_method_table_drives_validation_and_masks():
    from prune.methods import METHODS, method_mask

    assert list(METHODS) == ["wanda", "magnitude", "magnitude-row", "ria", "ria-row", "sparsegpt"]
    assert METHODS["sparsegpt"].changes_weights and METHODS["sparsegpt"].statistics == "hessian"
    assert METHODS["wanda"].needs_statistics and not METHODS["magnitude"].needs_statistics
    assert not METHODS["magnitude"].per_row and METHODS["magnitude-row"].per_row
    for name, spec in METHODS.items():
        assert Recipe(method=name).method_spec is spec and Recipe(method=name).needs_statistics == (
            spec.statistics is not None
        )
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    assert method_mask(METHODS["magnitude-row"], weight, None, 0.5).tolist() == [[True, True, False, False]]


def test_lab_switches_states_temporarily_or_by_key():
    from evaluation.lab import Lab

    lm = tiny_model("llama")
    lab = Lab(lm)
    q = lm.roles.targets[(0, "q")]
    dense_q = q.weight(lm.model).clone()
    alice = lab.prune(
        Recipe(model="llama", sparsity={"all": 0.5}, stats_mode="cached"), ids=random_ids(), key="alice"
    ).state
    assert lab.holds("alice") and not lab.holds("bob") and alice.key == "alice"
    with lab.dense() as model:  # temporary: the pruned state comes back after the block
        assert torch.equal(q.weight(model), dense_q)
    assert lab.state is alice and lab.holds("alice")
    bob = PrunedState({key: torch.zeros_like(mask) for key, mask in alice.masks.items()}, key="bob")
    with lab.using(bob):  # a named state stays after the block
        assert torch.equal(q.weight(lm.model), dense_q)
    assert lab.holds("bob") and lab.state is bob
    with lab.using(PrunedState(key="bob")):  # already held: nothing is copied, whatever masks are passed
        assert lab.state is bob
    with pytest.raises(RecipeError, match="lab has 'llama' loaded"):
        lab.prune(Recipe(model="other", sparsity={"all": 0.5}))
    lab.restore()
    assert lab.masks == {} and torch.equal(q.weight(lm.model), dense_q)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_a_sparsegpt_state_comes_back_bitwise_whole_or_compact_after_another_state(tmp_path):
    from tiny import save_tiny_chat_model

    from evaluation.lab import Lab

    lm = load(str(save_tiny_chat_model(tmp_path / "chat")), device="cpu")  # a tokenizer: calibration text
    lab = Lab(lm)
    dense = _weights(lm.model)
    calibration = CalibrationSpec(source="generated", nsamples=4, seqlen=32)
    kwargs = dict(model=lm.name, method="sparsegpt", calibration=calibration)
    sparsegpt = Recipe(sparsity={"all": 0.5}, **kwargs)
    alice = lab.prune(sparsegpt, key="alice").state
    after_alice = _weights(lm.model)
    # the values matter: the dense weights with alice's masks applied are not her weights
    q = lm.roles.targets[(0, "q")]
    name = q.module + ".weight"
    masked_only = dense[name].masked_fill(alice.masks[(0, "q")].reshape(dense[name].shape), 0)
    assert not torch.equal(masked_only, after_alice[name])

    wanda = Recipe(model=lm.name, sparsity={"all": 0.3}, method="wanda", calibration=calibration)
    lab.prune(wanda, key="bob")
    after_bob = _weights(lm.model)
    assert not torch.equal(after_bob[name], after_alice[name])

    with lab.using(PrunedState(alice.masks, alice.values, alice.recipe)) as model:  # whole, temporary
        assert _same(_weights(model), after_alice)
    assert _same(_weights(lm.model), after_bob) and lab.holds("bob")

    compact = PrunedState({k: m.clone() for k, m in alice.masks.items()}, {}, alice.recipe, "alice")
    assert compact.is_compact
    with lab.using(compact) as model:  # the values are solved again from the recipe, bitwise the same
        assert _same(_weights(model), after_alice)
    assert lab.holds("alice") and _same(_weights(lm.model), after_alice)  # a named state stays

    lab.prune(wanda, key="bob")
    wrong = PrunedState({k: ~m for k, m in alice.masks.items()}, {}, alice.recipe, "carol")
    with pytest.raises(LabError, match="no longer follows from its recipe"):
        with lab.using(wrong):
            pass
    assert lab.state.is_dense and _same(_weights(lm.model), dense)  # the failed switch left it dense
