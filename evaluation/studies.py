"""Sensitivity studies: how much each module (or group of modules) can lose before the model breaks.

Three studies share one engine:

- ``single``: every role alone over a grid of rates, the others dense (the thesis' figure 1);
- ``combined``: attention only (q, k, v, o) vs MLP only (gate, up, down) vs uniform, same rates;
- ``downstream``: attention-only, MLP-only and uniform recipes matched by the NUMBER of pruned
  weights (the grid is a budget: a fraction of all role weights), scored on zero-shot tasks when
  ``evaluation.tasks`` is available and tasks are asked for, else on perplexity.

Every point uses the cached statistics of ONE calibration pass on the dense model
(``stats_mode="cached"``), so a study costs one calibration pass plus one evaluation per point.
Evaluation uses a fixed number of windows (default 8 x 512 tokens of WikiText-2 test;
``windows=None`` is the full protocol).

A study writes into its folder after every point (``points.json`` with every recipe, ``points.csv``),
so an interrupted study resumes where it stopped; at the end it draws its plots and ``summary.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.lab import Lab, versions
from evaluation.share import scrub, shareable
from prune.errors import LabError, RecipeError
from prune.jobs import JobSize, job_size
from prune.progress import Event, Progress, checkpoint, scaled, silent
from prune.recipe import CalibrationSpec, EvalSpec, Recipe
from prune.roles import ATTENTION_ROLES, MLP_ROLES

KINDS = ("single", "combined", "downstream")
DEFAULT_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
COMBINED_GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
DOWNSTREAM_BUDGETS = [0.05, 0.1, 0.15, 0.2]  # fraction of all role weights; attention alone holds ~25%
DEFAULT_WINDOWS = 8
DEFAULT_EVAL_SEQLEN = 512
GROUP_KEYS = {"attention": "attn", "mlp": "mlp", "uniform": "all"}

OnPoint = Callable[["StudyPoint", "StudyResult"], None]


class StudyError(LabError):
    """A study that cannot run as asked (e.g. a results folder made with other settings)."""


def default_calibration() -> CalibrationSpec:
    """32 x 512 C4 tokens: one calibration pass of about a minute on a laptop CPU for SmolLM2."""
    return CalibrationSpec(source="c4", nsamples=32, seqlen=512, seed=0)


@dataclass
class StudySettings:
    """What must be equal for two points to be comparable (and for a folder to be resumed)."""

    kind: str
    dataset: str = "wikitext2"
    windows: int | None = DEFAULT_WINDOWS  # None: the full protocol
    eval_seqlen: int = DEFAULT_EVAL_SEQLEN
    calibration: CalibrationSpec = field(default_factory=default_calibration)
    tasks: list[str] = field(default_factory=list)  # downstream only: lm-eval task names
    limit: int | None = None  # downstream only: examples per task
    method: str = "wanda"  # any row of prune.methods.METHODS (older folders hold Wanda points)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StudySettings:
        data = dict(data)
        data["calibration"] = CalibrationSpec(**data["calibration"])
        return cls(**data)


@dataclass(frozen=True)
class PointSpec:
    """One point to measure: a series (role or group), its rate and the sparsity table it means."""

    series: str
    rate: float
    sparsity: dict[str, float]
    budget: float | None = None  # downstream: the matched fraction of all role weights

    @property
    def key(self) -> str:
        return f"{self.series}@{self.rate:.6g}" + ("" if self.budget is None else f"#{self.budget:.6g}")


@dataclass
class StudyPoint:
    """A measured point: what was pruned, how much of the model that is, and what it cost."""

    series: str
    rate: float
    budget: float | None
    pruned: int
    linear_params: int
    total_params: int
    linear_sparsity: float
    total_sparsity: float
    perplexity: float
    dense_perplexity: float
    dataset: str
    windows: int
    eval_seqlen: int
    prune_s: float
    eval_s: float
    stats_source: str
    sparsity: dict[str, float]
    recipe: dict
    tasks: dict | None = None  # downstream with tasks: {"mean": {...}, "tasks": {...}}
    device: str = ""  # where the point was measured (cpu, cuda)

    @property
    def key(self) -> str:
        return PointSpec(self.series, self.rate, self.sparsity, self.budget).key

    @property
    def accuracy(self) -> float | None:
        """Mean zero-shot accuracy (downstream with tasks), else None."""
        return None if not self.tasks else self.tasks["mean"].get("acc")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CSV_FIELDS = [
    "series",
    "rate",
    "budget",
    "pruned",
    "linear_params",
    "total_params",
    "linear_sparsity",
    "total_sparsity",
    "perplexity",
    "dense_perplexity",
    "accuracy",
    "dataset",
    "windows",
    "eval_seqlen",
    "prune_s",
    "eval_s",
    "stats_source",
    "sparsity",
    "device",
]


@dataclass
class StudyResult:
    settings: StudySettings
    model: dict
    points: list[StudyPoint] = field(default_factory=list)
    calibration_passes: int = 0  # calibration passes this run needed (0 when resumed from disk stats)
    skipped: list[str] = field(default_factory=list)  # keys found in the folder, not re-measured
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # what -> path written

    def series(self) -> dict[str, list[StudyPoint]]:
        """Points grouped by series, each sorted by rate."""
        out: dict[str, list[StudyPoint]] = {}
        for point in self.points:
            out.setdefault(point.series, []).append(point)
        return {name: sorted(rows, key=lambda p: p.rate) for name, rows in out.items()}

    def to_dict(self) -> dict:
        return {
            "settings": self.settings.to_dict(),
            "model": self.model,
            "versions": versions(),
            "points": [p.to_dict() for p in self.points],
        }


def shareable_study(result: StudyResult, model: str, shown: str) -> StudyResult:
    """The study as it may leave the server (``evaluation.share.shareable``): its model info and
    every point's recipe name the model ``shown``, with no server folder; for downloads and plots."""
    points = [
        dataclasses.replace(p, recipe=shareable(p.recipe, model, shown), stats_source=scrub(p.stats_source))
        for p in result.points
    ]
    return dataclasses.replace(result, model=shareable(result.model, model, shown), points=points, files={})


# ----- which points a study measures ---------------------------------------------------------------
def role_params(lab: Lab) -> dict[str, int]:
    lm = lab.loaded
    return lm.roles.param_counts(lm.model)


def point_specs(kind: str, grid: list[float], roles: list[str], params: dict[str, int]) -> list[PointSpec]:
    """The points of a study, in the order they run (cheap, informative points first)."""
    if kind == "single":
        return [PointSpec(role, rate, {role: rate}) for role in roles for rate in grid]
    if kind == "combined":
        return [PointSpec(name, rate, {key: rate}) for rate in grid for name, key in GROUP_KEYS.items()]
    if kind == "downstream":
        return downstream_specs(grid, params)
    raise StudyError(f"unknown study {kind!r}; choose one of {', '.join(KINDS)}")


def downstream_specs(budgets: list[float], params: dict[str, int]) -> list[PointSpec]:
    """Attention-only, MLP-only and uniform rates that prune the same number of weights.

    A budget b (fraction of all role weights) means rate b * total / group for a group alone; a
    budget the group cannot reach (attention holds ~25% of SmolLM2's weights) is left out."""
    total = sum(params.values())
    attention = sum(params[r] for r in ATTENTION_ROLES if r in params)
    mlp = sum(params[r] for r in MLP_ROLES if r in params)
    specs = []
    for budget in budgets:
        for name, size in (("attention", attention), ("mlp", mlp), ("uniform", total)):
            rate = budget * total / size if size else math.inf
            if rate <= 1.0:
                specs.append(PointSpec(name, round(rate, 6), {GROUP_KEYS[name]: round(rate, 6)}, budget))
    return specs


def recipe_for(model: str, settings: StudySettings, sparsity: dict[str, float]) -> Recipe:
    """Every point: cached statistics of the same calibration set, the same evaluation."""
    return Recipe(
        model=model,
        method=settings.method,
        sparsity=dict(sparsity),
        stats_mode="cached",
        calibration=settings.calibration,
        evaluation=EvalSpec(
            datasets=(settings.dataset,),
            seqlen=settings.eval_seqlen,
            max_windows=settings.windows,
            tasks=tuple(settings.tasks),
            limit=settings.limit,
        ),
    )


# ----- measuring one point -------------------------------------------------------------------------
def measure(lab: Lab, settings: StudySettings, spec: PointSpec, progress: Progress = silent) -> StudyPoint:
    """Prune as the spec says (cached statistics), then evaluate the pruned model."""
    recipe = recipe_for(lab.loaded.name, settings, spec.sparsity)
    lm = lab.loaded
    share = 0.5 if settings.tasks else 1.0  # of this point's bar: pruning and perplexity
    measured = lab.measure(
        recipe, settings.dataset, settings.windows, settings.eval_seqlen, scaled(progress, 0.0, share)
    )
    result, ppl, dense = measured.prune, measured.perplexity, measured.dense
    eval_s = measured.eval_s
    tasks = None
    if settings.tasks:
        start = time.perf_counter()
        with lab.using(result.state):
            tasks = _tasks(lab, recipe, scaled(progress, share, 1.0))
        eval_s += time.perf_counter() - start
    report = result.report
    return StudyPoint(
        series=spec.series,
        rate=spec.rate,
        budget=spec.budget,
        pruned=report.pruned,
        linear_params=report.linear_params,
        total_params=report.total_params or sum(p.numel() for p in lm.model.parameters()),
        linear_sparsity=report.linear_sparsity,
        total_sparsity=report.total_sparsity,
        perplexity=ppl.perplexity,
        dense_perplexity=dense.perplexity,
        dataset=settings.dataset,
        windows=ppl.windows,
        eval_seqlen=ppl.seqlen,
        prune_s=measured.prune_s,
        eval_s=eval_s,
        stats_source=result.stats_source,
        sparsity=dict(spec.sparsity),
        recipe=recipe.to_dict(),
        tasks=tasks,
        device=str(lm.device),
    )


def _tasks(lab: Lab, recipe: Recipe, progress: Progress) -> dict:
    """Zero-shot tasks on the model as pruned now (dense numbers are cached by the tasks module)."""
    from evaluation.tasks import evaluate_recipe_tasks

    out = evaluate_recipe_tasks(lab, recipe, dense=True, progress=progress)
    return {
        "mean": out["pruned"]["mean"],
        "tasks": out["pruned"]["tasks"],
        "dense_mean": out["dense"]["mean"],
    }


def tasks_available() -> bool:
    try:
        import lm_eval  # noqa: F401

        import evaluation.tasks  # noqa: F401
    except ImportError:
        return False
    return True


# ----- the folder: resume, save, plots, summary -----------------------------------------------------
def load_study(out_dir: str | Path) -> StudyResult | None:
    """A study folder's results (None when it has none yet): the app shows these as they fill in."""
    path = Path(out_dir) / "points.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        points = [StudyPoint(**p) for p in data["points"]]
        return StudyResult(StudySettings.from_dict(data["settings"]), data.get("model", {}), points)
    except (ValueError, KeyError, TypeError) as err:
        raise StudyError(f"{path} is not a study's points.json ({type(err).__name__}: {err})") from None


def save_study(result: StudyResult, out_dir: Path) -> None:
    """JSON (every point with its recipe) and CSV, each replaced atomically so a kill loses nothing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "points.json", json.dumps(result.to_dict(), indent=1))
    rows = [_csv_row(p) for p in result.points]
    tmp = out_dir / "points.csv.partial"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out_dir / "points.csv")
    result.files.update({"json": str(out_dir / "points.json"), "csv": str(out_dir / "points.csv")})


def _csv_row(point: StudyPoint) -> dict:
    row = {name: getattr(point, name) for name in CSV_FIELDS}
    row["sparsity"] = json.dumps(point.sparsity, sort_keys=True)
    for name in ("perplexity", "dense_perplexity", "linear_sparsity", "total_sparsity"):
        row[name] = round(row[name], 6)
    row["prune_s"], row["eval_s"] = round(point.prune_s, 3), round(point.eval_s, 3)
    return row


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def resumable(out_dir: Path | None, settings: StudySettings) -> StudyResult | None:
    """What a results folder already holds for these settings (None: nothing yet); a folder made
    with other settings is refused, so points of two different studies never mix."""
    if out_dir is None:
        return None
    previous = load_study(out_dir)
    if previous is None:
        return None
    if previous.settings.to_dict() != settings.to_dict():
        raise StudyError(
            f"{out_dir} holds a study made with other settings ({previous.settings.to_dict()}); "
            "use another output folder, the same settings, or fresh=True (--fresh)"
        )
    return previous


# ----- the study -----------------------------------------------------------------------------------
def run_study(
    lab: Lab,
    kind: str,
    grid: list[float] | None = None,
    windows: int | None = DEFAULT_WINDOWS,
    out_dir: str | Path | None = None,
    progress: Progress = silent,
    on_point: OnPoint | None = None,
    *,
    roles: list[str] | None = None,
    dataset: str = "wikitext2",
    eval_seqlen: int = DEFAULT_EVAL_SEQLEN,
    calibration: CalibrationSpec | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    method: str = "wanda",
    fresh: bool = False,
    plots: bool = True,
) -> StudyResult:
    """Run (or resume) one study and write its folder.

    ``kind``: single | combined | downstream. ``grid``: rates (single, combined) or budgets as a
    fraction of all role weights (downstream); None: the defaults above. ``windows``: evaluation
    windows of ``eval_seqlen`` tokens (None: the full protocol). ``on_point(point, result)`` runs after
    every measured point (the app redraws its plots there). ``fresh``: ignore what the folder holds.
    The model is dense again when the study returns.
    """
    start = time.perf_counter()
    calibration = calibration or default_calibration()
    tasks = list(tasks or [])
    settings = StudySettings(kind, dataset, windows, eval_seqlen, calibration, tasks, limit, method)
    if settings.tasks and kind != "downstream":
        raise StudyError("tasks are scored in the downstream study only")
    if settings.tasks and not tasks_available():
        raise StudyError("zero-shot tasks need lm-eval and evaluation.tasks; drop --tasks to use perplexity")
    params = role_params(lab)
    roles = _check_roles(roles, params)
    grid = _check_grid(kind, grid)
    out = Path(out_dir) if out_dir is not None else None
    previous = None if fresh else resumable(out, settings)
    done = previous.points if previous else []
    model = previous.model if previous and previous.model else lab.model_info()  # where the points came from
    result = StudyResult(settings, model, list(done))
    have = {p.key for p in done}
    specs = point_specs(kind, grid, roles, params)
    todo = [s for s in specs if s.key not in have]
    result.skipped = [s.key for s in specs if s.key in have]
    passes_before = lab.calibration_passes
    try:
        for index, spec in enumerate(todo):
            checkpoint()
            label = f"{kind} {index + 1}/{len(todo)}: {spec.series} at {spec.rate:.0%}"
            progress(Event("study", index / len(todo), label, step=index, steps=len(todo)))
            part = scaled(progress, index / len(todo), (index + 1) / len(todo), label)
            point = measure(lab, settings, spec, part)
            result.points.append(point)
            if out is not None:
                save_study(result, out)
            if on_point is not None:
                on_point(point, result)
    finally:
        lab.restore()
        result.calibration_passes = lab.calibration_passes - passes_before
    if out is not None:
        save_study(result, out)
        if plots:
            write_outputs(result, out)
    result.seconds = time.perf_counter() - start
    message = f"{kind} study done: {len(todo)} points measured, {len(result.skipped)} resumed"
    progress(Event("study", 1.0, message, step=len(todo), steps=len(todo)))
    return result


def study_size(
    model: str,
    kind: str,
    grid: list[float] | None = None,
    windows: int | None = DEFAULT_WINDOWS,
    *,
    roles: list[str],
    dataset: str = "wikitext2",
    eval_seqlen: int = DEFAULT_EVAL_SEQLEN,
    calibration: CalibrationSpec | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    method: str = "wanda",
) -> JobSize:
    """What ``run_study`` with these arguments will compute on ``model`` (``prune.jobs.job_size``;
    ``roles``: the single study's series), known before anything runs."""
    calibration = calibration or default_calibration()
    settings = StudySettings(
        kind, dataset, windows, eval_seqlen, calibration, list(tasks or []), limit, method
    )
    return job_size(recipe_for(model, settings, {}), kind, grid=_check_grid(kind, grid), roles=roles)


def _check_roles(roles: list[str] | None, params: dict[str, int]) -> list[str]:
    roles = list(roles or params)
    missing = [r for r in roles if r not in params]
    if missing:
        raise RecipeError(f"the model has no {', '.join(missing)} role; its roles are {', '.join(params)}")
    return roles


def _check_grid(kind: str, grid: list[float] | None) -> list[float]:
    if grid is None:
        grid = {"single": DEFAULT_GRID, "combined": COMBINED_GRID, "downstream": DOWNSTREAM_BUDGETS}.get(kind)
        if grid is None:
            raise StudyError(f"unknown study {kind!r}; choose one of {', '.join(KINDS)}")
    bad = [g for g in grid if not 0.0 <= g <= 1.0]
    if bad:
        raise StudyError(f"grid values must be fractions in [0, 1]; got {bad}")
    return sorted(dict.fromkeys(float(g) for g in grid))


def write_outputs(result: StudyResult, out_dir: Path) -> None:
    """The study's plots and its markdown summary."""
    from evaluation import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    result.files.update(plots.study_figures(result, out_dir))
    path = out_dir / "summary.md"
    path.write_text(summary_markdown(result))
    result.files["summary"] = str(path)


# ----- the summary ---------------------------------------------------------------------------------
def summary_markdown(result: StudyResult) -> str:
    s = result.settings
    cal = s.calibration
    windows = "the full protocol" if s.windows is None else f"the first {s.windows} windows"
    lines = [
        f"# {s.kind.capitalize()} study: {result.model.get('name', '?')}",
        "",
        f"- Evaluation: {s.dataset}, {windows} of {s.eval_seqlen} tokens"
        + (f"; tasks {', '.join(s.tasks)} (limit {s.limit})" if s.tasks else ""),
        f"- Method: {s.method}; calibration: {cal.nsamples} x {cal.seqlen} tokens of {cal.source} "
        f"(seed {cal.seed}), "
        "one calibration pass on the dense model, statistics cached for every point",
        f"- Points: {len(result.points)}; dense perplexity {result.points[0].dense_perplexity:.3f}"
        if result.points
        else "- Points: none yet",
        "",
    ]
    lines += _series_table(result)
    lines += _thresholds(result)
    return "\n".join(lines) + "\n"


def _series_table(result: StudyResult) -> list[str]:
    series = result.series()
    rates = sorted({p.rate for p in result.points})
    if result.settings.kind == "downstream":
        return _downstream_table(result)
    head = "| rate | " + " | ".join(series) + " |"
    lines = [
        "Perplexity by rate (each column prunes only that series):",
        "",
        head,
        "|" + "---|" * (len(series) + 1),
    ]
    for rate in rates:
        cells = []
        for rows in series.values():
            match = [p for p in rows if p.rate == rate]
            cells.append(f"{match[0].perplexity:.2f}" if match else "")
        lines.append(f"| {rate:.0%} | " + " | ".join(cells) + " |")
    return lines + [""]


def _downstream_table(result: StudyResult) -> list[str]:
    lines = [
        "| budget (of role weights) | series | rate | pruned | perplexity | mean acc |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(result.points, key=lambda p: (p.budget or 0, p.series)):
        acc = f"{p.accuracy:.4f}" if p.accuracy is not None else "-"
        lines.append(
            f"| {p.budget:.0%} | {p.series} | {p.rate:.1%} | {p.pruned:,} | {p.perplexity:.2f} | {acc} |"
        )
    return lines + [""]


def _thresholds(result: StudyResult, factor: float = 2.0) -> list[str]:
    """Per series: the highest measured rate whose perplexity stays within ``factor`` x dense."""
    if result.settings.kind == "downstream" or not result.points:
        return []
    lines = [f"Highest rate that keeps perplexity within {factor:g}x dense:", ""]
    for name, rows in result.series().items():
        ok = [p for p in rows if p.perplexity <= factor * p.dense_perplexity]
        if not ok:
            lines.append(f"- {name}: none of the measured rates")
            continue
        best = max(ok, key=lambda p: p.rate)
        lines.append(
            f"- {name}: {best.rate:.0%} ({best.pruned:,} weights, {best.linear_sparsity:.1%} of role weights)"
        )
    return lines + [""]
