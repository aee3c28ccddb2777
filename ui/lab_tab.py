"""The main tab: pick a model, set per-role sliders, prune and evaluate, compare runs.

Handlers build a ``Recipe`` from the widgets (``ui.recipes``) and hand it to ``Lab.run`` in a job
thread; the Lab's progress events stream back through generator yields, and the perplexity
windows among them fill the table as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import gradio as gr

from evaluation.lab import RunResult
from evaluation.perplexity import dataset_label
from prune.paths import data_dir
from prune.progress import Event
from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES
from ui import plots
from ui.common import HEAVY, LIGHT, PROGRESS, LabTab, figure_box, no_api, user_errors
from ui.engine import MODEL_CHOICES, Engine, Session, run_job
from ui.recipes import (
    CALIBRATION_CHOICES,
    EVAL_CHOICES,
    METHOD_CHOICES,
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

TEXT_FILES = [".txt", ".jsonl", ".json", ".parquet"]
PPL_HEADERS = ["dataset", "dense", "pruned", "pruned / dense", "windows x tokens"]
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
ROLE_INFO = {
    "q": "query",
    "k": "key",
    "v": "value",
    "o": "output",
    "gate": "MLP gate",
    "up": "MLP up",
    "down": "MLP down",
}


# ----- model ---------------------------------------------------------------------------------------
def model_markdown(engine: Engine) -> str:
    """Parameters, per-role counts, device, dtype and memory of the loaded model."""
    if engine.lab is None:
        return "No model loaded."
    info = engine.info()
    mem = info["memory"]
    rows = "\n".join(
        f"| {role} | {info['layer_role_parameters'][role] / 1e6:.2f} M | {count / 1e6:.1f} M |"
        for role, count in info["role_parameters"].items()
    )
    missing = [r for r in ROLES if r not in info["role_parameters"]]
    absent = f"  \nNo {', '.join(missing)} role in this architecture." if missing else ""
    return (
        f"**{info['name']}** · {info['architecture']}, {info['layers']} layers · "
        f"**{millions(info['parameters'])} parameters** · {info['device']} · {info['dtype']}\n\n"
        f"Memory: weights {mem['weights_bytes'] / 2**30:.2f} GiB on {info['device']} + dense copy "
        f"{mem['dense_copy_bytes'] / 2**30:.2f} GiB ({mem['dense_copy_on']}, makes pruning reversible) + "
        f"{mem['session_masks_bytes'] / 2**20:.0f} MiB of masks per session{absent}\n\n"
        f"| role | per layer | all layers |\n|---|---|---|\n{rows}"
    )


def refresh(engine: Engine) -> list:
    """Everything that depends on which model is loaded: info, slider visibility, layer range."""
    if engine.lab is None:
        return [model_markdown(engine)] + [gr.skip()] * (len(ROLES) + 5)
    shape = engine.shape()
    last = shape.num_layers - 1
    has_attention = any(r in shape.roles for r in ATTENTION_ROLES)
    has_mlp = any(r in shape.roles for r in MLP_ROLES)
    return [
        model_markdown(engine),
        *[gr.Slider(visible=role in shape.roles) for role in ROLES],
        gr.Slider(visible=has_attention),
        gr.Slider(visible=has_mlp),
        gr.Slider(maximum=last, value=0),
        gr.Slider(maximum=last, value=last),
        gr.Dropdown(value=shape.name),
    ]


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
        name = (custom or "").strip() or (choice or "").strip()
        skip = [gr.skip()] * (len(ROLES) + 5)
        yield [f"Loading **{name}** ..."] + skip
        try:
            for kind, payload in run_job(lambda emit: engine.load(name, lambda e: emit("progress", e))):
                if kind == "progress":
                    progress(0.5, desc=payload.message)
                    yield [f"Loading **{name}**: {payload.message}"] + skip
        except Exception:
            yield refresh(engine)  # the previous model still serves: show it again, then the message
            raise
        gr.Info(f"Loaded {name}")
        yield refresh(engine)

    @user_errors
    def live_readout(*, calibration_file: str | None = None, eval_file: str | None = None, **values) -> str:
        controls = Controls.from_values(
            {**values, "calibration_file": calibration_file, "eval_file": eval_file}
        )
        shape = engine.shape()
        return readout(build_recipe(controls, shape), shape, engine.require().loaded.num_parameters())

    @user_errors
    def apply_preset(name: str, level: float) -> list:
        values = preset(name, level, engine.shape())
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
        lab = engine.require()
        recipe = build_recipe(controls, engine.shape())
        if session.masks is not None and session.model_token != engine.token:
            gr.Warning(
                f"The lab's model is now {recipe.model}; earlier runs of this session were on another model."
            )
        live: dict[str, dict] = {dataset_label(ds): {} for ds in recipe.evaluation.datasets}
        skip = [gr.skip()] * 5

        def work(emit):
            result = engine.run(session, recipe, lambda event: emit("progress", event))
            return result, lab.calibration_passes  # heavy jobs queue one at a time: nothing ran between

        yield ["Waiting for the model ...", ppl_rows(live)] + skip
        for kind, payload in run_job(work):
            if kind == "progress":
                event: Event = payload
                progress(event.fraction, desc=event.message)
                if event.stage == "perplexity" and event.value is not None:
                    cell = live.setdefault(event.dataset, {})
                    cell[event.which] = event.value
                    cell[f"{event.which}_at"] = f"{event.step}/{event.steps}"
                    yield [f"Evaluating: {event.message}", ppl_rows(live)] + skip
                elif event.fraction <= 0.5:
                    yield [f"Pruning: {event.message}", gr.skip()] + skip
        result, lab_passes = payload
        summary = run_summary(result, session, lab_passes)
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


# ----- layout --------------------------------------------------------------------------------------
def _slider(
    label: str, value: float, visible: bool = True, info: str | None = None, step: float = 1
) -> gr.Slider:
    return gr.Slider(0, 100, value=value, step=step, label=label, info=info, visible=visible)


def build(engine: Engine, defaults: Defaults) -> LabTab:
    """Lay out the Prune tab and wire its events."""
    shape = engine.shape()
    session = gr.State(Session())
    load_model, live_readout, apply_preset, prune_and_evaluate, clear_history = make_handlers(engine)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            gr.Markdown("## 1 · Model")
            model_choice = gr.Dropdown(
                MODEL_CHOICES,
                value=shape.name,
                label="Model",
                allow_custom_value=True,
                info="offline models work without internet; hub ids need access",
            )
            model_text = gr.Textbox(
                label="or any hub id / local folder", placeholder="org/name or /path/to/model"
            )
            load_btn = gr.Button("Load model", variant="secondary")
            model_md = gr.Markdown(model_markdown(engine), elem_classes=["model-info"])
        with gr.Column(scale=3, min_width=480):
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
                    calibration_file = gr.File(
                        label="Calibration text ('uploaded file')",
                        type="filepath",
                        file_types=TEXT_FILES,
                        height=130,
                    )
                    eval_file = gr.File(
                        label="Perplexity text ('uploaded file')",
                        type="filepath",
                        file_types=TEXT_FILES,
                        height=130,
                    )
            run_btn = gr.Button("Prune & evaluate", variant="primary", size="lg", elem_id="prune-button")
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
        "layer_first": layer_first,
        "layer_last": layer_last,
        "calibration": calibration,
        "calibration_file": calibration_file,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "stats_mode": stats_mode,
        "eval_datasets": eval_datasets,
        "eval_file": eval_file,
        "eval_windows": eval_windows,
        "eval_seqlen": eval_seqlen,
    }
    role_sliders = [sliders[r] for r in ROLES]
    refresh_outputs = [model_md, *role_sliders, attention, mlp, layer_first, layer_last, model_choice]
    readout_event = dict(
        fn=live_readout, inputs_kwargs=controls, outputs=readout_md, api_name="readout", **LIGHT
    )

    load_btn.click(
        load_model, [model_choice, model_text, session], refresh_outputs, api_name="load_model", **HEAVY
    ).success(**no_api(readout_event))
    for name, button in preset_buttons.items():
        button.click(
            partial(apply_preset, name), [master], role_sliders, api_name=f"preset_{name}", **LIGHT
        ).then(**no_api(readout_event))
    _group(master, role_sliders + [attention, mlp]).then(**no_api(readout_event))
    _group(attention, [sliders[r] for r in ATTENTION_ROLES]).then(**no_api(readout_event))
    _group(mlp, [sliders[r] for r in MLP_ROLES]).then(**no_api(readout_event))
    triggers = [c.input for c in [*role_sliders, method, structure, layer_first, layer_last]]
    gr.on(triggers, **readout_event)
    run_btn.click(
        prune_and_evaluate,
        inputs=[session],
        inputs_kwargs=controls,
        outputs=[status_md, ppl_table, role_plot, heat_plot, result_json, history_table, history_fig],
        api_name="prune",
        **HEAVY,
    )
    clear_btn.click(clear_history, [session], [history_table, history_fig], api_name="clear_history", **LIGHT)
    return LabTab(session, model_md, sliders, controls, readout_md, refresh_outputs, readout_event)


def _group(source: gr.Slider, targets: list[gr.Slider]):
    """A group slider copies its value to the sliders it stands for."""
    return source.input(lambda value: [value] * len(targets), source, targets, api_name=False, **LIGHT)


def data_line(engine: Engine) -> str:
    folder = data_dir()
    data = f"offline data folder `{folder}`" if folder else "datasets from the Hugging Face Hub"
    hub = "hub unreachable: offline models and local folders only" if engine.offline else "hub reachable"
    return f"Data: {data} · {hub}"
