"""Matplotlib figures for the page, rendered to images one at a time.

Matplotlib's mathtext parser (log-axis tick labels) and pyplot are not thread-safe, and Gradio
renders outputs in worker threads while jobs keep drawing; so every figure is built and rasterised
under one lock (``render``) and the page gets a finished PNG image.
Large fonts and few colors: the lab is meant to be read from the back of a classroom.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

PLOT_LOCK = threading.Lock()

DENSE = "#7f8c8d"
PRUNED = "#d35400"
REQUESTED = "#95a5a6"
SERIES = ["#d35400", "#2471a3", "#229954", "#8e44ad", "#c0392b", "#17a589"]
FONT = {"font.size": 13, "axes.titlesize": 15, "axes.labelsize": 13}


def render(draw: Callable[..., Figure], *args) -> Image.Image:
    """``draw(*args)`` rasterised to a PNG image, under the one plotting lock."""
    buffer = io.BytesIO()
    with PLOT_LOCK:
        fig = draw(*args)
        try:
            fig.savefig(buffer, format="png", dpi=100)
        finally:
            plt.close(fig)  # figures made with pyplot (evaluation.plots) must be released
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    matplotlib.rcParams.update(FONT)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def role_bars(report: dict) -> Figure:
    """Requested vs achieved sparsity per role, with the pruned weights written on each bar."""
    fig = _figure()
    ax = fig.add_subplot()
    roles = list(report["roles"])
    achieved = [100 * report["roles"][r]["sparsity"] for r in roles]
    requested = [100 * report["roles"][r]["requested"] for r in roles]
    x = range(len(roles))
    ax.bar([i - 0.2 for i in x], requested, 0.4, label="asked", color=REQUESTED)
    bars = ax.bar([i + 0.2 for i in x], achieved, 0.4, label="achieved", color=PRUNED)
    for bar, role in zip(bars, roles, strict=True):
        pruned = report["roles"][role]["pruned"]
        ax.annotate(
            f"{pruned / 1e6:.1f}M",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=10,
        )
    ax.set_xticks(list(x), roles)
    ax.set_ylim(0, 105)
    ax.set_ylabel("sparsity (%)")
    ax.set_title(f"Per role ({100 * report['linear_sparsity']:.1f} % overall)")
    ax.legend(loc="upper right", fontsize=10)
    return fig


def layer_heatmap(report: dict) -> Figure:
    """Achieved sparsity of every (layer, role): where the zeros went."""
    per_layer = report["per_layer"]
    roles = list(report["roles"])
    grid = [[100 * row.get(r, 0.0) for r in roles] for row in per_layer]
    fig = _figure()  # the same size as the role bars beside it
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles)
    step = max(1, math.ceil(len(per_layer) / 12))
    ax.set_yticks(range(0, len(per_layer), step))
    ax.set_ylabel("layer")
    ax.set_title("Per layer and role")
    fig.colorbar(image, ax=ax, label="sparsity (%)")
    return fig


def history_plot(history: list[dict]) -> Figure:
    """Perplexity against pruned weights for every run of the session, one series per dataset."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    datasets = sorted({ds for run in history for ds in run.get("perplexity", {})})
    for color, ds in zip(SERIES, datasets, strict=False):
        points = [
            (run["pruned"], run["perplexity"][ds]["pruned"], run["run"])
            for run in history
            if ds in run.get("perplexity", {})
        ]
        points.sort()
        ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], "o-", color=color, label=f"{ds} pruned")
        for x, y, run in points:
            ax.annotate(f"#{run}", (x / 1e6, y), textcoords="offset points", xytext=(4, 4), fontsize=9)
        dense = [run["perplexity"][ds].get("dense") for run in history if ds in run.get("perplexity", {})]
        dense = [d for d in dense if d]
        if dense:
            ax.axhline(dense[-1], color=color, linestyle="--", alpha=0.6, label=f"{ds} dense")
    ax.set_xlabel("pruned weights (millions)")
    ax.set_ylabel("perplexity")
    if history and any(run.get("perplexity") for run in history):
        ax.set_yscale("log")
        ax.legend(fontsize=10)
    else:
        ax.text(
            0.5, 0.5, "runs with perplexity appear here", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_title("This session's runs")
    ax.grid(alpha=0.3)
    return fig


def task_bars(rows: list[dict]) -> Figure:
    """Dense vs pruned accuracy per task (grouped bars; acc, and acc_norm where the task has it)."""
    fig = _figure(8.0, 4.2)
    ax = fig.add_subplot()
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    x = range(len(rows))
    dense = [100 * (r["dense"] or 0.0) for r in rows]
    pruned = [100 * r["pruned"] for r in rows]
    ax.bar([i - 0.2 for i in x], dense, 0.4, label="dense", color=DENSE)
    ax.bar([i + 0.2 for i in x], pruned, 0.4, label="pruned", color=PRUNED)
    ax.set_xticks(list(x), labels, fontsize=9)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=10)
    ax.set_title("Zero-shot accuracy")
    return fig
