"""What a job will compute, from its recipe and its kind alone (no model loaded).

``job_size`` is the one count of a job's work: the memory plan (``runtime.memory.Workload.for_job``),
the hosting limits (``ui.hosting.Limits.check``) and ZeroGPU's GPU time (``ui.hosting.gpu_seconds``)
all read its ``JobSize``, so what is checked is what runs.

The counts are those of a first run, with nothing memoized or cached yet (a dense evaluation, cached
statistics or dense task scores make a later run cheaper, never dearer), and the sequence lengths as
asked (a model's context may shorten them). Job kinds:

- ``prune``: prune as the recipe says (``Lab.prune``);
- ``run``: prune, then perplexity of the pruned and (``dense``) the dense model on every dataset of
  the recipe (``Lab.run``, ``Lab.measure``), its lm-eval tasks when it names any (the CLI), each
  ``quantize`` kind's copies of both evaluated too (the CLI's ``--quantize``), ``save`` the weights;
- ``tasks``: the recipe's lm-eval tasks on the pruned state a session already has (and dense);
- ``single``, ``combined``, ``downstream``: a study of the recipe's method over ``grid`` (``roles``:
  the single study's series), every point pruned from the cached statistics of one calibration pass;
- ``allocate``: the allocator's ``points`` held-out evaluations (0: the greedy alone, no model work);
- ``generate``: ``new_tokens`` for the dense and the pruned answer (``quantize``: one kind's copies);
- ``speed``: ``repeats`` rounds of a warm-up and a timed prompt plus ``new_tokens`` of greedy decode,
  dense and pruned (``evaluation.speed.side_by_side``);
- ``export``: the pruned state written as a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from prune.errors import RecipeError
from prune.recipe import Recipe

STUDY_KINDS = ("single", "combined", "downstream")
JOB_KINDS = ("prune", "run", "tasks", *STUDY_KINDS, "allocate", "generate", "speed", "export")
GROUP_SERIES = 3  # combined and downstream: attention only, MLP only, uniform


@dataclass(frozen=True)
class JobSize:
    """How much one job asks of the model (see the module docstring for how it is counted)."""

    kind: str
    calibration_samples: int = 0  # calibration sequences it reads (0: none)
    calibration_seqlen: int = 0  # tokens per calibration sequence
    calibration_passes: int = 0  # forward passes over them (an OWL schedule's counted)
    statistics: str = "none"  # what the passes keep: "norms", "moments", "hessian" or "none"
    stats_mode: str = "sequential"  # "cached": every layer's statistics kept at once
    eval_datasets: tuple[str, ...] = ()
    eval_windows: int | None = 0  # windows per evaluation; None: the whole test set
    eval_seqlen: int = 0  # tokens per window
    evaluations: int = 0  # perplexity evaluations: datasets x dense/pruned x points x precisions
    tasks: tuple[str, ...] = ()  # lm-eval task names
    task_docs: int | None = None  # documents per task; None: whole splits
    task_runs: int = 0  # evaluations of the whole task list (dense/pruned x points)
    points: int = 0  # study points (grid values x series), or the allocator's held-out trials
    new_tokens: int = 0  # per generated answer
    answers: int = 0  # generated answers
    quantized_copies: int = 0  # bitsandbytes copies built
    saves_model: bool = False  # writes the weights

    @property
    def calibration_tokens(self) -> int:
        """The calibration set's size (samples x tokens per sample); 0 when the job reads none."""
        return self.calibration_samples * self.calibration_seqlen

    @property
    def eval_tokens(self) -> int | None:
        """Tokens of every perplexity evaluation together (None: a whole test set, size unknown here)."""
        if not self.evaluations:
            return 0
        return None if self.eval_windows is None else self.evaluations * self.eval_windows * self.eval_seqlen

    @property
    def generated_tokens(self) -> int:
        return self.new_tokens * self.answers


def calibration_passes(recipe: Recipe) -> int:
    """Forward passes over the calibration set a first prune of ``recipe`` runs: one for the method's
    statistics (sequential: the pass that prunes; cached: one pass on the dense model) and one pass of norms
    for a layer schedule's outlier ratios, shared with cached Wanda's (same statistics)."""
    if not recipe.calibrates:
        return 0
    schedule = recipe.schedules_layers()
    if not recipe.needs_statistics:
        return 1
    shared = recipe.stats_mode == "cached" and recipe.statistics in ("norms", "moments")
    return 1 + int(schedule and not shared)


def job_size(
    recipe: Recipe | None,
    kind: str = "run",
    *,
    dense: bool = True,
    quantize: Sequence[str] = (),
    save: bool = False,
    grid: Sequence[float] = (),
    roles: Sequence[str] = (),
    points: int = 0,
    new_tokens: int = 0,
    repeats: int = 1,
) -> JobSize:
    """The work of running ``recipe`` as a job of ``kind`` (one of ``JOB_KINDS``; ``generate`` and
    ``speed`` and ``export`` work on a session's state and read no recipe: None will do)."""
    if kind not in JOB_KINDS:
        raise RecipeError(f"unknown job kind {kind!r}; choose one of {', '.join(JOB_KINDS)}")
    if kind == "generate":
        return JobSize(kind, new_tokens=new_tokens, answers=2, quantized_copies=2 * len(quantize))
    if kind == "speed":  # each round: a warm-up and a timed answer of each model
        return JobSize(kind, new_tokens=new_tokens, answers=4 * repeats)
    if kind == "export":
        return JobSize(kind, saves_model=True)
    if recipe is None:
        raise RecipeError(f"a {kind} job needs a recipe")
    ev = recipe.evaluation
    states = 2 if dense else 1  # dense and pruned, or pruned alone
    if kind == "prune":
        return JobSize(kind, **_calibration(recipe))
    if kind == "run":
        copies = len(quantize) * states
        return JobSize(
            kind,
            **_calibration(recipe),
            **_perplexity(recipe, len(ev.datasets) * (states + copies)),
            **_tasks(recipe, states),
            quantized_copies=copies,
            saves_model=save,
        )
    if kind == "tasks":
        return JobSize(kind, **_tasks(recipe, states))
    if kind in STUDY_KINDS:
        return _study(recipe, kind, grid, roles)
    if not points:  # allocate without refinement: the greedy alone
        return JobSize(kind)
    return JobSize(kind, **_calibration(_cached(recipe)), **_perplexity(recipe, 1 + points), points=points)


def _calibration(recipe: Recipe) -> dict:
    if not recipe.calibrates:
        return {}
    return dict(
        calibration_samples=recipe.calibration.nsamples,
        calibration_seqlen=recipe.calibration.seqlen,
        calibration_passes=calibration_passes(recipe),
        statistics=recipe.statistics or "norms",  # no statistics of its own: the schedule's norms
        stats_mode=recipe.stats_mode if recipe.needs_statistics else "cached",
    )


def _perplexity(recipe: Recipe, evaluations: int) -> dict:
    ev = recipe.evaluation
    if not ev.datasets or not evaluations:
        return {}
    return dict(
        eval_datasets=ev.datasets,
        eval_windows=ev.max_windows or None,  # None or 0: the whole test set
        eval_seqlen=ev.seqlen,
        evaluations=evaluations,
    )


def _tasks(recipe: Recipe, runs: int) -> dict:
    ev = recipe.evaluation
    return dict(tasks=ev.tasks, task_docs=ev.limit, task_runs=runs) if ev.tasks else {}


def _study(recipe: Recipe, kind: str, grid: Sequence[float], roles: Sequence[str]) -> JobSize:
    """One cached calibration pass, the dense model evaluated once, then every point: pruned and
    evaluated (a point at rate 0 prunes nothing and reuses the dense evaluation), with the tasks
    (dense once) when the downstream study scores them. Downstream counts every series at every
    budget; a budget a group cannot reach (attention alone past its share) is measured by none."""
    rates = sorted(set(grid))
    series = len(roles) if kind == "single" else GROUP_SERIES
    points = len(rates) * series
    pruning = sum(rate > 0 for rate in rates) * series
    tasks = _tasks(recipe, 1 + points) if kind == "downstream" else {}
    return JobSize(
        kind, **_calibration(_cached(recipe)), **_perplexity(recipe, 1 + pruning), **tasks, points=points
    )


def _cached(recipe: Recipe) -> Recipe:
    """The recipe as a study's point prunes it: statistics of one cached pass, no layer schedule."""
    return dataclasses.replace(recipe, stats_mode="cached", layer_schedule="uniform", per_layer={})
