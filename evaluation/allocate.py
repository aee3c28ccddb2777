"""Automatic sparsity allocation on a loaded model: which modules should lose more weights, at a
fixed global budget.

Three ways to spend the same number of pruned weights (a fraction ``target`` of all role weights):

- ``uniform``: Wanda's default, every role of every layer at ``target``;
- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2023): layers with more outliers among
  their Wanda scores are pruned less (``Recipe(layer_schedule="owl")``: OWL's published mapping,
  applied by the pruner at uniform's pruned count);
- ``allocator``: per-role sparsities from the measured single-role sensitivity curves (the greedy
  of ``prune.allocation``), then a few real evaluations on HELD-OUT text (never the test set the
  comparison reports) pick how far to move from uniform towards that allocation, which corrects
  for interactions between roles that the additive model ignores. ``allocator+owl`` is the
  allocator's per-role sparsities with the same layer schedule (OWL's offsets added per layer, at
  the same count).

The math (curves, the greedy, OWL, rounding every method to one pruned count) is
``prune.allocation``; this module measures what it needs on the model through the Lab (curves,
outlier ratios, held-out perplexity) and writes the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from evaluation.lab import Lab
from evaluation.studies import StudyResult, default_calibration, load_study, run_study
from prune.allocation import (
    ALPHAS,
    BOUNDS,
    OWL_LAMBDA,
    OWL_M,
    Allocation,
    AllocationError,
    Curve,
    GreedyPlan,
    curves_from_points,
    greedy_plan,
)
from prune.progress import Progress, scaled, silent
from prune.recipe import CalibrationSpec, EvalSpec, Recipe
from runtime.paths import data_dir
from runtime.stats import layer_outlier_ratios

CURVE_GRID = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
SELECT_WINDOWS = 8

Log = Callable[[str], None]
Refine = Callable[[Recipe], float]  # a recipe -> its perplexity on held-out text


def _quiet(message: str) -> None:
    """A Log that drops every line."""


# ----- what the math needs from the model ------------------------------------------------------------
def curves_from_study(result: StudyResult) -> dict[str, Curve]:
    """A single study's points as cost curves (see ``prune.allocation.curves_from_points``)."""
    if result.settings.kind != "single":
        raise AllocationError(f"curves come from a single study, not a {result.settings.kind} study")
    return curves_from_points(result.points)


def shapes(lab: Lab) -> dict[str, tuple[int, int]]:
    """Each role's matrix shape (rows, cols): the same in every layer."""
    lm = lab.loaded
    return lm.roles.shapes(lm.model)


@torch.no_grad()
def outlier_ratios(lab: Lab, calibration: CalibrationSpec, m: float = OWL_M) -> list[float]:
    """Per decoder layer: the fraction of its Wanda scores above m x their mean (dense weights,
    statistics of the cached calibration pass, so OWL costs no extra forward pass): what the
    pruner computes for ``layer_schedule="owl"``."""
    stats = lab.statistics(calibration)
    with lab.dense():
        return layer_outlier_ratios(lab.loaded, stats, m)  # weights read wherever the model lives


def held_out_refine(lab: Lab, dataset: str, seqlen: int, windows: int) -> Refine:
    """The refinement's evaluation: prune as a recipe says, perplexity on held-out text."""

    def refine(recipe: Recipe) -> float:
        return lab.measure(recipe, dataset, windows, seqlen).perplexity.perplexity

    return refine


# ----- the allocator ---------------------------------------------------------------------------------
def allocate(
    lab: Lab,
    target: float,
    curves: Mapping[str, Curve] | StudyResult | str | Path,
    *,
    bounds: tuple[float, float] = BOUNDS,
    refine: Refine | None = None,
    alphas: Sequence[float] = ALPHAS,
    base: Recipe | None = None,
    log: Log = _quiet,
) -> Allocation:
    """Per-role sparsities for a global ``target`` (fraction of all role weights), matched to uniform
    Wanda's pruned count: ``.sparsity`` (role -> fraction) and ``.recipe(base)`` (a runnable Recipe;
    OWL's layer offsets come from its ``layer_schedule``, added by the pruner).

    ``curves``: a single study's result, its folder, or cost curves. ``refine(recipe) -> perplexity``
    on held-out text: given, the allocator tries ``uniform + alpha * (greedy - uniform)`` for each
    alpha (and uniform itself) and keeps the best. ``base``: calibration and evaluation of the
    recipes (default: cached statistics of the studies' default calibration)."""
    if isinstance(curves, (str, Path)):
        study = load_study(curves)
        if study is None:
            raise AllocationError(f"{curves} holds no single-study results")
        curves = study
    if isinstance(curves, StudyResult):
        curves = curves_from_study(curves)
    base = base or Recipe(model=lab.loaded.name, stats_mode="cached", calibration=default_calibration())
    shape = shapes(lab)
    plan = greedy_plan(curves, shape, lab.loaded.roles.num_layers, target, bounds)
    log(f"greedy at {target:.0%}: " + ", ".join(f"{r} {s:.3f}" for r, s in plan.sparsity.items()))
    best = plan.allocation()
    if refine is not None:
        best = _refine(best, plan, refine, alphas, base, log)
    return best


def _refine(
    best: Allocation, plan: GreedyPlan, refine: Refine, alphas: Sequence[float], base: Recipe, log: Log
) -> Allocation:
    """Line search between uniform (alpha 0) and the greedy allocation on held-out text."""
    trials, scored = [], []
    for alpha, sparsity in plan.line(alphas):
        ppl = refine(dataclasses.replace(base, sparsity=sparsity, per_layer={}))
        log(f"  refine alpha {alpha:.2f}: held-out perplexity {ppl:.3f}")
        trials.append({"alpha": alpha, "sparsity": sparsity, "perplexity": ppl})
        scored.append((ppl, alpha, sparsity))
    ppl, alpha, sparsity = min(scored)
    return dataclasses.replace(best, sparsity=sparsity, alpha=alpha, trials=trials)


def allocate_from_study(
    lab: Lab, study: StudyResult, target: float, *, refine: bool = True, folder: str | Path, log: Log = _quiet
) -> Allocation:
    """The app's allocation: greedy on a finished single study's curves and, with ``refine``, the
    line search on held-out text (``held_out_text(folder)``) with the study's calibration and
    window length. The model is dense again when it returns."""
    if study.model.get("name") != lab.loaded.name:
        raise AllocationError(
            f"Your single study was measured on {study.model.get('name')}; run it again on this model."
        )
    if not 0 < target < 1:
        raise AllocationError("the target must be between 0 and 100 %")
    if not refine:
        return allocate(lab, target, study, log=log)
    held_out = held_out_text(Path(folder))
    seqlen = study.settings.eval_seqlen
    base = Recipe(
        model=lab.loaded.name,
        stats_mode="cached",
        calibration=study.settings.calibration,
        evaluation=EvalSpec((held_out,), seqlen, SELECT_WINDOWS),
    )
    refine_on = held_out_refine(lab, held_out, seqlen, SELECT_WINDOWS)
    try:
        return allocate(lab, target, study, refine=refine_on, base=base, log=log)
    finally:
        lab.restore()


# ----- the comparison ------------------------------------------------------------------------------
def held_out_text(out_dir: Path) -> str:
    """Text for the allocator's own evaluations: WikiText-2 validation from the data folder (as a
    .txt copy the perplexity loader reads), else C4. Never the test split the comparison reports."""
    folder = data_dir()
    source = folder / "wikitext-2-v1-TOKENIZED" / "wiki.valid.tokens" if folder else None
    if source is None or not source.is_file():
        return "c4"
    copy = out_dir / "heldout-wikitext2-validation.txt"
    if not copy.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return str(copy)


def compare(
    lab: Lab,
    targets: Sequence[float],
    out_dir: str | Path,
    *,
    calibration: CalibrationSpec,
    dataset: str = "wikitext2",
    windows: int | None = 32,
    eval_seqlen: int = 512,
    curves: str | Path | None = None,
    curve_grid: Sequence[float] = CURVE_GRID,
    select_data: str | None = None,
    select_windows: int = SELECT_WINDOWS,
    bounds: tuple[float, float] = BOUNDS,
    lam: float = OWL_LAMBDA,
    outlier_m: float = OWL_M,
    refine: bool = True,
    progress: Progress = silent,
    log: Log = _quiet,
) -> dict:
    """Uniform Wanda, OWL, the allocator and allocator+OWL at each target, same calibration, same
    pruned count, same evaluation; writes allocation.{json,csv,md} and allocation.png in ``out_dir``.
    Resumes: rows already in allocation.json are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    select = select_data or held_out_text(out)
    curves_share = 0.0 if curves else 0.5  # of the bar: measuring the curves, when they are measured
    study = _curves(
        lab,
        out,
        curves,
        curve_grid,
        select,
        select_windows,
        eval_seqlen,
        calibration,
        scaled(progress, 0.0, curves_share, "curves"),
        log,
    )
    ratios = outlier_ratios(lab, calibration, outlier_m)
    log("OWL outlier ratios: " + ", ".join(f"{r:.4f}" for r in ratios))
    base = Recipe(
        model=lab.loaded.name,
        stats_mode="cached",
        calibration=calibration,
        evaluation=EvalSpec((dataset,), eval_seqlen, windows),
        owl_m=outlier_m,
        owl_lambda=lam,
    )
    owl = {"mapping": "published", "m": outlier_m, "lambda": lam}
    state = _load_rows(out, dataclasses.asdict(calibration), dataset, windows, eval_seqlen, owl)
    rows = state["rows"]
    held_out = held_out_refine(lab, select, eval_seqlen, select_windows) if refine else None

    def done(target: float, method: str) -> bool:
        return any(r["method"] == method and r["target"] == target for r in rows)

    todo = sum(not done(target, method) for target in targets for method in _ORDER)
    share = (1.0 - curves_share) / max(todo, 1)  # of the bar: one row's evaluation
    measured = 0
    try:
        for target in targets:
            if all(done(target, method) for method in _ORDER):
                continue  # resumed: this target is complete
            for allocation in _allocations(lab, target, study, bounds, held_out, base, log):
                if done(target, allocation.method):
                    continue
                low = curves_share + measured * share
                part = scaled(progress, low, low + share, f"{allocation.method} @ {target:.0%}")
                rows.append(_evaluate(lab, allocation, base, part, log))
                measured += 1
                _save_rows(out, state, rows, ratios, select)
    finally:
        lab.restore()
    return _write_report(out, state, rows, ratios, select, study)


def _curves(lab, out, curves, grid, select, windows, eval_seqlen, calibration, progress, log) -> StudyResult:
    if curves:
        study = load_study(curves)
        if study is None:
            raise AllocationError(f"{curves} holds no single-study results")
        log(f"sensitivity curves from {curves} ({study.settings.dataset}, {len(study.points)} points)")
        return study
    log(f"measuring sensitivity curves on held-out text {select} into {out / 'curves'}")
    return run_study(
        lab,
        "single",
        list(grid),
        windows,
        out / "curves",
        progress,
        lambda p, r: log(f"  curve {p.series} @ {p.rate:.0%}: {p.perplexity:.3f}"),
        dataset=select,
        eval_seqlen=eval_seqlen,
        calibration=calibration,
    )


def _allocations(lab, target, study, bounds, held_out, base, log) -> list[Allocation]:
    """The four methods of one target, in the order of ``_ORDER``. The OWL rows are recipes with
    ``layer_schedule="owl"`` (M and lambda from ``base``): the pruner adds OWL's layer offsets at
    the pruned count of the same recipe without them."""
    uniform = Allocation("uniform", target, {"all": target})
    owl = Allocation("owl", target, {"all": target}, schedule="owl")
    allocator = allocate(lab, target, study, bounds=bounds, refine=held_out, base=base, log=log)
    with_owl = dataclasses.replace(allocator, method="allocator+owl", schedule="owl")
    return [uniform, owl, allocator, with_owl]


def _evaluate(lab: Lab, allocation: Allocation, base: Recipe, progress: Progress, log: Log) -> dict:
    """One row of the comparison: the allocation pruned and evaluated as ``base`` says."""
    recipe = allocation.recipe(base)
    ev = recipe.evaluation
    start = time.perf_counter()
    measured = lab.measure(recipe, ev.datasets[0], ev.max_windows, ev.seqlen, progress)
    ppl, dense, report = measured.perplexity, measured.dense, measured.prune.report
    layers = lab.loaded.roles.num_layers
    row = {
        "method": allocation.method,
        "target": allocation.target,
        "perplexity": ppl.perplexity,
        "dense_perplexity": dense.perplexity,
        "pruned": report.pruned,
        "linear_sparsity": report.linear_sparsity,
        "total_sparsity": report.total_sparsity,
        "role_sparsity": {r: rr.sparsity for r, rr in report.roles.items()},
        "layer_sparsity": [
            n / sum(report.roles[r].params / layers for r in report.roles) for n in report.pruned_per_layer
        ],
        "alpha": allocation.alpha,
        "predicted_cost": allocation.predicted_cost,
        "trials": allocation.trials,
        "recipe": recipe.to_dict(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log(
        f"{allocation.method:>14} @ {allocation.target:.0%}: "
        f"ppl {ppl.perplexity:.3f}, pruned {report.pruned:,}"
    )
    return row


def _load_rows(out: Path, calibration: dict, dataset, windows, seqlen, owl: dict) -> dict:
    settings = {
        "calibration": calibration,
        "dataset": dataset,
        "windows": windows,
        "eval_seqlen": seqlen,
        "owl": owl,
    }
    path = out / "allocation.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("settings") == settings:
            return {"settings": settings, "rows": data["rows"]}
    return {"settings": settings, "rows": []}


def _save_rows(out: Path, state: dict, rows, ratios, select) -> None:
    data = {**state, "rows": rows, "outlier_ratios": ratios, "held_out": select}
    tmp = out / "allocation.json.partial"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "allocation.json")


def _write_report(out: Path, state: dict, rows, ratios, select, study: StudyResult) -> dict:
    from evaluation import plots

    _save_rows(out, state, rows, ratios, select)
    text = allocation_markdown(rows, state["settings"], select, study)
    (out / "allocation.md").write_text(text)
    _write_csv(out / "allocation.csv", rows)
    files = {
        "json": str(out / "allocation.json"),
        "csv": str(out / "allocation.csv"),
        "md": str(out / "allocation.md"),
    }
    if rows:
        files["plot"] = plots.save(plots.figure_allocation(rows), out / "allocation.png")
    return {"rows": rows, "markdown": text, "files": files, "outlier_ratios": ratios}


def _write_csv(path: Path, rows) -> None:
    import csv

    fields = ["target", "method", "perplexity", "dense_perplexity", "pruned", "linear_sparsity", "alpha"]
    roles = list(rows[0]["role_sparsity"]) if rows else []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields + [f"s_{r}" for r in roles])
        for row in rows:
            writer.writerow([row[f] for f in fields] + [round(row["role_sparsity"][r], 6) for r in roles])


def allocation_markdown(rows, settings: dict, select: str, study: StudyResult) -> str:
    cal = settings["calibration"]
    windows = "full protocol" if settings["windows"] is None else f"first {settings['windows']} windows"
    roles = list(rows[0]["role_sparsity"]) if rows else []
    lines = [
        f"Perplexity on {settings['dataset']} ({windows} x {settings['eval_seqlen']} tokens); calibration "
        f"{cal['nsamples']} x {cal['seqlen']} {cal['source']} (seed {cal['seed']}), one cached pass; every "
        "method prunes the same number of weights. Allocator curves: "
        f"{Path(study.settings.dataset).name} ({study.settings.windows} windows); "
        f"refinement on {Path(select).name}.{_owl_note(settings)}",
        "",
        "| target | method | perplexity | vs uniform | pruned weights | " + " | ".join(roles) + " |",
        "|---|---|---|---|---|" + "---|" * len(roles),
    ]
    for row in sorted(rows, key=lambda r: (r["target"], _ORDER.get(r["method"], 9))):
        uniform = next((r for r in rows if r["target"] == row["target"] and r["method"] == "uniform"), None)
        gain = f"{row['perplexity'] / uniform['perplexity'] - 1:+.1%}" if uniform else "-"
        cells = " | ".join(f"{100 * row['role_sparsity'][r]:.1f}" for r in roles)
        lines.append(
            f"| {row['target']:.0%} | {row['method']} | {row['perplexity']:.3f} | {gain} "
            f"| {row['pruned']:,} | {cells} |"
        )
    if rows:
        lines += [
            "",
            f"Dense perplexity: {rows[0]['dense_perplexity']:.3f}. Role columns: achieved sparsity (%).",
        ]
    return "\n".join(lines) + "\n"


def _owl_note(settings: dict) -> str:
    owl = settings.get("owl")
    if not owl:
        return ""
    return (
        f" OWL rows: layer_schedule owl ({owl['mapping']} mapping, M = {owl['m']:g}, λ = {owl['lambda']:g})."
    )


_ORDER = {"uniform": 0, "owl": 1, "allocator": 2, "allocator+owl": 3}
