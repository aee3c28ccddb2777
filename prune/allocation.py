"""Allocation math: how to spend one budget of pruned weights across roles and layers.

Pure functions of numbers (cost curves, role shapes, outlier ratios): no model, no Lab. The drivers
that measure curves and ratios on a model and refine on held-out text live in
``evaluation/allocate.py``.

- ``greedy_plan``: per-role sparsities from single-role sensitivity curves. Greedy marginal cost:
  the budget goes, a little at a time, to the role whose perplexity grows least per weight removed
  (log-perplexity increments are taken as additive; looking ahead along each curve makes the greedy
  exact for that model). ``GreedyPlan.line`` gives the refinement's candidates between uniform and
  the greedy allocation.
- OWL, Outlier-Weighted Layerwise sparsity (Yin et al., 2023). Per layer, the outlier ratio
  (``outlier_ratio``, ``layer_outlier_ratio``) is the fraction of its Wanda scores (all roles of the
  layer together, dense weights) above M x their mean (M = 5); layers with more outliers are pruned
  less. ``owl_published`` is OWL's own mapping (the ratios min-max scaled to a 2 lambda wide range,
  re-centred on the mean sparsity; lambda = 0.08); ``owl_sparsities`` is the mean-band variant that
  keeps every layer inside [S - lambda, S + lambda]. ``schedule_per_layer`` composes either with
  per-role sparsities at the exact pruned count of the recipe without it (``Recipe.layer_schedule``).
- ``round_to_count``: every allocation is rounded to whole weights per row (Wanda prunes ``int(in * s)``
  per row) and to the uniform recipe's exact count, so all methods remove the same number of
  weights (to within one row of the smallest matrix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from prune.errors import LabError
from prune.masks import wanda_scores
from prune.recipe import OWL_LAMBDA, OWL_M, Recipe

BOUNDS = (0.0, 0.9)
ALPHAS = (0.5, 1.0, 1.5)  # how far from uniform towards the greedy allocation the refinement tries

Curve = list[tuple[float, float]]  # (rate, cost) sorted by rate; cost = log(ppl / dense ppl)
Shape = Mapping[str, tuple[int, int]]  # role -> (rows, cols) of its matrix in every layer


class AllocationError(LabError):
    """A budget the bounds cannot meet, or curves that do not cover what is asked."""


# ----- sensitivity curves --------------------------------------------------------------------------
class CurvePoint(Protocol):
    """One measured point of a single-role study (``evaluation.studies.StudyPoint`` is one)."""

    series: str
    rate: float
    perplexity: float
    dense_perplexity: float


def curves_from_points(points: Iterable[CurvePoint]) -> dict[str, Curve]:
    """Single-study points as cost curves: cost(rate) = log(perplexity / dense), from (0, 0), made
    non-decreasing (a few windows are noisy at low rates; pruning more never helps in expectation).
    A rate measured twice keeps its last point."""
    rows: dict[str, dict[float, float]] = {}
    for p in points:
        row = rows.setdefault(p.series, {0.0: 0.0})
        if p.rate > 0:
            row[p.rate] = math.log(p.perplexity / p.dense_perplexity)
    return {series: _monotone(sorted(row.items())) for series, row in rows.items()}


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
def outlier_ratio(scores: torch.Tensor, m: float = OWL_M) -> float:
    """The fraction of ``scores`` (one layer's Wanda scores) above ``m`` x their mean."""
    flat = scores.flatten()
    return float((flat > m * flat.mean()).float().mean())


@torch.no_grad()
def layer_outlier_ratio(matrices: Iterable[tuple[torch.Tensor, torch.Tensor]], m: float = OWL_M) -> float:
    """One decoder layer's outlier ratio, as OWL computes it: of the Wanda scores of all its role
    matrices together, each given as (weight, mean squared norm of each input column)."""
    scores = [wanda_scores(weight, sq_norm).flatten() for weight, sq_norm in matrices]
    return outlier_ratio(torch.cat(scores), m)


def owl_published(ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's published mapping (their code): ``r = (D - min D) / (max D - min D) * 2 lam``, layer
    density ``r - mean(r) + (1 - target)``, so sparsity ``target - (r - mean(r))``: more outliers,
    less pruning; the mean is exactly ``target``; max - min is exactly 2 lam. The values lie in
    [target - lam, target + lam] only when the scaled ratios' mean is mid-range (symmetric ratios);
    one layer far from the others can sit up to 2 lam from the target. Not clipped to [0, 1]."""
    low, high = min(ratios), max(ratios)
    if high == low:
        return [target] * len(ratios)
    scaled = [(d - low) / (high - low) * 2 * lam for d in ratios]
    mean = sum(scaled) / len(scaled)
    return [target - (r - mean) for r in scaled]


def owl_sparsities(
    ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA, weights: Sequence[float] | None = None
) -> list[float]:
    """The mean-band variant (``layer_schedule="owl-band"``). Layer sparsities: more outliers, less
    pruning; all within [target - lam, target + lam]; their mean weighted by ``weights`` (the layers'
    sizes) is exactly ``target``.

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


def schedule_per_layer(
    recipe: Recipe,
    ratios: Sequence[float],
    shapes: Mapping[tuple[int, str], tuple[int, int]],
    per_row: bool = True,
) -> dict[int, dict[str, float]]:
    """The per-layer sparsities a recipe's layer schedule gives ({} for "uniform"), pruning exactly
    the count the recipe prunes without it (to within one row of its smallest matrix).

    ``ratios``: every layer's outlier ratio; ``shapes``: (layer, role) -> (rows, cols) of the model's
    matrices. The schedule covers the layers the recipe prunes that ``per_layer`` does not name
    (explicit entries win; layers outside ``recipe.layers`` stay dense). Each such layer gets the
    offset ``delta_l = OWL_l - S`` (S: the role-weighted mean sparsity of those layers, OWL_l from
    ``owl_published`` or, for "owl-band", ``owl_sparsities``), added to every role the recipe
    prunes there (a role at 0 stays 0) and clipped to [0, 1]; then every (layer, role) is rounded to
    whole weights per row and to the recipe's count (``round_to_count``). ``per_row=False``: a method with
    one threshold per matrix, which prunes int(rows x cols x s)."""
    if recipe.layer_schedule == "uniform":
        return {}
    base: dict[int, dict[str, float]] = {}
    for layer, role in sorted(shapes):
        if layer not in recipe.per_layer:
            base.setdefault(layer, {})[role] = recipe.sparsity_for(layer, role)
    base = {layer: row for layer, row in base.items() if any(s > 0 for s in row.values())}
    if len(base) < 2:
        return {}
    size = {key: rows * cols for key, (rows, cols) in shapes.items()}
    weights = [sum(size[(layer, r)] for r in row) for layer, row in base.items()]
    target = sum(size[(layer, r)] * s for layer, row in base.items() for r, s in row.items()) / sum(weights)
    chosen = [ratios[layer] for layer in base]
    if recipe.layer_schedule == "owl":
        layer_s = owl_published(chosen, target, recipe.owl_lambda)
    else:
        layer_s = owl_sparsities(chosen, target, recipe.owl_lambda, weights)

    def pruned(key: tuple[int, str], s: float) -> int:
        rows, cols = shapes[key]
        return rows * int(cols * s) if per_row else int(rows * cols * s)

    count = sum(pruned((layer, r), s) for layer, row in base.items() for r, s in row.items())
    cells = [
        Cell((layer, r), *shapes[(layer, r)], 1, min(max(s + ls - target, 0.0), 1.0))
        for (layer, row), ls in zip(base.items(), layer_s, strict=True)
        for r, s in row.items()
        if s > 0
    ]
    table = {layer: dict.fromkeys(row, 0.0) for layer, row in base.items()}
    for (layer, r), s in round_to_count(cells, count).items():
        table[layer][r] = s if int(shapes[(layer, r)][1] * s) > 0 else 0.0
    return table


# ----- rounding to whole weights per row, at one exact count --------------------------------------
@dataclass
class Cell:
    """A group of identical matrices that share one sparsity (a role in one layer, or in all)."""

    key: tuple
    rows: int  # output rows of one matrix
    cols: int  # input columns: Wanda prunes int(cols * s) of each row
    copies: int  # how many such matrices (layers) share the sparsity
    sparsity: float
    high: float = 1.0


def round_to_count(cells: list[Cell], count: int) -> dict[tuple, float]:
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


def uniform_count(shape: Shape, layers: int, target: float) -> int:
    """Weights uniform Wanda at ``target`` removes: the budget every method is matched to."""
    return sum(layers * rows * int(cols * target) for rows, cols in shape.values())


def per_role_allocation(
    sparsity: Mapping[str, float], shape: Shape, layers: int, count: int, high: float = 1.0
) -> dict[str, float]:
    """One sparsity per role (the same in every layer), rounded to ``count`` pruned weights."""
    cells = [Cell((r,), *shape[r], layers, min(max(s, 0.0), high), high) for r, s in sparsity.items()]
    return {key[0]: s for key, s in round_to_count(cells, count).items()}


# ----- allocations ---------------------------------------------------------------------------------
@dataclass
class Allocation:
    """What the allocator (or OWL) chose: per-role sparsities and a layer schedule."""

    method: str
    target: float
    sparsity: dict[str, float]
    predicted_cost: float | None = None  # sum of per-role log(ppl/dense) from the curves
    alpha: float | None = None  # the refinement's choice (0: uniform, 1: the greedy allocation)
    trials: list[dict] = field(default_factory=list)  # the refinement's held-out evaluations
    schedule: str = "uniform"  # the recipe's layer_schedule ("owl": the pruner adds OWL's offsets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self, base: Recipe) -> Recipe:
        """``base`` (calibration, evaluation, model, OWL's M and lambda) with this allocation's
        sparsities and layer schedule."""
        return dataclasses.replace(
            base,
            sparsity=dict(self.sparsity),
            per_layer={},
            layer_schedule=self.schedule,
        )


@dataclass(frozen=True)
class GreedyPlan:
    """The greedy allocation of one target on a model's roles, before rounding to whole weights."""

    target: float
    sparsity: dict[str, float]  # role -> greedy sparsity, not rounded
    shape: Shape
    layers: int
    high: float  # the upper bound every role was held to
    predicted_cost: float  # sum of the curves' costs at ``sparsity``

    @property
    def count(self) -> int:
        return uniform_count(self.shape, self.layers, self.target)

    def allocation(self) -> Allocation:
        """The greedy sparsities rounded to uniform's count (alpha 1)."""
        sparsity = per_role_allocation(self.sparsity, self.shape, self.layers, self.count, self.high)
        return Allocation("allocator", self.target, sparsity, self.predicted_cost, 1.0)

    def line(self, alphas: Sequence[float] = ALPHAS) -> list[tuple[float, dict[str, float]]]:
        """The refinement's candidates: ``uniform + alpha * (greedy - uniform)`` for uniform (alpha 0)
        and each alpha, rounded to uniform's count; alphas that push a role outside [0, high] are left
        out."""
        out = []
        for alpha in candidate_alphas(alphas):
            mixed = {r: self.target + alpha * (s - self.target) for r, s in self.sparsity.items()}
            if any(s < 0 or s > self.high + 1e-9 for s in mixed.values()):
                continue
            out.append((alpha, per_role_allocation(mixed, self.shape, self.layers, self.count, self.high)))
        return out


def candidate_alphas(alphas: Sequence[float] = ALPHAS) -> list[float]:
    """The refinement's alphas: uniform (0) and each of ``alphas``, in order (``GreedyPlan.line``
    leaves out those that push a role outside its bounds)."""
    return sorted({0.0, *alphas})


def greedy_plan(
    curves: Mapping[str, Curve],
    shape: Shape,
    layers: int,
    target: float,
    bounds: tuple[float, float] = BOUNDS,
) -> GreedyPlan:
    """The greedy allocation of ``target`` (a fraction of all role weights) over the roles of
    ``shape``; each role is held below ``bounds[1]`` and below the highest rate its curve reaches."""
    params = {r: layers * rows * cols for r, (rows, cols) in shape.items()}
    missing = [r for r in params if r not in curves]
    if missing:
        raise AllocationError(f"no sensitivity curve for {', '.join(missing)}")
    high = min(bounds[1], *(curves[r][-1][0] for r in params))
    greedy = greedy_allocation(curves, params, target, (bounds[0], high))
    predicted = sum(cost_at(curves[r], s) for r, s in greedy.items())
    return GreedyPlan(target, greedy, shape, layers, high, predicted)
