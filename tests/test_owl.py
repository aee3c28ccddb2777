"""OWL as a recipe option: the published mapping, its composition with per-role sparsities at the
exact pruned count, the pruner applying it, and the recipe, CLI and app settings that carry it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from tiny import random_ids, tiny_model

from prune import allocation as pa
from prune.recipe import Recipe, RecipeError, parse_sparsity
from runtime.pruner import Pruner
from runtime.stats import layer_outlier_ratios

RATIOS = [0.010, 0.012, 0.030, 0.008, 0.015, 0.011, 0.009, 0.020]


def owl_reference(ratios, sparsity, lam):
    """OWL's code (lib/prune_all.py), transcribed: layer densities, then sparsity = 1 - density."""
    all_layer_ratio = np.array(ratios)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lam * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity)
    return [1 - r for r in all_layer_ratio]


# ----- the published mapping -------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("lam", [0.05, 0.08])
def test_published_mapping_is_owls_code(target, lam):
    s = pa.owl_published(RATIOS, target, lam)
    assert s == pytest.approx(owl_reference(RATIOS, target, lam), abs=1e-12)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)  # mean S
    assert max(s) - min(s) == pytest.approx(2 * lam)  # the whole 2 lambda range is used
    assert all(target - 2 * lam - 1e-12 <= v <= target + 2 * lam + 1e-12 for v in s)
    order = sorted(range(len(RATIOS)), key=lambda i: RATIOS[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:], strict=False))  # more outliers, less pruned


def test_published_mapping_band_when_ratios_are_symmetric_and_equal_ratios():
    symmetric = [0.01, 0.02, 0.03, 0.04, 0.05]
    s = pa.owl_published(symmetric, 0.5, 0.08)
    assert all(0.5 - 0.08 - 1e-12 <= v <= 0.5 + 0.08 + 1e-12 for v in s)
    assert (s[0], s[-1]) == (pytest.approx(0.58), pytest.approx(0.42))
    assert pa.owl_published([0.02] * 4, 0.5) == [0.5] * 4
    # one layer far from the rest: the published mapping leaves [S - lam, S + lam] (by up to lam)
    lopsided = pa.owl_published([0.01, 0.01, 0.01, 0.05], 0.5, 0.08)
    assert lopsided[-1] == pytest.approx(0.5 - 0.12) and lopsided[0] == pytest.approx(0.5 + 0.04)


# ----- composed with per-role sparsities, at the exact count ---------------------------------------
SHAPE = {
    "q": (64, 64),
    "k": (32, 64),
    "v": (32, 64),
    "o": (64, 64),
    "gate": (96, 64),
    "up": (96, 64),
    "down": (64, 96),
}
LAYERS = 8


def shapes(layers: int = LAYERS) -> dict:
    return {(layer, r): rc for layer in range(layers) for r, rc in SHAPE.items()}


def pruned(table, shape=SHAPE) -> int:
    return sum(shape[r][0] * int(shape[r][1] * s) for row in table.values() for r, s in row.items())


def no_schedule(recipe: Recipe, layers: int = LAYERS) -> dict:
    return {layer: {r: recipe.sparsity_for(layer, r) for r in SHAPE} for layer in range(layers)}


@pytest.mark.parametrize("schedule", ["owl", "owl-band"])
@pytest.mark.parametrize("sparsity", ["all=0.5", "attn=0.3,mlp=0.6", "q=0.2,k=0.25,v=0.5,o=0.45,down=0.7"])
def test_schedule_keeps_the_pruned_count_with_per_role_sparsities(schedule, sparsity):
    recipe = Recipe(sparsity=parse_sparsity(sparsity), layer_schedule=schedule)
    table = pa.schedule_per_layer(recipe, RATIOS, shapes())
    count = pruned(no_schedule(recipe))
    assert 0 <= count - pruned(table) < 32  # within one row of the smallest matrix
    for layer, row in table.items():
        for role, s in row.items():
            asked = recipe.sparsity_for(layer, role)
            if asked == 0:
                assert s == 0  # a role the recipe leaves dense stays dense
            else:
                assert abs(s - asked) <= 0.16 + 2 / 64  # the layer's offset, then whole weights per row
    layer_s = [pruned({0: row}) for row in table.values()]
    assert layer_s[RATIOS.index(max(RATIOS))] == min(layer_s)  # most outliers: fewest pruned
    assert layer_s[RATIOS.index(min(RATIOS))] == max(layer_s)


def test_schedule_layer_range_explicit_layers_and_uniform():
    ratios = RATIOS
    recipe = Recipe(
        sparsity=parse_sparsity("all=0.5"),
        layers=(1, 7),
        per_layer={3: {"down": 0.9}},
        layer_schedule="owl",
    )
    table = pa.schedule_per_layer(recipe, ratios, shapes())
    assert sorted(table) == [1, 2, 4, 5, 6]  # pruned layers that per_layer does not name
    scheduled = {layer: {r: recipe.sparsity_for(layer, r) for r in SHAPE} for layer in table}
    assert 0 <= pruned(scheduled) - pruned(table) < 32
    assert (
        pa.schedule_per_layer(dataclasses.replace(recipe, layer_schedule="uniform"), ratios, shapes()) == {}
    )
    one = Recipe(sparsity=parse_sparsity("all=0.5"), layers=(2, 3), layer_schedule="owl")
    assert pa.schedule_per_layer(one, ratios, shapes()) == {}  # one layer: nothing to move


def test_band_variant_stays_in_band():
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"), layer_schedule="owl-band", owl_lambda=0.08)
    table = pa.schedule_per_layer(recipe, RATIOS, shapes())
    params = sum(r * c for r, c in SHAPE.values())
    for row in table.values():
        assert 0.5 - 0.08 - 0.02 <= pruned({0: row}) / params <= 0.5 + 0.08 + 0.02


# ----- the pruner applies it -----------------------------------------------------------------------
@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setattr("runtime.pruner.cache_dir", lambda *parts: tmp_path)


@pytest.mark.parametrize("stats_mode", ["cached", "sequential"])
def test_pruner_applies_owl_at_the_same_count(private_cache, stats_mode):
    ids = random_ids(4, 32)
    base = Recipe(model="llama", sparsity=parse_sparsity("attn=0.4,mlp=0.6"), stats_mode=stats_mode)
    pruner = Pruner(tiny_model("llama"))
    uniform = pruner.prune(base, ids=ids)
    owl = pruner.prune(dataclasses.replace(base, layer_schedule="owl", owl_lambda=0.1), ids=ids)
    assert 0 <= uniform.report.pruned - owl.report.pruned < 32  # tiny llama's k and v have 32 rows
    assert owl.report.pruned_per_layer != uniform.report.pruned_per_layer  # layers now differ
    assert sorted(owl.recipe.per_layer) == [0, 1, 2]  # the effective recipe the masks follow
    for layer, row in enumerate(owl.report.per_layer):
        for role, achieved in row.items():
            assert achieved == pytest.approx(owl.recipe.sparsity_for(layer, role), abs=1e-6)
    requested = {r: rr.requested for r, rr in owl.report.roles.items()}
    assert requested != {r: rr.requested for r, rr in uniform.report.roles.items()}
    assert "schedule_s" in owl.timings
    if stats_mode == "sequential":
        assert (
            owl.calibration_passes == 2
        )  # the dense pass for the ratios (OWL's too), then the sequential one
    else:
        assert owl.calibration_passes == 0  # the cached dense pass serves the ratios and the masks
    again = pruner.prune(owl.recipe, ids=ids)  # the effective recipe reproduces the masks
    assert all((again.masks[k] == owl.masks[k]).all() for k in owl.masks)
    pruner.restore()


def test_pruner_owl_ratios_are_the_allocators(private_cache):
    lm = tiny_model("llama")
    pruner = Pruner(lm)
    ids = random_ids(4, 32)
    stats, _ = pruner.cached_statistics(ids)
    ratios = layer_outlier_ratios(lm, stats, 5.0)
    assert len(ratios) == 3 and all(0.0 <= r < 0.2 for r in ratios)
    recipe = Recipe(
        model="llama", sparsity=parse_sparsity("all=0.5"), stats_mode="cached", layer_schedule="owl"
    )
    result = pruner.prune(recipe, ids=ids)
    assert result.recipe.per_layer == pa.schedule_per_layer(
        recipe, ratios, {(i, r): tuple(t.weight(lm.model).shape) for i, r, t in lm.roles.items()}
    )
    pruner.restore()


# ----- the recipe, the command line, the app ---------------------------------------------------------
def test_recipe_round_trips_the_schedule(tmp_path):
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"), layer_schedule="owl", owl_m=7, owl_lambda=0.1)
    assert (recipe.owl_m, recipe.owl_lambda) == (7.0, 0.1) and isinstance(recipe.owl_m, float)
    data = recipe.to_dict()
    assert (data["layer_schedule"], data["owl_m"], data["owl_lambda"]) == ("owl", 7.0, 0.1)
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    for suffix in (".json", ".yaml"):
        recipe.save(tmp_path / f"r{suffix}")
        assert Recipe.load(tmp_path / f"r{suffix}") == recipe
    assert Recipe().layer_schedule == "uniform" and Recipe().owl_m == 5.0 and Recipe().owl_lambda == 0.08


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"layer_schedule": "owls"}, "unknown layer schedule 'owls'"),
        ({"owl_lambda": -0.01}, "owl_lambda must be a number in"),
        ({"owl_lambda": 0.7}, "owl_lambda must be a number in"),
        ({"owl_m": 0}, "owl_m must be a number above 0"),
        ({"owl_m": -1.0}, "owl_m must be a number above 0"),
        ({"owl_m": "5"}, "owl_m must be a number"),
        ({"layer_schedule": "owl", "structure": "2:4"}, "is for unstructured sparsity"),
        ({"layer_schedule": "owl-band", "structure": "4:8"}, "is for unstructured sparsity"),
    ],
)
def test_bad_schedules_are_recipe_errors(fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(sparsity=parse_sparsity("all=0.5"), **fields)
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"sparsity": {"all": 0.5}, **fields})


def test_cli_flags_reach_the_recipe():
    from cli.run import build_recipe, parser

    args = parser().parse_args(["--layer-schedule", "owl", "--owl-m", "4", "--owl-lambda", "0.1"])
    recipe = build_recipe(args)
    assert (recipe.layer_schedule, recipe.owl_m, recipe.owl_lambda) == ("owl", 4.0, 0.1)
    assert build_recipe(parser().parse_args([])).layer_schedule == "uniform"
    with pytest.raises(RecipeError, match="is for unstructured"):
        build_recipe(parser().parse_args(["--layer-schedule", "owl-band", "--structure", "2:4"]))


def test_app_controls_reach_the_recipe():
    from ui.recipes import Controls, ModelShape, build_recipe, readout, recipe_summary

    shape = ModelShape("llama", ("q", "k", "v", "o", "gate", "up", "down"), 3, dict.fromkeys(SHAPE, 4096))
    recipe = build_recipe(Controls(layer_schedule="owl", owl_m=6, owl_lambda=0.05), shape)
    assert (recipe.layer_schedule, recipe.owl_m, recipe.owl_lambda) == ("owl", 6.0, 0.05)
    assert "Layer schedule owl" in readout(recipe, shape, 10**6)
    assert "owl (M 6, λ 0.05)" in recipe_summary(recipe)
    assert build_recipe(Controls(), shape).layer_schedule == "uniform"  # the /prune API without them
    with pytest.raises(RecipeError, match="owl_lambda"):
        build_recipe(Controls(layer_schedule="owl", owl_lambda=-1), shape)
