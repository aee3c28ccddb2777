"""Pruning lab, the web app: pick a model, set per-module sparsities, prune with Wanda, compare.

    python app.py                      # the offline default model, http://127.0.0.1:7860
    python app.py --model gemma3-270m --data-dir ../shared/data --port 8000

A thin front end: widgets become a ``Recipe``; ``evaluation.Lab`` does the work, exactly as
``python -m prune --recipe FILE`` does. One model is in memory for every visitor; each
browser session keeps its own masks and history (see ``ui/engine.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from prune.models import DEFAULT_MODEL, OFFLINE_MODELS

TITLE = "Pruning lab"
CSS = """
.gradio-container { max-width: 1500px !important; }
.readout { border-left: 6px solid var(--color-accent); padding-left: 14px;
           background: var(--block-background-fill); }
.readout h3 { margin: 4px 0 !important; }
.model-info table { font-size: 0.95em; }
h1 { margin-bottom: 0 !important; }
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="The pruning lab in a browser: per-module Wanda pruning with live perplexity, "
        "side-by-side generation, downstream tasks and export.",
    )
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860 or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--data-dir", help="offline data folder (default: $PRUNING_LAB_DATA; unset: the hub)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model loaded at start: offline alias ({', '.join(OFFLINE_MODELS)}), hub id or local folder",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 ...")
    return p.parse_args(argv)


def build_demo(engine):
    """The whole page for one engine (tests build it around their own engine)."""
    import gradio as gr

    from ui import compare_tab, downstream_tab, export_tab, lab_tab, sensitivity_tab
    from ui.recipes import Controls, Defaults, build_recipe, readout

    defaults = Defaults.for_device(engine.require().loaded.device.type)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 7200)) as demo:
        gr.Markdown(
            f"# ✂️ {TITLE}\nPrune a language model with **Wanda** at a different sparsity for every module "
            "role, then see at once what it costs: perplexity, answers, benchmark accuracy.  \n"
            + lab_tab.data_line(engine)
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
        demo.load(lambda: lab_tab.refresh(engine), None, lab.refresh_outputs, api_name=False, queue=False)
    return demo


def launch_options() -> dict:
    """Theme and CSS go to ``launch`` in Gradio 6; large text so a projector can show it."""
    import gradio as gr

    theme = gr.themes.Soft(primary_hue="orange", secondary_hue="blue", text_size="lg")
    return dict(theme=theme, css=CSS, show_error=True, footer_links=["api", "gradio"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ui.engine import go_offline_if_no_hub

    offline = go_offline_if_no_hub()  # before transformers is imported, so hub ids fail in seconds
    from prune.errors import LabError
    from prune.paths import set_data_dir
    from ui.engine import Engine

    try:
        set_data_dir(args.data_dir)
        engine = Engine(device=args.device)
        engine.offline = offline
        engine.load(args.model, progress=lambda event: print(event.message, file=sys.stderr))
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
