"""Automatic sparsity allocation: which modules should lose more weights, at a fixed global budget.

Three ways to spend the same number of pruned weights (a fraction ``target`` of all role weights):

- ``uniform``: Wanda's default, every role of every layer at ``target``;
- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2023). Per layer, the outlier ratio is
  the fraction of Wanda scores |W| * ||X|| above M x the layer's mean score (M = 5); layers with
  more outliers are pruned less, within [S - lambda, S + lambda] (lambda = 0.08);
- ``allocator``: per-role sparsities from the measured single-role sensitivity curves. Greedy
  marginal cost: the budget goes, a little at a time, to the role whose perplexity grows least per
  weight removed (log-perplexity increments are taken as additive, the curves' lower convex hull
  makes the greedy exact for that model). Then a few real evaluations on HELD-OUT text (never the
  test set the comparison reports) pick how far to move from uniform towards that allocation,
  which corrects for interactions between roles that the additive model ignores.
  ``allocator+owl`` adds OWL's per-layer offsets to the allocator's per-role sparsities.

Every recipe is quantized to whole weights per row (Wanda prunes ``int(in * s)`` per row) and then
to the uniform recipe's exact count, so all methods remove the same number of weights (to within
one row of the smallest matrix).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evaluation.lab import Lab
from evaluation.studies import StudyResult, default_calibration, load_study, run_study
from prune.masks import wanda_scores
from prune.paths import data_dir
from prune.recipe import CalibrationSpec, EvalSpec, Recipe

OWL_M = 5.0
OWL_LAMBDA = 0.08
BOUNDS = (0.0, 0.9)
CURVE_GRID = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
SELECT_WINDOWS = 8
ALPHAS = (0.5, 1.0, 1.5)  # how far from uniform towards the greedy allocation the refinement tries

Log = Callable[[str], None]
Progress = Callable[[float, str], None]


class AllocationError(ValueError):
    """A budget the bounds cannot meet, or curves that do not cover what is asked."""


# ----- sensitivity curves --------------------------------------------------------------------------
Curve = list[tuple[float, float]]  # (rate, cost) sorted by rate; cost = log(ppl / dense ppl)


def curves_from_study(result: StudyResult) -> dict[str, Curve]:
    """Single-study points as cost curves: cost(rate) = log(perplexity / dense), made non-decreasing
    (a few windows are noisy at low rates; pruning more never helps in expectation)."""
    if result.settings.kind != "single":
        raise AllocationError(f"curves come from a single study, not a {result.settings.kind} study")
    curves: dict[str, Curve] = {}
    for role, rows in result.series().items():
        pts = [(0.0, 0.0)] + [
            (p.rate, math.log(p.perplexity / p.dense_perplexity)) for p in rows if p.rate > 0
        ]
        curves[role] = _monotone(sorted(dict(pts).items()))
    return curves


def _monotone(curve: Curve) -> Curve:
    out, top = [], -math.inf
    for rate, cost in curve:
        top = max(top, cost)
        out.append((rate, top))
    return out


def cost_at(curve: Curve, rate: float) -> float:
    """Piecewise-linear interpolation of a cost curve (rates past its ends are clamped)."""
    if rate <= curve[0][0]:
        return curve[0][1]
    for (r0, c0), (r1, c1) in zip(curve, curve[1:], strict=False):
        if rate <= r1:
            return c0 + (c1 - c0) * (rate - r0) / (r1 - r0)
    return curve[-1][1]


# ----- the greedy allocation -----------------------------------------------------------------------
def greedy_allocation(
    curves: Mapping[str, Curve],
    params: Mapping[str, int],
    target: float,
    bounds: tuple[float, float] | Mapping[str, tuple[float, float]] = BOUNDS,
) -> dict[str, float]:
    """Per-role sparsities with sum(params[r] * s[r]) == target * sum(params) exactly, each within
    its bounds, spending the budget where the marginal cost per pruned weight is lowest.

    A role's marginal cost looks ahead to every later point of its curve (the lower convex hull),
    so a bump in a noisy curve does not stop the greedy early; for piecewise-linear costs this
    greedy is the exact optimum of the additive model."""
    roles = list(params)
    limits = {r: bounds[r] if isinstance(bounds, Mapping) else bounds for r in roles}
    total = sum(params.values())
    budget = target * total
    low = sum(params[r] * limits[r][0] for r in roles)
    high = sum(params[r] * limits[r][1] for r in roles)
    if not low - 1e-9 <= budget <= high + 1e-9:
        raise AllocationError(
            f"target {target:.1%} is outside what the bounds allow ({low / total:.1%} to {high / total:.1%})"
        )
    s = {r: limits[r][0] for r in roles}
    used = low
    while budget - used > 1e-12 * total:
        role, ds = _cheapest_move(curves, params, limits, s)
        if role is None:
            raise AllocationError("no role can take more sparsity within its bounds")
        ds = min(ds, (budget - used) / params[role])
        s[role] += ds
        used += params[role] * ds
    return {r: min(max(s[r], limits[r][0]), limits[r][1]) for r in roles}


def _cheapest_move(curves, params, limits, s) -> tuple[str | None, float]:
    """The role and the move (in rate) with the lowest cost per pruned weight. The cost is linear
    between curve points, so only moves that end on a curve point (or the bound) need checking."""
    best, best_role, best_ds = math.inf, None, 0.0
    for role in params:
        hi = limits[role][1]
        if s[role] >= hi - 1e-12:
            continue
        here = cost_at(curves[role], s[role])
        ends = [r for r, _ in curves[role] if s[role] + 1e-12 < r < hi] + [hi]
        for end in ends:
            ds = end - s[role]
            ratio = (cost_at(curves[role], end) - here) / (params[role] * ds)
            if ratio < best - 1e-15:
                best, best_role, best_ds = ratio, role, ds
    return best_role, best_ds


# ----- OWL -----------------------------------------------------------------------------------------
@torch.no_grad()
def outlier_ratios(lab: Lab, calibration: CalibrationSpec, m: float = OWL_M) -> list[float]:
    """Per decoder layer: the fraction of its Wanda scores above m x their mean (dense weights,
    statistics of the cached calibration pass, so OWL costs no extra forward pass)."""
    pruner, lm = lab.pruner, lab.loaded
    recipe = Recipe(model=lm.name, sparsity={"all": 0.5}, stats_mode="cached", calibration=calibration)
    stats, _ = pruner.cached_statistics(pruner.calibration_ids(recipe))
    ratios = []
    with pruner.dense_weights():
        for layer in range(lm.roles.num_layers):
            scores = []
            for role in lm.roles.roles:
                (target,) = lm.roles.targets[(layer, role)]
                scores.append(wanda_scores(target.weight(lm.model), stats.sq_norms[target.module]).flatten())
            flat = torch.cat(scores)
            ratios.append(float((flat > m * flat.mean()).float().mean()))
    return ratios


def owl_sparsities(
    ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA, weights: Sequence[float] | None = None
) -> list[float]:
    """Layer sparsities: more outliers, less pruning; all within [target - lam, target + lam]; their
    mean weighted by ``weights`` (the layers' sizes) is exactly ``target``.

    OWL maps the ratios min-max onto a band 2 lam wide and re-centres it on the target; here the
    ratios are centred on their weighted mean and scaled so the farthest layer sits at lam, which
    keeps every layer inside the band while preserving the mean exactly (both agree when the ratios
    are symmetric). Values are also kept inside [0, 1]."""
    w = list(weights) if weights is not None else [1.0] * len(ratios)
    mean = sum(r * x for r, x in zip(ratios, w, strict=True)) / sum(w)
    spread = max(abs(r - mean) for r in ratios)
    if spread == 0:
        return [target] * len(ratios)
    lam = min(lam, target, 1.0 - target)
    return [target - lam * (r - mean) / spread for r in ratios]


# ----- quantizing to whole weights per row, at one exact count -------------------------------------
@dataclass
class Cell:
    """A group of identical matrices that share one sparsity (a role in one layer, or in all)."""

    key: tuple
    rows: int  # output rows of one matrix
    cols: int  # input columns: Wanda prunes int(cols * s) of each row
    copies: int  # how many such matrices (layers) share the sparsity
    sparsity: float
    high: float = 1.0


def quantize(cells: list[Cell], count: int) -> dict[tuple, float]:
    """Sparsities that prune whole numbers of weights per row and ``count`` weights in all (to within
    the smallest cell's rows x copies): scaled to the count, floors first, then largest remainders."""
    exact = sum(c.rows * c.copies * c.cols * c.sparsity for c in cells)
    scale = count / exact if exact else 0.0
    want = {c.key: min(c.cols * c.sparsity * scale, c.cols * c.high) for c in cells}
    ks = {c.key: math.floor(want[c.key] + 1e-9) for c in cells}
    left = count - sum(c.rows * c.copies * ks[c.key] for c in cells)
    order = sorted(cells, key=lambda c: want[c.key] - ks[c.key], reverse=True)
    while left > 0:
        moved = False
        for c in order:
            unit = c.rows * c.copies
            if unit <= left and ks[c.key] + 1 <= math.floor(c.cols * c.high + 1e-9):
                ks[c.key] += 1
                left -= unit
                moved = True
        if not moved:
            break
    return {c.key: _exact(ks[c.key], c.cols) for c in cells}


def _exact(k: int, cols: int) -> float:
    """A sparsity s with int(cols * s) == k despite floating point."""
    return 1.0 if k >= cols else k / cols + 1e-9


# ----- recipes -------------------------------------------------------------------------------------
@dataclass
class Allocation:
    """What the allocator (or OWL) chose: per-role sparsities and, if used, per-layer tables."""

    method: str
    target: float
    sparsity: dict[str, float]
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)
    predicted_cost: float | None = None  # sum of per-role log(ppl/dense) from the curves
    alpha: float | None = None  # the refinement's choice (0: uniform, 1: the greedy allocation)
    trials: list[dict] = field(default_factory=list)  # the refinement's held-out evaluations

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self, base: Recipe) -> Recipe:
        """``base`` (calibration, evaluation, model) with this allocation's sparsities."""
        return dataclasses.replace(
            base, sparsity=dict(self.sparsity), per_layer={k: dict(v) for k, v in self.per_layer.items()}
        ).validate()

    def role_sparsity(self, params: Mapping[str, int], layers: int) -> dict[str, float]:
        """Achieved sparsity per role (averaged over layers when per-layer tables are used)."""
        if not self.per_layer:
            return dict(self.sparsity)
        return {r: sum(self.per_layer[i][r] for i in range(layers)) / layers for r in params}


def shapes(lab: Lab) -> dict[str, tuple[int, int]]:
    lm = lab.loaded
    return {r: tuple(lm.roles.targets[(0, r)][0].weight(lm.model).shape) for r in lm.roles.roles}


def uniform_count(shape: Mapping[str, tuple[int, int]], layers: int, target: float) -> int:
    """Weights uniform Wanda at ``target`` removes: the budget every method is matched to."""
    return sum(layers * rows * int(cols * target) for rows, cols in shape.values())


def per_role_allocation(
    sparsity: Mapping[str, float], shape, layers: int, count: int, high: float = 1.0
) -> dict[str, float]:
    cells = [Cell((r,), *shape[r], layers, min(max(s, 0.0), high), high) for r, s in sparsity.items()]
    return {key[0]: s for key, s in quantize(cells, count).items()}


def per_layer_allocation(
    table: Mapping[int, Mapping[str, float]], shape, count: int
) -> dict[int, dict[str, float]]:
    cells = [
        Cell((i, r), *shape[r], 1, min(max(s, 0.0), 1.0)) for i, row in table.items() for r, s in row.items()
    ]
    out: dict[int, dict[str, float]] = {}
    for (i, r), s in quantize(cells, count).items():
        out.setdefault(i, {})[r] = s
    return out


def owl_allocation(lab: Lab, target: float, ratios: Sequence[float], lam: float = OWL_LAMBDA) -> Allocation:
    shape = shapes(lab)
    layers = len(ratios)
    layer_s = owl_sparsities(ratios, target, lam)
    table = {i: dict.fromkeys(shape, s) for i, s in enumerate(layer_s)}
    per_layer = per_layer_allocation(table, shape, uniform_count(shape, layers, target))
    return Allocation("owl", target, {"all": target}, per_layer)


def with_owl_offsets(
    lab: Lab, allocation: Allocation, ratios: Sequence[float], lam: float = OWL_LAMBDA
) -> Allocation:
    """The allocator's per-role sparsities plus OWL's per-layer offsets, at the same count."""
    shape = shapes(lab)
    layers = len(ratios)
    offsets = [s - allocation.target for s in owl_sparsities(ratios, allocation.target, lam)]
    table = {i: {r: allocation.sparsity[r] + off for r in shape} for i, off in enumerate(offsets)}
    per_layer = per_layer_allocation(table, shape, uniform_count(shape, layers, allocation.target))
    return dataclasses.replace(allocation, method="allocator+owl", per_layer=per_layer)


# ----- the allocator -------------------------------------------------------------------------------
def allocate(
    lab: Lab,
    target: float,
    curves: Mapping[str, Curve] | StudyResult | str | Path,
    *,
    bounds: tuple[float, float] = BOUNDS,
    refine: Callable[[Recipe], float] | None = None,
    alphas: Sequence[float] = ALPHAS,
    base: Recipe | None = None,
    owl: bool = False,
    lam: float = OWL_LAMBDA,
    log: Log = lambda m: None,
) -> Allocation:
    """Per-role sparsities for a global ``target`` (fraction of all role weights), matched to uniform
    Wanda's pruned count: ``.sparsity`` (role -> fraction), ``.per_layer`` (with ``owl=True``: layer ->
    role -> fraction, OWL's layer offsets added), ``.recipe(base)`` (a runnable Recipe).

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
    layers = lab.loaded.roles.num_layers
    params = {r: layers * rows * cols for r, (rows, cols) in shape.items()}
    missing = [r for r in params if r not in curves]
    if missing:
        raise AllocationError(f"no sensitivity curve for {', '.join(missing)}")
    hi = min(bounds[1], *(curves[r][-1][0] for r in params))
    greedy = greedy_allocation(curves, params, target, (bounds[0], hi))
    count = uniform_count(shape, layers, target)
    predicted = sum(cost_at(curves[r], s) for r, s in greedy.items())
    log(f"greedy at {target:.0%}: " + ", ".join(f"{r} {s:.3f}" for r, s in greedy.items()))
    best = Allocation(
        "allocator", target, per_role_allocation(greedy, shape, layers, count, hi), {}, predicted, 1.0
    )
    if refine is not None:
        best = _refine(best, greedy, shape, layers, count, hi, refine, alphas, base, log)
    if owl:
        best = with_owl_offsets(lab, best, outlier_ratios(lab, base.calibration), lam)
    return best


def _refine(best, greedy, shape, layers, count, hi, refine, alphas, base, log) -> Allocation:
    """Line search between uniform (alpha 0) and the greedy allocation on held-out text."""
    target = best.target
    trials, scored = [], []
    for alpha in sorted({0.0, *alphas}):
        mixed = {r: target + alpha * (s - target) for r, s in greedy.items()}
        if any(s < 0 or s > hi + 1e-9 for s in mixed.values()):
            continue
        sparsity = per_role_allocation(mixed, shape, layers, count, hi)
        ppl = refine(dataclasses.replace(base, sparsity=sparsity, per_layer={}).validate())
        log(f"  refine alpha {alpha:.2f}: held-out perplexity {ppl:.3f}")
        trials.append({"alpha": alpha, "sparsity": sparsity, "perplexity": ppl})
        scored.append((ppl, alpha, sparsity))
    ppl, alpha, sparsity = min(scored)
    return dataclasses.replace(best, sparsity=sparsity, alpha=alpha, trials=trials)


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
    progress: Progress | None = None,
    log: Log = lambda m: None,
) -> dict:
    """Uniform Wanda, OWL, the allocator and allocator+OWL at each target, same calibration, same
    pruned count, same evaluation; writes allocation.{json,csv,md} and allocation.png in ``out_dir``.
    Resumes: rows already in allocation.json are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda f, m: None)
    select = select_data or held_out_text(out)
    study = _curves(
        lab, out, curves, curve_grid, select, select_windows, eval_seqlen, calibration, progress, log
    )
    ratios = outlier_ratios(lab, calibration, outlier_m)
    log("OWL outlier ratios: " + ", ".join(f"{r:.4f}" for r in ratios))
    base = Recipe(
        model=lab.loaded.name,
        stats_mode="cached",
        calibration=dataclasses.replace(calibration),
        evaluation=EvalSpec([dataset], eval_seqlen, windows),
    )
    state = _load_rows(out, dict(base.calibration.__dict__), dataset, windows, eval_seqlen)
    rows = state["rows"]

    def held_out(recipe: Recipe) -> float:
        lab.pruner.prune(recipe)
        return lab.perplexity(select, eval_seqlen, select_windows).perplexity

    try:
        for target in targets:
            if all(any(r["method"] == m and r["target"] == target for r in rows) for m in _ORDER):
                continue  # resumed: this target is complete
            allocations = _allocations(lab, target, study, ratios, bounds, lam, refine, held_out, base, log)
            for allocation in allocations:
                if any(r["method"] == allocation.method and r["target"] == target for r in rows):
                    continue
                rows.append(_evaluate(lab, allocation, base, dataset, eval_seqlen, windows, progress, log))
                _save_rows(out, state, rows, ratios, select)
    finally:
        lab.pruner.restore()
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
        lambda f, m: progress(0.5 * f, f"curves: {m}"),
        lambda p, r: log(f"  curve {p.series} @ {p.rate:.0%}: {p.perplexity:.3f}"),
        dataset=select,
        eval_seqlen=eval_seqlen,
        calibration=calibration,
    )


def _allocations(lab, target, study, ratios, bounds, lam, refine, held_out, base, log) -> list[Allocation]:
    uniform = Allocation("uniform", target, {"all": target})
    owl = owl_allocation(lab, target, ratios, lam)
    allocator = allocate(
        lab, target, study, bounds=bounds, refine=held_out if refine else None, base=base, log=log
    )
    return [uniform, owl, allocator, with_owl_offsets(lab, allocator, ratios, lam)]


def _evaluate(lab, allocation: Allocation, base: Recipe, dataset, seqlen, windows, progress, log) -> dict:
    recipe = allocation.recipe(base)
    start = time.perf_counter()
    result = lab.pruner.prune(recipe)
    ppl = lab.perplexity(
        dataset, seqlen, windows, lambda d, t, p: progress(d / t, f"{allocation.method}: {p:.2f}")
    )
    dense = lab.dense_perplexity(dataset, seqlen, windows)
    report = result.report
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


def _load_rows(out: Path, calibration: dict, dataset, windows, seqlen) -> dict:
    settings = {"calibration": calibration, "dataset": dataset, "windows": windows, "eval_seqlen": seqlen}
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
        f"refinement on {Path(select).name}.",
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


_ORDER = {"uniform": 0, "owl": 1, "allocator": 2, "allocator+owl": 3}
