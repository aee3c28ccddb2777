"""Sensitivity: run a study (``evaluation.studies``) with its plots filling in point by point.

A study prunes many recipes on the shared model through ``Lab.measure``; the model is dense again
afterwards and every session's next job re-applies its own masks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import gradio as gr

from evaluation import plots as study_plots
from evaluation import studies
from evaluation.allocate import SELECT_WINDOWS, allocate_from_study
from evaluation.tasks import ALL7
from prune.allocation import candidate_alphas
from prune.errors import RecipeError
from prune.jobs import JobSize, job_size
from prune.recipe import EvalSpec, Recipe
from prune.roles import ROLES
from ui import plots
from ui.common import HEAVY, PROGRESS, LabTab, figure_box, no_api, user_errors
from ui.engine import Engine
from ui.recipes import Controls, Defaults, calibration_spec
from ui.sessions import Session

KIND_CHOICES = [
    ("Single: each role alone, the others dense", "single"),
    ("Combined: attention only vs MLP only vs uniform", "combined"),
    ("Downstream: same number of pruned weights, attention vs MLP vs uniform", "downstream"),
]
POINT_HEADERS = ["series", "rate %", "pruned weights", "perplexity", "dense", "accuracy"]


def default_grid(kind: str, device_type: str) -> str:
    """Grids in percent; short on a CPU so a study fits a lesson."""
    if kind == "downstream":
        values = studies.DOWNSTREAM_BUDGETS
    elif device_type == "cuda":
        values = studies.DEFAULT_GRID if kind == "single" else studies.COMBINED_GRID
    else:
        values = [0.2, 0.5, 0.8] if kind == "single" else [0.2, 0.4, 0.6, 0.8]
    return ", ".join(f"{100 * v:g}" for v in values)


def parse_grid(text: str) -> list[float]:
    """``"10, 50, 90"`` (percent) -> fractions."""
    try:
        values = [float(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"the grid is a comma list of percentages like 10, 50, 90; got {text!r}") from None
    if not values:
        raise RecipeError("the grid is empty: give percentages like 10, 50, 90")
    bad = [v for v in values if not 0 <= v <= 100]
    if bad:
        raise RecipeError(f"grid values are percentages between 0 and 100; got {bad}")
    return [round(v / 100, 6) for v in values]


def point_rows(result: studies.StudyResult) -> list[list]:
    rows = []
    for p in sorted(result.points, key=lambda p: (p.series, p.rate)):
        accuracy = "" if p.accuracy is None else f"{100 * p.accuracy:.1f}"
        rows.append(
            [
                p.series,
                round(100 * p.rate, 2),
                f"{p.pruned / 1e6:.2f} M",
                round(p.perplexity, 3),
                round(p.dense_perplexity, 3),
                accuracy,
            ]
        )
    return rows


def figures(result: studies.StudyResult) -> list:
    """The study's own figures (``evaluation.plots``), as the points so far allow."""
    if not result.points:
        return [None, None]
    kind = result.settings.kind
    if kind == "single":
        return [
            plots.render(study_plots.figure_rate_vs_perplexity, result),
            plots.render(study_plots.figure_weights_vs_perplexity, result),
        ]
    if kind == "combined":
        return [plots.render(study_plots.figure_groups, result), None]
    return [plots.render(study_plots.figure_downstream, result), None]


def download_zip(result: studies.StudyResult, folder: Path) -> str:
    """A study's folder as a visitor downloads it (points, plots, summary), written afresh from the
    shareable ``result``, zipped: the study's own folder (kept for resuming) is never served."""
    shutil.rmtree(folder, ignore_errors=True)
    studies.save_study(result, folder)
    with plots.PLOT_LOCK:
        studies.write_outputs(result, folder)  # PNG plots and summary.md beside the CSV
    return shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=folder.name)


def study_folder(session: Session, settings: dict) -> Path:
    """One folder per session and settings: the same settings resume, others start afresh."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return session.folder(f"study-{settings['kind']}-{digest}")


def make_handlers(engine: Engine):
    @user_errors
    def run(
        kind: str,
        grid: str,
        roles: list[str],
        windows: int,
        eval_seqlen: int,
        dataset: str,
        tasks: list[str],
        limit: int,
        session: Session,
        progress=PROGRESS,
        *,
        calibration_file: str | None = None,
        **calibration_values,
    ) -> Iterator[list]:
        engine.sessions.touch(session)
        session.note_uploads(calibration_file)
        calibration = calibration_spec(Controls(calibration_file=calibration_file, **calibration_values))
        present = engine.shape(session).roles
        chosen = [r for r in (roles or present) if r in present]
        options = dict(
            kind=kind,
            grid=parse_grid(grid),
            windows=int(windows) or None,
            roles=chosen,
            dataset=dataset,
            eval_seqlen=int(eval_seqlen),
            calibration=calibration,
            tasks=list(tasks or []) if kind == "downstream" else [],
            limit=(int(limit) or None) if kind == "downstream" and tasks else None,
        )
        size = studies.study_size(engine.model_for(session), **options)
        folder = study_folder(
            session, {**options, "model": engine.model_for(session), "calibration": calibration.key()}
        )

        model = engine.model_for(session)
        shown = engine.hosting.display(model)

        def work(emit):
            def on_point(point, result):
                emit("point", studies.shareable_study(result, model, shown))

            return studies.run_study(
                engine.ensure(session, lambda event: emit("progress", event)),
                out_dir=folder,
                progress=lambda event: emit("progress", event),
                on_point=on_point,
                plots=False,  # drawn below, under the plotting lock
                **options,
            )

        yield [gr.skip(), gr.skip(), gr.skip(), "Waiting for the model ...", None]
        for kind_, payload in engine.heavy(session, work, size):
            if kind_ == "progress":
                progress(payload.fraction, desc=payload.message)
            elif kind_ == "point":
                yield [
                    *figures(payload),
                    point_rows(payload),
                    f"{len(payload.points)} points measured ...",
                    None,
                ]
        session.studies[payload.settings.kind] = payload
        result = studies.shareable_study(payload, model, shown)  # what the visitor sees and downloads
        archive = download_zip(result, folder.with_name(f"{folder.name}-download"))
        resumed = f", {len(result.skipped)} resumed from an earlier run" if result.skipped else ""
        status = (
            f"**{kind} study done**: {len(result.points)} points{resumed}, "
            f"{result.calibration_passes} calibration pass(es), {result.seconds:.0f} s. "
            "The zip holds points.csv, points.json (every recipe), the plots and summary.md."
        )
        yield [*figures(result), point_rows(result), status, archive]

    @user_errors
    def allocate_sliders(target: float, refine: bool, session: Session, progress=PROGRESS) -> Iterator[list]:
        engine.sessions.touch(session)
        study = session.studies.get("single")
        if study is None:
            raise gr.Error(
                "Run a single study first (all roles): its curves tell the allocator which roles are "
                "cheap to prune."
            )
        folder = session.folder("allocate")
        size = allocate_size(engine.model_for(session), study, refine)

        def work(emit):
            return allocate_from_study(
                engine.ensure(session),
                study,
                float(target) / 100,
                refine=refine,
                folder=folder,
                log=partial(emit, "log"),
            )

        for kind, payload in engine.heavy(session, work, size):
            if kind == "log":
                progress(None, desc=payload[:120])
        allocation = payload
        values = [round(100 * allocation.sparsity.get(role, 0.0), 1) for role in ROLES]
        chosen = ", ".join(f"{r} {100 * s:.1f} %" for r, s in allocation.sparsity.items())
        refined = "" if allocation.alpha is None or not refine else f" (refined: alpha {allocation.alpha:g})"
        text = (
            f"**Allocation for {target:g} % of all role weights**{refined}: {chosen}.  \n"
            "The sliders on the **Prune** tab are set: press *Prune & evaluate* to compare it with uniform."
        )
        yield [*values, text]

    def grid_for(kind: str) -> str:
        return default_grid(kind, engine.require().loaded.device.type)

    return run, allocate_sliders, grid_for


def build(engine: Engine, defaults: Defaults, lab_tab: LabTab) -> None:
    run, allocate_sliders, grid_for = make_handlers(engine)
    device = engine.require().loaded.device.type
    present = list(engine.require().loaded.roles.roles)
    gr.Markdown(
        "How much can each module lose? Every point prunes with the **cached statistics of one calibration "
        "pass** (the Prune tab's calibration settings) and measures perplexity. Plots fill in point by point."
    )
    with gr.Row():
        kind = gr.Radio(KIND_CHOICES, value="single", label="Study", scale=3)
        grid = gr.Textbox(
            default_grid("single", device),
            label="Grid (% pruned; downstream: % of all role weights)",
            scale=2,
        )
    with gr.Row():
        roles = gr.CheckboxGroup(list(ROLES), value=present, label="Roles (single study)", scale=3)
        windows = gr.Number(
            2 if device == "cpu" else studies.DEFAULT_WINDOWS,
            precision=0,
            minimum=0,
            label="Windows per point (0 = all)",
            scale=1,
        )
        eval_seqlen = gr.Number(
            studies.DEFAULT_EVAL_SEQLEN, precision=0, minimum=2, label="Tokens per window", scale=1
        )
        dataset = gr.Dropdown(["wikitext2", "c4"], value="wikitext2", label="Perplexity on", scale=1)
    with gr.Accordion("Downstream study: score zero-shot tasks instead of perplexity", open=False):
        with gr.Row():
            tasks = gr.CheckboxGroup(ALL7, value=[], label="Tasks (none: perplexity)")
            limit = gr.Number(
                defaults.task_limit, precision=0, minimum=0, label="Examples per task (0 = all)"
            )
    button = gr.Button("Run study", variant="primary", size="lg")
    status = gr.Markdown()
    with gr.Row():
        plot_a = figure_box("Study plot")
        plot_b = figure_box("Study plot")
    with gr.Row():
        points = gr.Dataframe(headers=POINT_HEADERS, label="Points", interactive=False, scale=3)
        download = gr.File(label="Results folder (.zip)", interactive=False, scale=1)
    gr.Markdown("### Allocate: fill the per-role sliders for a target")
    with gr.Row():
        target = gr.Slider(5, 90, value=50, step=1, label="Target: % of all attention + MLP weights", scale=3)
        refine = gr.Checkbox(False, label="Refine on held-out text (a few evaluations)", scale=1)
        allocate_btn = gr.Button("Allocate", variant="secondary", scale=1)
    allocation_md = gr.Markdown(
        "Uses your last **single** study: the budget goes to the roles whose perplexity grows least "
        "per pruned weight."
    )
    kind.change(grid_for, kind, grid, api_name=False, queue=False)
    role_sliders = [lab_tab.sliders[r] for r in ROLES]
    allocate_btn.click(
        allocate_sliders,
        [target, refine, lab_tab.session],
        [*role_sliders, allocation_md],
        api_name="allocate",
        **HEAVY,
    ).success(**no_api(lab_tab.readout_event))
    calibration = {
        name: lab_tab.controls[name]
        for name in ("calibration", "calibration_file", "nsamples", "seqlen", "seed")
    }
    button.click(
        run,
        inputs=[kind, grid, roles, windows, eval_seqlen, dataset, tasks, limit, lab_tab.session],
        inputs_kwargs=calibration,
        outputs=[plot_a, plot_b, points, status, download],
        api_name="study",
        **HEAVY,
    )


# ----- hosting: the allocator's work, checked before anything runs ----------------------------------
def allocate_size(model: str, study: studies.StudyResult, refine: bool) -> JobSize:
    """What ``allocate_from_study`` computes: the greedy alone, or with ``refine`` uniform and each
    alpha pruned from the study's cached calibration and evaluated on held-out text (its base recipe)."""
    settings = study.settings
    base = Recipe(
        model=model,
        stats_mode="cached",
        calibration=settings.calibration,
        evaluation=EvalSpec((settings.dataset,), settings.eval_seqlen, SELECT_WINDOWS),
    )
    return job_size(base, "allocate", points=len(candidate_alphas()) if refine else 0)
