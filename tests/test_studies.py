"""Sensitivity studies, OWL and the allocator: synthetic unit tests, and a small study on the real model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from evaluation import allocate as al
from evaluation import studies
from prune import allocation as pa
from prune.recipe import CalibrationSpec, Recipe

PARAMS = {"q": 100, "k": 40, "v": 40, "o": 100, "gate": 300, "up": 300, "down": 300}
CURVATURE = {"q": 1.0, "k": 0.5, "v": 4.0, "o": 2.0, "gate": 1.5, "up": 1.5, "down": 6.0}


def quadratic_curves(step: float = 0.02) -> dict[str, pa.Curve]:
    rates = [round(i * step, 6) for i in range(int(1 / step) + 1)]
    return {r: [(s, a * s * s) for s in rates] for r, a in CURVATURE.items()}


# ----- the greedy allocator ------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.5, 0.6])
def test_greedy_meets_the_budget_exactly_and_matches_the_optimum(target):
    s = pa.greedy_allocation(quadratic_curves(), PARAMS, target, bounds=(0.0, 1.0))
    total = sum(PARAMS.values())
    assert sum(PARAMS[r] * s[r] for r in PARAMS) == pytest.approx(target * total, rel=1e-12)
    # min sum a_r s_r^2 subject to sum p_r s_r = B: s_r = B (p_r / a_r) / sum(p^2 / a)
    scale = target * total / sum(PARAMS[r] ** 2 / CURVATURE[r] for r in PARAMS)
    for role in PARAMS:
        optimum = scale * PARAMS[role] / CURVATURE[role]
        assert s[role] == pytest.approx(optimum, abs=0.03), role


def test_greedy_prunes_the_cheaper_of_two_equal_roles_more():
    params = {"a": 1000, "b": 1000}
    curves = {"a": [(0.0, 0.0), (1.0, 1.0)], "b": [(0.0, 0.0), (0.5, 0.0), (1.0, 5.0)]}
    s = pa.greedy_allocation(curves, params, 0.5, bounds=(0.0, 1.0))
    assert s["b"] == pytest.approx(0.5, abs=1e-9)  # b is free up to 50%, costly after
    assert s["a"] == pytest.approx(0.5, abs=1e-9)
    s = pa.greedy_allocation(curves, params, 0.3, bounds=(0.0, 1.0))
    assert s["b"] == pytest.approx(0.5, abs=1e-9) and s["a"] == pytest.approx(0.1, abs=1e-9)


def test_greedy_respects_bounds():
    s = pa.greedy_allocation(quadratic_curves(), PARAMS, 0.5, bounds=(0.2, 0.7))
    assert all(0.2 - 1e-12 <= v <= 0.7 + 1e-12 for v in s.values())
    assert sum(PARAMS[r] * s[r] for r in PARAMS) == pytest.approx(0.5 * sum(PARAMS.values()), rel=1e-12)
    assert s["gate"] == pytest.approx(0.7) and s["up"] == pytest.approx(0.7)  # capped at the bound
    assert s["v"] == pytest.approx(0.2)  # the most costly role stays at the lower bound
    per_role = {r: (0.0, 0.4) if r == "k" else (0.1, 0.9) for r in PARAMS}
    s = pa.greedy_allocation(quadratic_curves(), PARAMS, 0.5, bounds=per_role)
    assert s["k"] <= 0.4 + 1e-12 and min(v for r, v in s.items() if r != "k") >= 0.1 - 1e-12


def test_greedy_looks_past_a_bump_and_rejects_impossible_budgets():
    params = {"a": 100, "b": 100}
    bumpy = {"a": [(0.0, 0.0), (0.1, 0.5), (0.9, 0.6), (1.0, 9.0)], "b": [(0.0, 0.0), (1.0, 2.0)]}
    s = pa.greedy_allocation(bumpy, params, 0.45, bounds=(0.0, 1.0))
    assert s["a"] == pytest.approx(0.9, abs=1e-9)  # after the bump, a is nearly free up to 90%
    with pytest.raises(pa.AllocationError, match="outside what the bounds allow"):
        pa.greedy_allocation(bumpy, params, 0.95, bounds=(0.0, 0.9))


def test_curves_are_made_monotone_and_interpolated():
    curve = pa._monotone([(0.0, 0.0), (0.1, 0.05), (0.2, 0.01), (0.3, 0.2)])
    assert [c for _, c in curve] == [0.0, 0.05, 0.05, 0.2]
    assert pa.cost_at(curve, 0.25) == pytest.approx(0.125)
    assert pa.cost_at(curve, 2.0) == 0.2


def test_curves_from_points_and_the_refinement_line():
    rows = [("a", 0.0, 10.0), ("a", 0.5, 12.0), ("a", 0.3, 12.5), ("b", 0.9, 20.0), ("a", 0.5, 11.0)]
    points = [SimpleNamespace(series=s, rate=r, perplexity=p, dense_perplexity=10.0) for s, r, p in rows]
    curves = pa.curves_from_points(points)
    assert curves["a"] == [
        (0.0, 0.0),
        (0.3, math.log(1.25)),
        (0.5, math.log(1.25)),
    ]  # last 0.5 kept, monotone
    assert curves["b"] == [(0.0, 0.0), (0.9, math.log(2.0))]
    shape = {"a": (64, 128), "b": (32, 128)}
    plan = pa.greedy_plan(curves, shape, 3, 0.4, bounds=(0.0, 0.9))
    assert plan.high == 0.5  # curve "a" stops at 50%
    line = dict(plan.line((0.5, 1.0, 1.5)))
    assert list(line) == [0.0, 0.5, 1.0]  # alpha 1.5 pushes a role past the bound
    assert line[0.0] == pa.per_role_allocation({"a": 0.4, "b": 0.4}, shape, 3, plan.count, 0.5)
    for sparsity in line.values():
        pruned = sum(3 * shape[r][0] * int(shape[r][1] * s) for r, s in sparsity.items())
        assert 0 <= plan.count - pruned < 3 * 32
    with pytest.raises(pa.AllocationError, match="no sensitivity curve for c"):
        pa.greedy_plan(curves, {**shape, "c": (8, 8)}, 3, 0.4)


# ----- OWL -----------------------------------------------------------------------------------------
RATIOS = [0.010, 0.012, 0.030, 0.008, 0.015, 0.011, 0.009, 0.020]


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_owl_preserves_the_mean_stays_in_band_and_is_monotone(target):
    s = pa.owl_sparsities(RATIOS, target, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert all(target - 0.08 - 1e-12 <= v <= target + 0.08 + 1e-12 for v in s)
    assert max(abs(v - target) for v in s) == pytest.approx(0.08)  # the band is used
    order = sorted(range(len(RATIOS)), key=lambda i: RATIOS[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:], strict=False))  # more outliers, less pruning
    assert s[RATIOS.index(max(RATIOS))] == pytest.approx(target - 0.08)


def test_owl_weighted_mean_equal_ratios_and_edges():
    weights = [1, 2, 3, 4, 1, 2, 3, 4]
    s = pa.owl_sparsities(RATIOS, 0.5, 0.08, weights)
    assert sum(v * w for v, w in zip(s, weights, strict=True)) / sum(weights) == pytest.approx(0.5, abs=1e-12)
    assert pa.owl_sparsities([0.02] * 4, 0.5) == [0.5] * 4
    low = pa.owl_sparsities(RATIOS, 0.03, 0.08)  # the band shrinks so no layer goes below 0
    assert min(low) >= 0.0 and sum(low) / len(low) == pytest.approx(0.03)


def test_the_comparisons_owl_rows_are_recipes_with_owls_published_schedule(monkeypatch):
    allocator = pa.Allocation("allocator", 0.5, {"q": 0.7, "down": 0.4}, alpha=1.0)
    monkeypatch.setattr(al, "allocate", lambda *args, **kwargs: allocator)
    base = Recipe(stats_mode="cached", owl_m=6.0, owl_lambda=0.1)
    rows = al._allocations(None, 0.5, None, (0.0, 0.9), None, base, print)
    assert [a.method for a in rows] == ["uniform", "owl", "allocator", "allocator+owl"]
    recipes = [a.recipe(base) for a in rows]
    assert [r.layer_schedule for r in recipes] == ["uniform", "owl", "uniform", "owl"]
    assert recipes[1].sparsity == {"all": 0.5} and recipes[1].per_layer == {}  # the pruner adds OWL
    assert recipes[3].sparsity == {"q": 0.7, "down": 0.4} and rows[3].alpha == 1.0
    assert (recipes[1].owl_m, recipes[1].owl_lambda) == (6.0, 0.1)


# ----- rounding to one count ------------------------------------------------------------------------
def test_rounding_hits_the_count_with_whole_weights_per_row():
    cells = [
        pa.Cell(("q",), 576, 576, 30, 0.37),
        pa.Cell(("k",), 192, 576, 30, 0.81),
        pa.Cell(("down",), 576, 1536, 30, 0.55),
    ]
    count = 30 * (576 * 200 + 192 * 470 + 576 * 850)
    s = pa.round_to_count(cells, count)
    pruned = sum(c.rows * c.copies * int(c.cols * s[c.key]) for c in cells)
    assert 0 <= count - pruned < 192 * 30
    assert all(abs(c.cols * s[c.key] - round(c.cols * s[c.key])) < 1e-5 for c in cells)


# ----- study specs ---------------------------------------------------------------------------------
def test_downstream_specs_match_pruned_weights():
    specs = studies.downstream_specs([0.1, 0.3], PARAMS)
    total = sum(PARAMS.values())
    attention = sum(PARAMS[r] for r in ("q", "k", "v", "o"))
    for spec in specs:
        size = {"attention": attention, "mlp": total - attention, "uniform": total}[spec.series]
        assert spec.rate * size == pytest.approx(spec.budget * total, rel=1e-5)
    assert {s.series for s in specs if s.budget == 0.3} == {"mlp", "uniform"}  # attention holds 25%


def synthetic_study(method: str, perplexities: dict[str, list[tuple[float, float]]]) -> studies.StudyResult:
    """A single study's result without a model: series -> [(rate, perplexity)], dense perplexity 10."""
    settings = studies.StudySettings("single", windows=2, eval_seqlen=128, method=method)
    points = [
        studies.StudyPoint(
            series=name,
            rate=rate,
            budget=None,
            pruned=int(1000 * rate),
            linear_params=1000,
            total_params=2000,
            linear_sparsity=rate,
            total_sparsity=rate / 2,
            perplexity=ppl,
            dense_perplexity=10.0,
            dataset="wikitext2",
            windows=2,
            eval_seqlen=128,
            prune_s=0.0,
            eval_s=0.0,
            stats_source="cached: memory",
            sparsity={name: rate},
            recipe={},
        )  # fmt: skip
        for name, rows in perplexities.items()
        for rate, ppl in rows
    ]
    return studies.StudyResult(settings, {"name": "tiny"}, points)


def test_threshold_search_when_no_point_is_within_it():
    result = synthetic_study("wanda", {"k": [(0.5, 12.0), (0.9, 25.0)], "down": [(0.5, 30.0), (0.9, 90.0)]})
    summary = studies.summary_markdown(result)
    assert "- k: 50% (500 weights, 50.0% of role weights)" in summary  # 12 <= 2 x 10; 25 is not
    assert "- down: none of the measured rates" in summary  # 30 > 2 x 10 already at 50%


def test_plot_titles_name_the_method_used():
    from evaluation import plots

    for method, words in (("sparsegpt", "SparseGPT, cached statistics"), ("magnitude", "Magnitude)")):
        result = synthetic_study(method, {"k": [(0.5, 12.0)]})
        figure = plots.figure_rate_vs_perplexity(result)
        title = figure._suptitle.get_text()
        plots.plt.close(figure)
        assert words in title and "Wanda" not in title, title


# ----- the real model ------------------------------------------------------------------------------
CAL = CalibrationSpec(source="c4", nsamples=4, seqlen=128, seed=1234)


@pytest.fixture(scope="module")
def lab(smollm2, tmp_path_factory):
    """A fresh Lab (its own pruner: calibration passes count from zero) with statistics saved in a
    temporary folder, so the pass is really computed here and not read from an earlier run."""
    from evaluation.lab import Lab

    folder = tmp_path_factory.mktemp("stats")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("runtime.pruner.cache_dir", lambda *parts: folder)
        lab = Lab(smollm2)
        yield lab
        lab.restore()


@pytest.fixture(scope="module")
def small_study(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    seen = []
    result = studies.run_study(
        lab, "single", [0.0, 0.5, 0.9], 2, out, on_point=lambda p, r: seen.append(p.key),
        roles=["k", "down"], eval_seqlen=128, calibration=CAL,
    )  # fmt: skip
    return result, out, seen


@pytest.mark.model
def test_one_calibration_pass_for_the_whole_study(small_study, lab):
    result, _, seen = small_study
    assert result.calibration_passes == 1
    assert seen == ["k@0", "k@0.5", "k@0.9", "down@0", "down@0.5", "down@0.9"]
    sources = [p.stats_source for p in result.points if p.rate > 0]
    assert sources == ["cached: computed", "cached: memory", "cached: memory", "cached: memory"]
    assert all(p.recipe["stats_mode"] == "cached" for p in result.points)
    assert lab.masks == {}  # the model is dense again


@pytest.mark.model
def test_pruned_counts_are_role_params_times_rate(small_study, smollm2):
    result, _, _ = small_study
    roles = smollm2.roles
    params = roles.param_counts(smollm2.model)
    for p in result.points:
        rows, cols = roles.targets[(0, p.series)].weight(smollm2.model).shape
        assert p.pruned == roles.num_layers * rows * int(cols * p.rate)
        assert abs(p.pruned - params[p.series] * p.rate) < roles.num_layers * rows
        assert p.linear_sparsity == pytest.approx(p.pruned / p.linear_params)
        assert p.total_sparsity == pytest.approx(p.pruned / p.total_params)
    assert params["k"] == 30 * 192 * 576 and params["down"] == 30 * 576 * 1536


@pytest.mark.model
def test_perplexity_grows_with_rate(small_study):
    result, _, _ = small_study
    for role, rows in result.series().items():
        ppl = [p.perplexity for p in rows]
        assert ppl[0] == pytest.approx(rows[0].dense_perplexity)
        assert ppl[0] < ppl[1] < ppl[2], (role, ppl)
        assert all(p.windows == 2 and p.eval_seqlen == 128 for p in rows)
    assert result.series()["down"][2].perplexity > 2 * result.series()["k"][2].perplexity


@pytest.mark.model
def test_files_are_written(small_study):
    result, out, _ = small_study
    lines = (out / "points.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("series,rate,budget,pruned")
    data = json.loads((out / "points.json").read_text())
    assert len(data["points"]) == 6 and data["points"][1]["recipe"]["sparsity"] == {"k": 0.5}
    for name in ("rate_vs_ppl.png", "weights_vs_ppl.png"):
        size = (out / name).stat().st_size
        assert 10_000 < size < 300_000
    summary = (out / "summary.md").read_text()
    assert "| 90% |" in summary and "4 x 128 tokens of c4" in summary


@pytest.mark.model
def test_resume_skips_finished_points(small_study, lab):
    result, out, _ = small_study
    measured = []
    again = studies.run_study(
        lab, "single", [0.0, 0.5, 0.9], 2, out, on_point=lambda p, r: measured.append(p.key),
        roles=["k", "down"], eval_seqlen=128, calibration=CAL,
    )  # fmt: skip
    assert measured == [] and len(again.skipped) == 6 and again.calibration_passes == 0
    data = json.loads((out / "points.json").read_text())
    data["points"] = [p for p in data["points"] if not (p["series"] == "k" and p["rate"] == 0.9)]
    (out / "points.json").write_text(json.dumps(data))
    again = studies.run_study(
        lab, "single", [0.0, 0.5, 0.9], 2, out, on_point=lambda p, r: measured.append(p.key),
        roles=["k", "down"], eval_seqlen=128, calibration=CAL,
    )  # fmt: skip
    assert measured == ["k@0.9"] and len(again.points) == 6
    old = result.series()["k"][2].perplexity
    assert again.series()["k"][2].perplexity == pytest.approx(old, rel=1e-6)
    with pytest.raises(studies.StudyError, match="other settings"):
        studies.run_study(lab, "single", [0.5], 3, out, roles=["k"], eval_seqlen=128, calibration=CAL)


@pytest.mark.model
def test_owl_and_allocator_on_the_real_model(small_study, lab):
    ratios = al.outlier_ratios(lab, CAL)  # statistics from memory: no new pass
    assert len(ratios) == 30 and all(0.0 < r < 0.1 for r in ratios)
    shape = al.shapes(lab)
    count = pa.uniform_count(shape, 30, 0.6)
    curves = {r: [(0.0, 0.0), (1.0, w)] for r, w in zip(shape, (1, 1, 4, 2, 3, 3, 5), strict=True)}
    allocation = al.allocate(lab, 0.6, curves, bounds=(0.0, 0.9))
    planned = sum(30 * shape[r][0] * int(shape[r][1] * s) for r, s in allocation.sparsity.items())
    assert 0 <= count - planned < 30 * 192
    assert allocation.sparsity["q"] == pytest.approx(0.9, abs=0.01)  # cheapest per weight: at its bound
    assert not math.isnan(allocation.predicted_cost)
    assert lab.calibration_passes == 1


# ----- the command line ----------------------------------------------------------------------------
def test_cli_defaults_and_help(capsys):
    from cli.study import parser, study

    args = parser().parse_args(["single"])
    assert (args.windows, args.eval_seqlen, args.nsamples, args.seqlen, args.calibration) == (
        8,
        512,
        32,
        512,
        "c4",
    )
    assert args.grid is None and args.roles is None
    assert parser().parse_args(["single", "--grid", "0,10,95,1"]).grid == [0.0, 0.1, 0.95, 1.0]
    args = parser().parse_args(["allocate", "--targets", "50,60"])
    assert args.targets == [0.5, 0.6] and args.windows == 32 and args.bounds == [0.0, 0.9]
    with pytest.raises(SystemExit) as exit_info:
        study(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "32 x 512 tokens of C4" in text and "first 8 windows x 512" in text and "--full" in text
