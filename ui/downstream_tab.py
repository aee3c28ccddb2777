"""Downstream: zero-shot lm-eval tasks on the dense and this session's pruned model.

``evaluation.tasks.evaluate_recipe_tasks`` scores the model as it is in memory, so the job runs
inside ``Engine.pruned(session)``: the session's masks are in place for its length. Dense scores
are cached by that module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import gradio as gr

from evaluation.share import scrub
from evaluation.tasks import ALL7, estimate_seconds, evaluate_recipe_tasks
from prune.jobs import job_size
from ui import plots
from ui.common import HEAVY, LIGHT, PROGRESS, figure_box, user_errors
from ui.engine import Engine
from ui.recipes import Defaults
from ui.sessions import Session

HEADERS = ["task", "metric", "dense", "pruned", "delta", "n"]
# Rough forward-pass throughput (tokens/s) before a run has measured it on this machine.
GUESS_TOKENS_PER_S = {"cpu": 250.0, "cuda": 20000.0}


def _limit(value) -> int | None:
    limit = int(value or 0)
    if limit < 0:
        raise gr.Error("the example limit must be 0 (whole split) or more")
    return limit or None


def estimate_text(engine: Engine, tasks: list[str], limit, dense: bool) -> str:
    """The time estimate shown before anything runs."""
    if not tasks:
        return "Pick at least one task."
    lab = engine.require()
    measured = engine.tokens_per_s
    speed = measured or GUESS_TOKENS_PER_S.get(lab.loaded.device.type, 250.0)
    one = estimate_seconds(tasks, _limit(limit), speed)
    total = one * (2 if dense else 1)
    basis = "measured in your last perplexity run" if measured else "a rough guess until a run measures it"
    dense_note = " (dense scores are cached after the first time)" if dense else ""
    return (
        f"Estimated time: **{_duration(total)}** for dense + pruned{dense_note} "
        f"at {speed:,.0f} tokens/s ({basis})."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(rows: list[dict]) -> list[list]:
    def pct(x):
        return "" if x is None else f"{100 * x:.1f}"

    return [
        [
            r["task"],
            r["metric"],
            pct(r["dense"]),
            pct(r["pruned"]),
            "" if r["delta"] is None else f"{100 * r['delta']:+.1f}",
            r["n"],
        ]
        for r in rows
    ]


def make_handlers(engine: Engine):
    @user_errors
    def estimate(tasks: list[str], limit: int, dense: bool) -> str:
        return estimate_text(engine, tasks, limit, dense)

    @user_errors
    def run_tasks(
        tasks: list[str], limit: int, dense: bool, session: Session, progress=PROGRESS
    ) -> Iterator[list]:
        if not tasks:
            raise gr.Error("Pick at least one task.")
        engine.sessions.touch(session)
        engine.check_session(session)
        if session.recipe is None:
            raise gr.Error(
                "Nothing pruned in this session yet: press 'Prune & evaluate' on the Prune tab first."
            )
        recipe = session.recipe
        evaluation = dataclasses.replace(recipe.evaluation, tasks=tuple(tasks), limit=_limit(limit))
        recipe = dataclasses.replace(recipe, evaluation=evaluation)
        size = job_size(recipe, "tasks", dense=dense)

        def work(emit):
            with engine.pruned(session):
                return evaluate_recipe_tasks(engine.lab, recipe, dense, lambda event: emit("progress", event))

        yield [gr.skip(), gr.skip(), "Waiting for the model ...", gr.skip()]
        for kind, payload in engine.heavy(session, work, size):
            if kind == "progress":
                progress(payload.fraction, desc=payload.message)
        result = payload
        scope = "all documents" if result["limit"] is None else f"the first {result['limit']} documents"
        took = f"{len(result['tasks'])} tasks, {scope} per task, {result['seconds']:.0f} s."
        status = engine.noted(session, f"Run #{session.runs}: {took}")
        raw = scrub(result) if engine.hosting.public else result
        yield [table(result["rows"]), plots.render(plots.task_bars, result["rows"]), status, raw]

    return estimate, run_tasks


def build(engine: Engine, defaults: Defaults, session: gr.State) -> None:
    estimate, run_tasks = make_handlers(engine)
    gr.Markdown("Zero-shot accuracy (lm-eval) of the dense model and of **your last run**'s pruned model.")
    with gr.Row():
        tasks = gr.CheckboxGroup(ALL7, value=["boolq", "rte"], label="Tasks", scale=3)
        limit = gr.Number(
            defaults.task_limit, precision=0, minimum=0, label="Examples per task (0 = all)", scale=1
        )
        dense = gr.Checkbox(True, label="Also the dense model", scale=1)
    estimate_md = gr.Markdown(estimate_text(engine, ["boolq", "rte"], defaults.task_limit, True))
    button = gr.Button("Run tasks", variant="primary", size="lg")
    status = gr.Markdown()
    with gr.Row():
        results = gr.Dataframe(headers=HEADERS, label="Accuracy (%)", interactive=False)
        chart = figure_box("Dense vs pruned")
    with gr.Accordion("Raw result (JSON)", open=False):
        raw = gr.JSON()
    for component in (tasks, limit, dense):
        component.change(estimate, [tasks, limit, dense], estimate_md, api_name=False, **LIGHT)
    button.click(estimate, [tasks, limit, dense], estimate_md, api_name="tasks_estimate", **LIGHT).then(
        run_tasks, [tasks, limit, dense, session], [results, chart, status, raw], api_name="tasks", **HEAVY
    )
