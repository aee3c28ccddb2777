"""The main tab: pick a model, set per-role sliders, prune and evaluate, compare runs.

Handlers build a ``Recipe`` from the widgets (``ui.recipes``) and hand it to ``Lab.run`` in a job
thread; the Lab's progress events stream back through generator yields, and the perplexity
windows among them fill the table as they arrive.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial

import gradio as gr

from evaluation.lab import RunResult
from evaluation.perplexity import dataset_label
from evaluation.share import scrub
from evaluation.speed import measure_24, semi_structured_support
from prune.errors import LabError
from prune.jobs import job_size
from prune.progress import Event
from prune.recipe import Recipe
from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES
from prune.structured import STRUCTURED
from runtime import memory
from runtime.models import choose_dtype, config_source, resolve_device
from runtime.paths import data_dir
from ui import plots
from ui.common import HEAVY, LIGHT, PROGRESS, LabTab, figure_box, no_api, user_errors
from ui.engine import Engine
from ui.hosting import Limits, does_not_fit
from ui.recipes import (
    CALIBRATION_CHOICES,
    EVAL_CHOICES,
    LAYER_SCHEDULE_CHOICES,
    METHOD_CHOICES,
    REFINE_CHOICES,
    STATS_CHOICES,
    STRUCTURES,
    Controls,
    Defaults,
    build_recipe,
    millions,
    preset,
    readout,
    recipe_summary,
)
from ui.registry import MODEL_CHOICES
from ui.sessions import Session
from ui.uploads import text_upload

PPL_HEADERS = ["dataset", "dense", "pruned", "pruned / dense", "windows x tokens"]
# What a run's status line says for the stage of an event (``prune.progress.Event.stage``).
STAGE_LABELS = {
    "load": "Model",
    "calibration": "Pruning",
    "statistics": "Pruning",
    "prune": "Pruning",
    "perplexity": "Evaluating",
}
HISTORY_WIDTHS = ["6%", "38%", "9%", "10%", "20%", "9%", "8%"]
HISTORY_HEADERS = [
    "run",
    "recipe",
    "sparsity %",
    "pruned weights",
    "perplexity (dense -> pruned)",
    "calibration pass",
    "seconds",
]
PLAN_SETTINGS = (
    "method",
    "refine",
    "stats_mode",
    "nsamples",
    "seqlen",
    "eval_datasets",
    "eval_windows",
    "eval_seqlen",
)
ROLE_INFO = {
    "q": "query",
    "k": "key",
    "v": "value",
    "o": "output",
    "gate": "MLP gate",
    "up": "MLP up",
    "down": "MLP down",
}


# Read aloud in a classroom: what the page does, in the words of its controls.
WHAT_IS_HAPPENING = """\
### What is happening
**Wanda** gives every weight a score, **S<sub>ij</sub> = |W<sub>ij</sub>| · ‖X<sub>j</sub>‖<sub>2</sub>**:
its size times the strength (L2 norm) of its input X<sub>j</sub> over the calibration tokens.
In each output row, the weights with the lowest scores are set to zero, as many as the slider asks.
Nothing is retrained.

**Perplexity** (lower is better) is exp of the mean next-token loss on WikiText-2 or C4 windows,
about how many tokens the model hesitates between. **Task accuracy** (Downstream tab) is the share
of multiple-choice questions where the model ranks the right answer first; chance differs per task
(50 % with two choices, 25 % with four).

**The text changes** because zeroed weights change the next-token probabilities: greedy decoding
takes the likeliest token, so after the first different choice the answer goes its own way.
"""


# ----- model ---------------------------------------------------------------------------------------
def model_markdown(engine: Engine, session: Session | None = None) -> str:
    """Parameters, per-role counts, device and dtype of the session's model (its memory is in the
    plan above it)."""
    if engine.lab is None:
        return "No model loaded."
    info = engine.info(session)
    rows = "\n".join(
        f"| {role} | {info['layer_role_parameters'][role] / 1e6:.2f} M | {count / 1e6:.1f} M |"
        for role, count in info["role_parameters"].items()
    )
    missing = [r for r in ROLES if r not in info["role_parameters"]]
    absent = f"  \nNo {', '.join(missing)} role in this architecture." if missing else ""
    return (
        f"**{engine.hosting.display(info['name'])}** · {info['architecture']}, {info['layers']} layers · "
        f"**{millions(info['parameters'])} parameters** · {info['device']} · {info['dtype']}"
        f"{dtype_note(info)}{absent}\n\n"
        f"| role | per layer | all layers |\n|---|---|---|\n{rows}"
    )


def refresh(engine: Engine, session: Session | None = None) -> list:
    """Everything that depends on the session's model: info, slider visibility, layer range."""
    if engine.lab is None:
        return [model_markdown(engine)] + [gr.skip()] * (len(ROLES) + 5)
    shape = engine.shape(session)
    last = shape.num_layers - 1
    has_attention = any(r in shape.roles for r in ATTENTION_ROLES)
    has_mlp = any(r in shape.roles for r in MLP_ROLES)
    return [
        model_markdown(engine, session),
        *[gr.Slider(visible=role in shape.roles) for role in ROLES],
        gr.Slider(visible=has_attention),
        gr.Slider(visible=has_mlp),
        gr.Slider(maximum=last, value=0),
        gr.Slider(maximum=last, value=last),
        gr.Dropdown(value=engine.hosting.display(shape.name)),
    ]


def dtype_note(info: dict) -> str:
    """Why the model is in its dtype (auto picks per device), small, after the dtype."""
    return f" <small>({info['dtype_reason']})</small>" if info["dtype_reason"] else ""


def memory_plan_markdown(engine: Engine, name: str, recipe: Recipe) -> str:
    """The memory plan for model ``name`` on this server's device, with ``recipe``'s calibration and
    evaluation, from the model's config alone (no weights): the choice and its total on two lines,
    what goes where folded away; empty when there is none to show: a model not offered here, an
    offline model not converted yet, a hub id without the hub."""
    try:
        source, token_ok = engine.hosting.resolve(name)
        config = config_source(source)
        if config is None:
            return ""
        device = resolve_device(engine.device)
        sessions = max(1, engine.sessions.live())
        workload = memory.Workload.for_recipe(recipe, memory.default_batch_size(device), sessions)
        dtype, _ = choose_dtype(engine.dtype, device)
        plan = memory.plan_for_source(config, dtype, device, workload, token=None if token_ok else False)
    except memory.ConfigUnavailable:
        return ""
    except memory.DoesNotFit as err:
        return f"**Memory plan:** {unbroken(does_not_fit(engine.hosting.display(name), err))}"
    except LabError:
        return ""
    rows = "".join(
        f'<tr><td class="size">{unbroken(memory.size_text(r.bytes))}</td><td class="place">{r.where}</td>'
        f"<td>{unbroken(r.item)}</td></tr>"
        for r in plan.rows
        if r.counted
    )
    return (
        f"**Memory plan:** {plan.headline()}  \n<small>{unbroken(plan.reason)}</small>\n\n"
        f"<details><summary>What it holds, where</summary><table><tbody>{rows}</tbody></table>"
        f"<small>Total: {unbroken(plan.totals_text())}; weights in "
        f"{str(dtype).replace('torch.', '')}.</small></details>"
    )


UNIT = re.compile(r"(\d) (GiB|MiB|KiB|B)\b")


def unbroken(text: str) -> str:
    """Sizes that cannot wrap between number and unit (a no-break space): '1.2\u00a0GiB'."""
    return UNIT.sub("\\1\u00a0\\2", text)


def make_plan_handler(engine: Engine):
    @user_errors
    def memory_plan(choice: str, custom: str, **values) -> str:
        """The memory plan for the model picked (not loaded yet) with the settings on the page."""
        try:
            recipe = build_recipe(Controls.from_values(values), engine.shape())
        except LabError:
            return ""
        return memory_plan_markdown(engine, (custom or "").strip() or (choice or "").strip(), recipe)

    return memory_plan


# ----- results -------------------------------------------------------------------------------------
def ppl_rows(live: dict[str, dict]) -> list[list]:
    """The perplexity table while windows arrive and at the end (``live``: dataset label -> cell)."""
    rows = []
    for label, cell in live.items():
        dense, pruned = cell.get("dense"), cell.get("pruned")
        ratio = f"{pruned / dense:.2f}x" if dense and pruned else ""
        rows.append(
            [
                label,
                _fmt(dense, cell.get("dense_at")),
                _fmt(pruned, cell.get("pruned_at")),
                ratio,
                cell.get("size", ""),
            ]
        )
    return rows


def _fmt(value: float | None, at: str | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" + (f" (window {at})" if at else "")


def run_summary(result: RunResult, session: Session, lab_passes: int) -> dict:
    """What the API returns and the history records for one run."""
    prune = result.prune
    return {
        "run": session.runs,
        "model": result.recipe.model,
        "recipe": result.recipe.to_dict(),
        "summary": recipe_summary(result.recipe),
        "stats_source": prune.stats_source,
        "calibration_passes": prune.calibration_passes,
        "lab_calibration_passes": lab_passes,
        "calibration": prune.calibration,
        "timings": {k: round(v, 3) for k, v in prune.timings.items()},
        "report": prune.report.to_dict(),
        "pruned": prune.report.pruned,
        "linear_sparsity": prune.report.linear_sparsity,
        "perplexity": {
            ds: {which: r.perplexity for which, r in pair.items()} for ds, pair in result.perplexity.items()
        },
        "evaluation": {
            ds: {which: r.to_dict() for which, r in pair.items()} for ds, pair in result.perplexity.items()
        },
        "seconds": round(result.seconds, 3),
    }


def status_markdown(summary: dict) -> str:
    report = summary["report"]
    t = summary["timings"]
    if summary["stats_source"] == "none":
        calibration = "no calibration needed (magnitude pruning)"
    elif summary["calibration_passes"]:
        cal = summary["calibration"]
        calibration = (
            f"**{summary['calibration_passes']} calibration pass** ({cal['source']}, "
            f"{cal['nsamples']} x {cal['seqlen']} tokens, statistics: {summary['stats_source']})"
        )
    else:
        calibration = f"**no calibration pass**: reused statistics ({summary['stats_source']})"
    timing = " · ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in t.items())
    notes = {r["note"] for pair in summary["evaluation"].values() for r in pair.values() if r.get("note")}
    lines = [
        f"### Run #{summary['run']}: {100 * report['linear_sparsity']:.1f} % of attention + MLP weights "
        f"pruned ({millions(report['pruned'])} of {millions(report['linear_params'])}; "
        f"{100 * report['total_sparsity']:.1f} % of all parameters)",
        f"{summary['summary']}  \nCalibration: {calibration}  \n"
        f"Pruning: {timing} · whole run {summary['seconds']:.1f} s",
        *[f"Note: {n}" for n in sorted(notes)],
    ]
    return "\n\n".join(lines)


def history_rows(history: list[dict]) -> list[list]:
    rows = []
    for run in history:
        ppl = "; ".join(
            f"{dataset_label(ds)} {p.get('dense', 0):.1f} -> {p['pruned']:.1f}"
            for ds, p in run["perplexity"].items()
        )
        rows.append(
            [
                run["run"],
                run["summary"],
                round(100 * run["linear_sparsity"], 2),
                millions(run["pruned"]),
                ppl,
                "yes" if run["calibration_passes"] else "no",
                round(run["seconds"], 1),
            ]
        )
    return rows


# ----- handlers ------------------------------------------------------------------------------------
def make_handlers(engine: Engine):
    """Handler functions bound to one engine (named parameters become API parameter names)."""

    @user_errors
    def load_model(choice: str, custom: str, session: Session, progress=PROGRESS) -> Iterator[list]:
        yield from switch_model(engine, choice, custom, session, progress)

    @user_errors
    def live_readout(
        session: Session, *, calibration_file: str | None = None, eval_file: str | None = None, **values
    ) -> str:
        controls = Controls.from_values(
            {**values, "calibration_file": calibration_file, "eval_file": eval_file}
        )
        session.note_uploads(calibration_file, eval_file)
        shape = engine.shape(session)
        return readout(build_recipe(controls, shape), shape, engine.num_parameters(session))

    @user_errors
    def apply_preset(name: str, level: float, session: Session) -> list:
        values = preset(name, level, engine.shape(session))
        return [values[role] for role in ROLES]

    @user_errors
    def prune_and_evaluate(
        session: Session,
        progress=PROGRESS,
        *,
        calibration_file: str | None = None,
        eval_file: str | None = None,
        **values,
    ) -> Iterator[list]:
        controls = Controls.from_values(
            {**values, "calibration_file": calibration_file, "eval_file": eval_file}
        )
        recipe = checked_recipe(engine, session, controls)
        live: dict[str, dict] = {dataset_label(ds): {} for ds in recipe.evaluation.datasets}
        skip = [gr.skip()] * 5

        def work(emit):
            result = engine.run(session, recipe, lambda event: emit("progress", event))
            return result, engine.lab.calibration_passes  # jobs run one at a time: nothing ran between

        yield ["Waiting for the model ...", ppl_rows(live)] + skip
        for kind, payload in engine.heavy(session, work, job_size(recipe, "run")):
            if kind == "queue":
                yield [waiting_text(payload), gr.skip()] + skip
            elif kind == "started":
                yield ["Running: your job has the model ...", gr.skip()] + skip
            elif kind == "progress":
                event: Event = payload
                progress(event.fraction, desc=event.message)
                if event.stage == "perplexity" and event.value is not None:
                    cell = live.setdefault(event.dataset, {})
                    cell[event.which] = event.value
                    cell[f"{event.which}_at"] = f"{event.step}/{event.steps}"
                    yield [f"Evaluating: {event.message}", ppl_rows(live)] + skip
                elif event.stage in STAGE_LABELS:
                    yield [f"{STAGE_LABELS[event.stage]}: {event.message}", gr.skip()] + skip
        result, lab_passes = payload
        summary = visible_summary(engine, run_summary(result, session, lab_passes))
        for ds, pair in result.perplexity.items():
            live[dataset_label(ds)] = {
                **{which: r.perplexity for which, r in pair.items()},
                "size": f"{pair['pruned'].windows} x {pair['pruned'].seqlen}",
            }
            engine.note_throughput(pair["pruned"].tokens_per_s)
        session.last = summary
        session.history.append(summary)
        yield [
            status_markdown(summary),
            ppl_rows(live),
            plots.render(plots.role_bars, summary["report"]),
            plots.render(plots.layer_heatmap, summary["report"]),
            summary,
            history_rows(session.history),
            plots.render(plots.history_plot, session.history),
        ]

    @user_errors
    def clear_history(session: Session) -> list:
        session.history.clear()
        return [history_rows(session.history), plots.render(plots.history_plot, session.history)]

    return load_model, live_readout, apply_preset, prune_and_evaluate, clear_history


# ----- measuring a kept state again ----------------------------------------------------------------
def make_measure_handler(engine: Engine):
    @user_errors
    def measure_again(session: Session) -> Iterator[list]:
        """Pruned perplexity of this session's kept state, on the windows of its last run: the same
        weights as that run, whatever other sessions pruned since."""
        if session.recipe is None:
            raise gr.Error("Nothing pruned in this session yet: press 'Prune & evaluate' first.")
        evaluation = session.recipe.evaluation

        def work(emit):
            with engine.pruned(session):
                lab = engine.lab
                return {
                    ds: lab.perplexity(ds, evaluation.seqlen, evaluation.max_windows).perplexity
                    for ds in evaluation.datasets
                }

        yield ["Waiting for the model ...", gr.skip()]
        for kind, payload in engine.heavy(session, work, job_size(session.recipe, "run", dense=False)):
            if kind == "queue":
                yield [waiting_text(payload), gr.skip()]
            elif kind == "started":
                yield ["Measuring: your job has the model ...", gr.skip()]
        text = ", ".join(f"{dataset_label(ds)} {ppl:.3f}" for ds, ppl in payload.items())
        yield [
            engine.noted(session, f"Run #{session.runs} measured again: pruned perplexity {text}"),
            payload,
        ]

    return measure_again


# ----- measured 2:4 ---------------------------------------------------------------------------------
def speed_note(structure: str):
    """The line under the structure choice: whether this server can time 2:4 kernels."""
    if structure == "unstructured":
        return gr.Markdown(visible=False)
    if structure in STRUCTURED:
        text = (
            f"{structure}: whole units go (attention and MLP sliders: heads / kv groups and MLP channels "
            "removed; depth: every slider at the fraction of layers), so the matrices really shrink "
            "and the model runs faster; `python -m prune --speed` times it against the dense model."
        )
        return gr.Markdown(f"<small>{text}</small>", visible=True)
    ok, why = semi_structured_support()
    if not ok:
        text = why
    elif structure != "2:4":
        text = "Only 2:4 has sparse GPU kernels; choose 2:4 to measure its speed after the run."
    else:
        text = f"2:4 kernels run on this {why}: after the run, press **Measure 2:4 speed** under the results."
    return gr.Markdown(f"<small>{text}</small>", visible=True)


def make_speed_handler(engine: Engine):
    @user_errors
    def measure_speed(session: Session) -> Iterator[str]:
        """Prefill and decode tokens/s and weight memory of this session's 2:4 model, dense format
        vs 2:4 format, measured now on this GPU."""
        ok, why = semi_structured_support()
        if not ok:
            yield why
            return
        yield "Measuring 2:4 speed (dense format, then 2:4 format) ..."

        def work(emit):
            with engine.pruned(session) as model:
                return measure_24(model, engine.ensure(session).loaded.roles)

        for kind, payload in engine.heavy(session, work, None):
            if kind == "queue":
                yield f"Waiting for the model ({payload} jobs ahead) ..."
            elif kind == "done":
                yield engine.noted(session, "  \n".join(payload.lines()))

    return measure_speed


# ----- layout --------------------------------------------------------------------------------------
def _slider(
    label: str, value: float, visible: bool = True, info: str | None = None, step: float = 1
) -> gr.Slider:
    return gr.Slider(0, 100, value=value, step=step, label=label, info=info, visible=visible)


def build(engine: Engine, defaults: Defaults) -> LabTab:
    """Lay out the Prune tab and wire its events."""
    shape = engine.shape()
    # A plain function, not the bound method: Gradio deep-copies the page config (with this callback)
    # for every page view, and a bound method would drag the engine and its model along.
    session = gr.State(Session(), delete_callback=lambda state: engine.sessions.forget(state))
    load_model, live_readout, apply_preset, prune_and_evaluate, clear_history = make_handlers(engine)
    measure_speed = make_speed_handler(engine)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown(WHAT_IS_HAPPENING, elem_id="what-is-happening")
            gr.Markdown("## 1 · Model")
            model_choice, model_text = model_widgets(engine, shape.name)
            load_btn = gr.Button("Load model", variant="secondary")
            start = Controls(
                nsamples=defaults.nsamples,
                seqlen=defaults.seqlen,
                eval_windows=defaults.eval_windows,
                eval_seqlen=defaults.eval_seqlen,
            )
            plan_md = gr.Markdown(
                memory_plan_markdown(engine, shape.name, build_recipe(start, shape)), elem_id="memory-plan"
            )
            model_md = gr.Markdown(model_markdown(engine), elem_classes=["model-info"])
        with gr.Column(scale=3, min_width=480, elem_id="controls-column"):
            gr.Markdown("## 2 · Sparsity per module")
            with gr.Row():
                master = _slider("All roles", 50, info="and the level of the presets below")
                attention = _slider(
                    "Attention", 50, any(r in shape.roles for r in ATTENTION_ROLES), "q k v o"
                )
                mlp = _slider("MLP", 50, any(r in shape.roles for r in MLP_ROLES), "gate up down")
            with gr.Row():
                preset_buttons = {
                    "uniform": gr.Button("Uniform", size="sm"),
                    "attention": gr.Button("Attention only", size="sm"),
                    "mlp": gr.Button("MLP only", size="sm"),
                    "equal": gr.Button("Same # pruned: attention = MLP", size="sm"),
                }
            with gr.Row():
                sliders = {
                    r: _slider(r, 50, r in shape.roles, ROLE_INFO[r], step=0.1) for r in ATTENTION_ROLES
                }
            with gr.Row():
                sliders.update(
                    {r: _slider(r, 50, r in shape.roles, ROLE_INFO[r], step=0.1) for r in MLP_ROLES}
                )
            readout_md = gr.Markdown(elem_classes=["readout"])
            with gr.Row():
                method = gr.Dropdown(METHOD_CHOICES, value="wanda", label="Method")
                structure = gr.Radio(STRUCTURES, value="unstructured", label="Structure")
                permute = gr.Checkbox(
                    False, label="Channel permutation", info="RIA's, before N:M (ria, ria-row)"
                )
                refine = gr.Dropdown(REFINE_CHOICES, value="none", label="Refine the mask")
            speed_md = gr.Markdown(visible=False, elem_id="speed-note")
            with gr.Row():
                layer_first = gr.Slider(0, shape.num_layers - 1, value=0, step=1, label="First pruned layer")
                layer_last = gr.Slider(
                    0, shape.num_layers - 1, value=shape.num_layers - 1, step=1, label="Last pruned layer"
                )
            with gr.Accordion("Calibration and evaluation settings", open=False, elem_id="settings"):
                with gr.Row():
                    calibration = gr.Radio(CALIBRATION_CHOICES, value="c4", label="Calibration data")
                    stats_mode = gr.Radio(STATS_CHOICES, value="cached", label="Statistics")
                with gr.Row():
                    layer_schedule = gr.Dropdown(
                        LAYER_SCHEDULE_CHOICES,
                        value="uniform",
                        label="Layer schedule",
                        info="OWL: same total, fewer pruned in layers with outlier scores (unstructured)",
                    )
                    owl_m = gr.Number(5.0, minimum=0, label="OWL M (outlier: score > M x mean)")
                    owl_lambda = gr.Number(0.08, minimum=0, maximum=0.5, label="OWL λ (layer spread)")
                with gr.Row():
                    nsamples = gr.Number(
                        defaults.nsamples,
                        precision=0,
                        minimum=1,
                        label="Calibration samples",
                        elem_id="nsamples",
                    )
                    seqlen = gr.Number(
                        defaults.seqlen, precision=0, minimum=2, label="Tokens per sample", elem_id="seqlen"
                    )
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                with gr.Row():
                    eval_datasets = gr.CheckboxGroup(EVAL_CHOICES, value=["wikitext2"], label="Perplexity on")
                    eval_windows = gr.Number(
                        defaults.eval_windows,
                        precision=0,
                        minimum=0,
                        label="Windows (0 = whole test set)",
                        elem_id="eval-windows",
                    )
                    eval_seqlen = gr.Number(
                        defaults.eval_seqlen,
                        precision=0,
                        minimum=2,
                        label="Tokens per window",
                        elem_id="eval-seqlen",
                    )
                with gr.Row():
                    public = engine.hosting.public
                    calibration_file = text_upload(
                        public, label="Calibration text ('uploaded file')", height=130
                    )
                    eval_file = text_upload(public, label="Perplexity text ('uploaded file')", height=130)
            with gr.Row():
                run_btn = gr.Button(
                    "Prune & evaluate", variant="primary", size="lg", elem_id="prune-button", scale=3
                )
                cancel_btn = gr.Button("Cancel", variant="stop", size="lg", scale=1, elem_id="cancel-button")
            limits_markdown(engine)
    gr.Markdown("## 3 · Results")
    status_md = gr.Markdown(
        "Press **Prune & evaluate**: dense and pruned perplexity appear window by window.",
        elem_id="run-status",
    )
    ppl_table = gr.Dataframe(
        headers=PPL_HEADERS, label="Perplexity (lower is better)", interactive=False, elem_id="ppl-table"
    )
    with gr.Row():
        role_plot = figure_box("Sparsity per role")
        heat_plot = figure_box("Sparsity per layer")
    with gr.Accordion("Raw result (JSON)", open=False):
        result_json = gr.JSON(label="Last run")
    with gr.Row():
        measure_btn = gr.Button("Measure again", size="sm", scale=0, min_width=200)
        measure_md = gr.Markdown(elem_id="measure-result")
        measure_json = gr.JSON(visible=False)
    with gr.Row(visible=semi_structured_support()[0]):
        speed_btn = gr.Button("Measure 2:4 speed", size="sm", scale=0, min_width=200)
        speed_result = gr.Markdown(elem_id="speed-result")
    gr.Markdown("## 4 · This session's runs")
    history_table = gr.Dataframe(
        headers=HISTORY_HEADERS, label="History", interactive=False, wrap=True, column_widths=HISTORY_WIDTHS
    )
    with gr.Row():
        history_fig = figure_box("Perplexity vs pruned weights")
        clear_btn = gr.Button("Clear history", size="sm", scale=0, min_width=160)

    controls = {
        **sliders,
        "method": method,
        "structure": structure,
        "permute": permute,
        "refine": refine,
        "layer_first": layer_first,
        "layer_last": layer_last,
        "calibration": calibration,
        "calibration_file": calibration_file,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "stats_mode": stats_mode,
        "layer_schedule": layer_schedule,
        "owl_m": owl_m,
        "owl_lambda": owl_lambda,
        "eval_datasets": eval_datasets,
        "eval_file": eval_file,
        "eval_windows": eval_windows,
        "eval_seqlen": eval_seqlen,
    }
    role_sliders = [sliders[r] for r in ROLES]
    refresh_outputs = [model_md, *role_sliders, attention, mlp, layer_first, layer_last, model_choice]
    readout_event = dict(
        fn=live_readout,
        inputs=[session],
        inputs_kwargs=controls,
        outputs=readout_md,
        api_name="readout",
        **LIGHT,
    )

    load_btn.click(
        load_model, [model_choice, model_text, session], refresh_outputs, api_name="load_model", **HEAVY
    ).success(**no_api(readout_event))
    for name, button in preset_buttons.items():
        button.click(
            partial(apply_preset, name), [master, session], role_sliders, api_name=f"preset_{name}", **LIGHT
        ).then(**no_api(readout_event))
    _group(master, role_sliders + [attention, mlp]).then(**no_api(readout_event))
    _group(attention, [sliders[r] for r in ATTENTION_ROLES]).then(**no_api(readout_event))
    _group(mlp, [sliders[r] for r in MLP_ROLES]).then(**no_api(readout_event))
    triggers = [c.input for c in [*role_sliders, method, structure, permute, refine, layer_first, layer_last]]
    gr.on(triggers, **readout_event)
    run_btn.click(
        prune_and_evaluate,
        inputs=[session],
        inputs_kwargs=controls,
        outputs=[status_md, ppl_table, role_plot, heat_plot, result_json, history_table, history_fig],
        api_name="prune",
        **HEAVY,
    )
    gr.on(
        [model_choice.change, model_text.submit] + [controls[name].change for name in PLAN_SETTINGS],
        make_plan_handler(engine),
        inputs=[model_choice, model_text],
        inputs_kwargs=controls,
        outputs=plan_md,
        api_name=False,
        **LIGHT,
    )
    clear_btn.click(clear_history, [session], [history_table, history_fig], api_name="clear_history", **LIGHT)
    measure_btn.click(
        make_measure_handler(engine), [session], [measure_md, measure_json], api_name="measure", **HEAVY
    )
    wire_cancel(engine, cancel_btn, session)
    structure.change(speed_note, structure, speed_md, api_name=False, **LIGHT)
    speed_btn.click(measure_speed, [session], speed_result, api_name="measure_24", **HEAVY)
    return LabTab(session, model_md, sliders, controls, readout_md, refresh_outputs, readout_event)


def _group(source: gr.Slider, targets: list[gr.Slider]):
    """A group slider copies its value to the sliders it stands for."""
    return source.input(lambda value: [value] * len(targets), source, targets, api_name=False, **LIGHT)


def data_line(engine: Engine) -> str:
    folder = data_dir()
    if folder and engine.hosting.public:
        data = "offline data"  # no server paths for visitors
    else:
        data = f"offline data folder `{folder}`" if folder else "datasets from the Hugging Face Hub"
    hub = (
        "hub unreachable: offline models, local folders and the hub cache only"
        if engine.offline
        else "hub reachable"
    )
    return f"Data: {data} · {hub}"


# ----- hosting: session-owned model choice, limits, cancel (issue 9) -------------------------------
def model_widgets(engine: Engine, current: str) -> tuple[gr.Dropdown, gr.Textbox]:
    """The model picker: the host's list when public (typed ids only if the host allows them)."""
    hosting = engine.hosting
    if not hosting.public:
        choice = gr.Dropdown(
            MODEL_CHOICES,
            value=current,
            label="Model",
            allow_custom_value=True,
            info="offline models work without internet; hub ids need access",
        )
        text = gr.Textbox(label="or any hub id / local folder", placeholder="org/name or /path/to/model")
        return choice, text
    labels = dict((value, label) for label, value in MODEL_CHOICES)
    choices = [(labels.get(name, name), name) for name in hosting.allowed()]
    current = hosting.display(current)
    choice = gr.Dropdown(
        choices,
        value=current if current in hosting.allowed() else choices[0][1],
        label="Model",
        allow_custom_value=True,  # anything else gets the one refusal message from Hosting.resolve
        info="your choice is yours alone: other visitors keep theirs",
    )
    text = gr.Textbox(
        label="or a public hub id (org/name)",
        placeholder="org/name",
        visible=hosting.allow_custom,
    )
    return choice, text


CHOICE_FIELDS = ("model", "token_ok", "state", "evicted", "recipe", "masks_model")  # what a switch changes


def switch_model(engine: Engine, choice: str, custom: str, session: Session, progress) -> Iterator[list]:
    """This session's model becomes ``custom or choice`` (checked against the hosting profile); the
    model is loaded now, as a job, so the page shows it. Nobody else's work changes."""
    name = (custom or "").strip() or (choice or "").strip()
    skip = [gr.skip()] * (len(ROLES) + 5)
    engine.sessions.touch(session)
    previous = {name: getattr(session, name) for name in CHOICE_FIELDS}
    wanted = engine.hosting.display(engine.choose(session, name))  # refused at once, one message
    yield [f"Loading **{wanted}** ..."] + skip

    def work(emit):
        return engine.ensure(session, lambda e: emit("progress", e))

    try:
        for kind, payload in engine.heavy(session, work, None):
            if kind == "queue":
                yield [waiting_text(payload)] + skip
            elif kind == "progress":
                progress(0.5, desc=payload.message)
                yield [f"Loading **{wanted}**: {payload.message}"] + skip
    except Exception:
        for name, value in previous.items():  # a failed load leaves the session as it was
            setattr(session, name, value)
        yield refresh(engine, session) if session.model in (None, *engine.known) else [gr.skip()] + skip
        raise
    gr.Info(f"Loaded {wanted} for you in {engine.last_load_s:.1f} s" if engine.swaps else f"Loaded {wanted}")
    yield refresh(engine, session)


def checked_recipe(engine: Engine, session: Session, controls: Controls):
    """The recipe for this session's model, refused before anything runs when over a limit."""
    session.note_uploads(controls.calibration_file, controls.eval_file)
    recipe = build_recipe(controls, engine.shape(session))
    engine.hosting.limits.check(job_size(recipe, "run"))
    return recipe


def visible_summary(engine: Engine, summary: dict) -> dict:
    """The run summary a visitor sees: uploaded files by name, never by their server path."""
    return scrub(summary) if engine.hosting.public else summary


def waiting_text(ahead: int) -> str:
    return f"Waiting for the model: {ahead} job{'s' if ahead != 1 else ''} ahead of yours ..."


def limits_markdown(engine: Engine) -> gr.Markdown:
    limits: Limits = engine.hosting.limits
    return gr.Markdown(limits.describe(), elem_id="limits", visible=bool(limits.describe()))


def wire_cancel(engine: Engine, button: gr.Button, session: gr.State) -> None:
    """The Cancel button stops this session's jobs (the queue lets go within a moment); ``/cancel``
    does the same for API clients."""

    @user_errors
    def cancel(session: Session) -> None:
        count = engine.sessions.cancel(session)
        gr.Info(f"Cancelled {count} job{'s' if count != 1 else ''}." if count else "Nothing to cancel.")

    button.click(cancel, [session], None, api_name="cancel", **LIGHT)
