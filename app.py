"""Pruning lab, the web app: pick a model, set per-module sparsities, prune with Wanda, compare.

    python app.py                      # the default model, http://127.0.0.1:7860
    python app.py --model gemma3-270m --data-dir ../shared/data --port 8000

A thin front end: widgets become a ``Recipe``; ``evaluation.Lab`` does the work, exactly as
``python -m prune --recipe FILE`` does. One model is in memory for every visitor; each
browser session keeps its own model choice, masks and history (see ``ui/engine.py``).

Hosting (README "Hosting"): ``--public`` (on by itself on a Hugging Face Space) offers visitors only
the host's ``--models`` and checks every request against limits before it runs (``ui/hosting.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from runtime.models import DEFAULT_MODEL, HUB_DEFAULT_MODEL, OFFLINE_MODELS
from runtime.paths import CACHE_ENV
from ui.host_config import add_flags, from_environment, startup_warnings

TITLE = "Pruning lab"
CSS = """
.gradio-container { max-width: 1500px !important; }
.readout { border-left: 6px solid var(--color-accent); padding-left: 14px;
           background: var(--block-background-fill); }
.readout h3 { margin: 4px 0 !important; }
.model-info table { font-size: 0.95em; }
#what-is-happening { border-left: 6px solid var(--secondary-400); padding-left: 12px; }
#what-is-happening h3 { margin: 0 0 2px !important; }
#what-is-happening p { font-size: var(--text-md) !important; line-height: 1.45 !important;
                       margin: 0 0 6px !important; }
#memory-plan summary { cursor: pointer; }
#memory-plan details { overflow-x: auto; }
#memory-plan table { font-size: 0.9em; margin: 4px 0; }
#memory-plan table, #memory-plan td { word-break: normal !important; overflow-wrap: normal !important; }
#memory-plan td { padding: 2px 8px !important; }
#memory-plan td.size, #memory-plan td.place { white-space: nowrap; text-align: right; }
h1 { margin-bottom: 0 !important; }
"""


def parse_args(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None, prog: str = "python app.py"
) -> argparse.Namespace:
    """The app's flags, each hosting setting a flag leaves unset read from ``environ`` (default
    ``os.environ``); a bad value raises ``HostConfigError`` (``ui.host_config``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="The pruning lab in a browser: per-module Wanda pruning with live perplexity, "
        "side-by-side generation, downstream tasks and export.",
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument(
        "--model",
        help=f"model loaded at start: offline alias ({', '.join(OFFLINE_MODELS)}), hub id or local "
        f"folder (default: {HUB_DEFAULT_MODEL} on a Space or with the hub answering, else {DEFAULT_MODEL})",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 ...")
    h = p.add_argument_group(
        "hosting (a Space, a classroom); each flag also reads the environment variable named in its "
        "help, as Space Variables and Secrets do; a flag wins"
    )
    add_flags(h)
    return from_environment(p.parse_args(argv), environ)


def hosting_from(args: argparse.Namespace, device_type: str):
    """The host's profile from flags (``ui.hosting``): local freedom unless public."""
    from runtime.hub import on_a_space
    from ui.hosting import Hosting, Limits

    public = on_a_space() if args.public is None else args.public
    models = [m for m in (args.models or "").split(",") if m.strip()]
    if not models and args.model == HUB_DEFAULT_MODEL:
        models = [HUB_DEFAULT_MODEL, *OFFLINE_MODELS]  # the start model first, then the offline ones
    if public:
        hosting = Hosting.public_profile(models, device_type, allow_custom=args.allow_custom_models)
    else:
        hosting = Hosting(models=tuple(models))
    limits = hosting.limits if public else Limits.none()
    hosting.limits = limits.replace(
        calibration_tokens=args.max_calibration_tokens,
        eval_windows=args.max_eval_windows,
        eval_seqlen=args.max_eval_seqlen,
        task_docs=args.max_task_docs,
        study_points=args.max_study_points,
        new_tokens=args.max_new_tokens,
        upload_mb=args.max_upload_mb,
        upload_chars=args.max_upload_chars,
        queue_size=args.queue_size,
        heavy_threads=args.heavy_threads,
        job_seconds=args.job_seconds,
        model_switches_per_minute=args.model_switches_per_minute,
    )
    if args.session_ttl is not None:
        hosting.session_ttl_s = 60 * args.session_ttl
    if args.state_budget_mb is not None:
        hosting.state_budget_mb = args.state_budget_mb
    if args.zero_gpu_seconds is not None:
        hosting.zero_gpu_max_s = args.zero_gpu_seconds
    return hosting


def persistent_cache() -> str | None:
    """On a Space with persistent storage (/data), the model's first fetch and conversion and the
    statistics survive a restart: the cache goes there unless the host set one."""
    data = Path("/data")
    if os.environ.get(CACHE_ENV) or not data.is_dir() or not os.access(data, os.W_OK):
        return None
    os.environ[CACHE_ENV] = str(data / "pruning-lab")
    os.environ.setdefault("HF_HOME", str(data / "huggingface"))
    return os.environ[CACHE_ENV]


def startup_notes(engine) -> list[str]:
    """What this hardware changes or cannot do, said at start (log and page header)."""
    notes = []
    if engine.gpu is not None:
        notes.append(
            "ZeroGPU: every heavy job runs in its own GPU call and asks for the GPU time it needs, at "
            f"most {engine.hosting.zero_gpu_max_s:g} s; a larger job is refused or stopped there. "
            "Your pruning lives in the GPU worker and is applied again when a call gets a fresh one."
        )
    return notes


def build_demo(engine):
    """The whole page for one engine (tests build it around their own engine)."""
    import gradio as gr

    from ui import compare_tab, downstream_tab, export_tab, lab_tab, sensitivity_tab
    from ui.recipes import Controls, Defaults, build_recipe, readout

    defaults = Defaults.for_device(engine.require().loaded.device.type)
    with gr.Blocks(title=TITLE, delete_cache=cache_bounds(engine), analytics_enabled=False) as demo:
        notes = "".join(f"  \n**Note:** {n}" for n in startup_notes(engine))
        gr.Markdown(
            f"# ✂️ {TITLE}\nPrune a language model with **Wanda** at a different sparsity for every module "
            "role, then see at once what it costs: perplexity, answers, benchmark accuracy.  \n"
            + lab_tab.data_line(engine)
            + notes
        )
        with gr.Tabs():
            with gr.Tab("Prune", id="prune"):
                lab = lab_tab.build(engine, defaults)
            with gr.Tab("Side by side", id="compare"):
                compare_tab.build(engine, defaults, lab.session)
            with gr.Tab("Downstream", id="downstream"):
                downstream_tab.build(engine, defaults, lab.session)
            with gr.Tab("Sensitivity", id="sensitivity"):
                sensitivity_tab.build(engine, defaults, lab)
            with gr.Tab("Export", id="export"):
                export_tab.build(engine, lab.session)
        shape = engine.shape()
        start = Controls(
            nsamples=defaults.nsamples,
            seqlen=defaults.seqlen,
            eval_windows=defaults.eval_windows,
            eval_seqlen=defaults.eval_seqlen,
        )
        lab.readout_md.value = readout(
            build_recipe(start, shape), shape, engine.require().loaded.num_parameters()
        )
        demo.load(
            lambda session: lab_tab.refresh(engine, session),
            [lab.session],
            lab.refresh_outputs,
            api_name=False,
            queue=False,
        )
    return demo


def cache_bounds(engine) -> tuple[int, int]:
    """Gradio's ``delete_cache`` (every ``frequency`` s, files older than ``age`` s): what it serves
    (uploads, exports not yet downloaded) lives no longer than an idle session, the TTL."""
    ttl = max(1, round(engine.hosting.session_ttl_s))
    return max(1, min(60, ttl // 4)), ttl


def launch_options() -> dict:
    """Theme and CSS go to ``launch`` in Gradio 6; large text so a projector can show it."""
    import gradio as gr

    theme = gr.themes.Soft(primary_hue="orange", secondary_hue="blue", text_size="lg")
    return dict(theme=theme, css=CSS, show_error=True, footer_links=["api", "gradio"])


def main(argv: list[str] | None = None, prog: str = "python app.py") -> int:
    from prune.errors import LabError

    try:
        args = parse_args(argv, prog=prog)
    except LabError as err:  # a bad environment variable: one line, as a bad flag is
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.cache_dir:
        os.environ[CACHE_ENV] = args.cache_dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported
    cache = persistent_cache()
    if cache:
        print(f"cache on persistent storage: {cache}", file=sys.stderr)
    from runtime.hub import go_offline_if_no_hub

    offline = go_offline_if_no_hub()  # before transformers is imported, so hub ids fail in seconds
    from runtime import cache as prune_cache
    from runtime.files import limit_files
    from runtime.models import default_model, resolve_device
    from runtime.paths import set_data_dir
    from ui.engine import Engine
    from ui.hosting import expand_user, zero_gpu

    prune_cache.configure(args.cache_entries, args.cache_mb, args.disk_cache_mb)
    device = args.device
    if zero_gpu():
        import spaces  # Gradio imported it first, and with it ZeroGPU's CUDA emulation here

        spaces.disable_gradio_auto_wrap()  # handlers stay here; their heavy jobs go to the GPU
    args.model = args.model or default_model(offline)
    try:
        set_data_dir(args.data_dir)
        hosting = hosting_from(args, resolve_device(device).type)
        limit_files(hosting.limits.upload_chars)
        for warning in startup_warnings(args, hosting.public):
            print(f"warning: {warning}", file=sys.stderr)
        engine = Engine(device=device, hosting=hosting)
        engine.offline = offline
        if zero_gpu():
            from ui import zerogpu

            engine.gpu = zerogpu.gpu_function()  # before launch: workers are forked with it
        engine.load(expand_user(args.model), progress=lambda event: print(event.message, file=sys.stderr))
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in startup_notes(engine):
        print(f"note: {note}", file=sys.stderr)
    from ui.sessions import EXPORT_ROOT

    print(f"exports: {EXPORT_ROOT}", file=sys.stderr, flush=True)
    demo = build_demo(engine)
    limits = hosting.limits
    from starlette.middleware import Middleware

    from ui.common import LIGHT_THREADS, heavy_group_threads

    heavy = heavy_group_threads(limits.heavy_threads)
    demo.queue(default_concurrency_limit=heavy, max_size=limits.queue_size)  # ui.common.HEAVY
    from ui.export_tab import DeleteAfterDownload

    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        max_file_size=None if limits.upload_mb is None else int(limits.upload_mb * 2**20),
        max_threads=LIGHT_THREADS + (heavy or 4),
        app_kwargs={"middleware": [Middleware(DeleteAfterDownload)]},
        **launch_options(),
    )
    return 0


COMMANDS = """usage: pruning-lab COMMAND [options]   (pruning-lab COMMAND --help: its options)

commands:
  app     the web app (the flags of python app.py)
  run     prune, evaluate, save (python -m prune run)
  study   module-sensitivity studies and allocation (python -m prune study)
  info    a model's roles and parameter counts (python -m prune info)"""


def console(argv: list[str] | None = None) -> int:
    """The installed ``pruning-lab`` command: the app, or a command of the CLI (``cli.main``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command == "app":
        return main(argv[1:], prog="pruning-lab app")
    if command in ("run", "study", "info"):
        from cli import main as cli_main

        return cli_main(argv)
    if command in ("-h", "--help"):
        print(COMMANDS)
        return 0
    print(
        f"error: {f'unknown command {command!r}' if command else 'no command given'}\n{COMMANDS}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
