"""Settings every tab shares: how events queue, and the progress tracker default."""

from __future__ import annotations

import gradio as gr

# One heavy job on the model at a time, across every tab and user (one shared queue, so others see
# their position); light events (readouts, presets) never wait behind it.
HEAVY = dict(concurrency_limit=1, concurrency_id="model")
LIGHT = dict(concurrency_limit=None, show_progress="hidden")

# Gradio gives each call a fresh tracker in place of this default (blocks.create_tracker), so one
# module-level instance is safe to share.
PROGRESS = gr.Progress()
