"""Figures of the sensitivity studies (matplotlib, Agg: no display needed, safe in threads of the app).

Each ``figure_*`` returns a matplotlib Figure (the app shows it as it fills in); ``study_figures``
saves a study's figures as PNGs next to its CSV.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from prune.methods import method as method_spec  # noqa: E402

ROLE_COLORS = {
    "q": "#1f77b4",
    "k": "#17becf",
    "v": "#2ca02c",
    "o": "#9467bd",
    "gate": "#ff7f0e",
    "up": "#d62728",
    "down": "#8c564b",
    "attention": "#1f77b4",
    "mlp": "#d62728",
    "uniform": "#444444",
}
DPI = 110


def _finite(points, attr: str = "perplexity"):
    return [p for p in points if getattr(p, attr) is not None and math.isfinite(getattr(p, attr))]


def _dense_line(ax, result) -> None:
    if result.points:
        ax.axhline(result.points[0].dense_perplexity, color="#999999", lw=0.8, ls=":", label="dense")


def method_name(name: str) -> str:
    """A method's short name for a title ("SparseGPT", "Magnitude per output row")."""
    return method_spec(name).label.split(" (")[0]


def _title(result, what: str) -> str:
    """The figure's title, naming the method the study's points were pruned with."""
    s = result.settings
    windows = "full" if s.windows is None else f"{s.windows}x{s.eval_seqlen}"
    how = method_name(s.method)
    if method_spec(s.method).needs_statistics:
        how += ", cached statistics"
    return f"{result.model.get('name', '')}: {what} ({s.dataset} {windows}, {how})"


def _zoom(ax, result, top: float = 3.0) -> None:
    """The low-damage region, where allocation decisions are made: up to ``top`` x dense."""
    if result.points:
        dense = result.points[0].dense_perplexity
        ax.set_ylim(dense * 0.97, dense * top)
        ax.text(0.03, 0.97, f"zoom: perplexity up to {top:g}x dense", transform=ax.transAxes, va="top",
                fontsize=8, bbox=dict(facecolor="white", edgecolor="#cccccc"))  # fmt: skip


def _per_series(result, axes, x) -> None:
    for name, rows in result.series().items():
        rows = _finite(rows)
        for ax in axes:
            ax.plot([x(p) for p in rows], [p.perplexity for p in rows], "o-", ms=3, lw=1.3,
                    color=ROLE_COLORS.get(name), label=name)  # fmt: skip


def figure_rate_vs_perplexity(result) -> Figure:
    """Perplexity against each role's own pruning rate, others dense (log y): all rates, and a zoom."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=DPI, gridspec_kw={"width_ratios": [1.1, 1]})
    _per_series(result, axes, lambda p: 100 * p.rate)
    for ax in axes:
        _dense_line(ax, result)
        ax.set_yscale("log")
        ax.set_xlabel("pruning rate of the module (%), all others dense")
        ax.set_ylabel("perplexity (log)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8, ncol=2)
    _zoom(axes[1], result)
    fig.suptitle(_title(result, "rate vs perplexity"), fontsize=9)
    fig.tight_layout()
    return fig


def figure_weights_vs_perplexity(result) -> Figure:
    """Perplexity against the number of weights removed; the top axis gives the model's sparsity."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=DPI, gridspec_kw={"width_ratios": [1.1, 1]})
    _per_series(result, axes, lambda p: p.pruned / 1e6)
    for ax in axes:
        _dense_line(ax, result)
        ax.set_yscale("log")
        ax.set_xlabel("pruned weights (millions)")
        ax.set_ylabel("perplexity (log)")
        ax.grid(True, which="both", alpha=0.25)
        _sparsity_axis(ax, result)
    axes[0].legend(fontsize=8, ncol=2)
    _zoom(axes[1], result)
    fig.suptitle(_title(result, "pruned weights vs perplexity"), fontsize=9)
    fig.tight_layout()
    return fig


def _sparsity_axis(ax, result) -> None:
    """Top axis: the overall sparsity (of all role weights, and of all parameters) those weights are."""
    if not result.points:
        return
    linear = result.points[0].linear_params / 1e6
    total = result.points[0].total_params / 1e6
    top = ax.secondary_xaxis("top", functions=(lambda x: 100 * x / linear, lambda s: s * linear / 100))
    top.set_xlabel(
        f"overall sparsity: % of the {linear:.1f}M role weights (x{linear / total:.2f} for % of all "
        f"{total:.1f}M parameters)",
        fontsize=7,
    )


def figure_groups(result) -> Figure:
    """Attention only vs MLP only vs uniform: against the rate and against the pruned weights."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=DPI)
    for name, rows in result.series().items():
        rows = _finite(rows)
        style = dict(marker="o", ms=3.5, lw=1.5, color=ROLE_COLORS.get(name), label=name)
        axes[0].plot([100 * p.rate for p in rows], [p.perplexity for p in rows], **style)
        axes[1].plot([p.pruned / 1e6 for p in rows], [p.perplexity for p in rows], **style)
    for ax, label in zip(axes, ("pruning rate of the group (%)", "pruned weights (millions)"), strict=True):
        _dense_line(ax, result)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (log)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    _sparsity_axis(axes[1], result)
    fig.suptitle(_title(result, "attention vs MLP vs uniform"), fontsize=9)
    fig.tight_layout()
    return fig


def figure_downstream(result) -> Figure:
    """Matched-budget comparison: accuracy (when tasks ran) or perplexity against the budget."""
    use_acc = any(p.accuracy is not None for p in result.points)
    attr = "accuracy" if use_acc else "perplexity"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for name, rows in result.series().items():
        rows = sorted(_finite(rows, attr), key=lambda p: p.budget or 0)
        ax.plot([100 * (p.budget or 0) for p in rows], [getattr(p, attr) for p in rows], "o-", ms=4,
                color=ROLE_COLORS.get(name), label=name)  # fmt: skip
    if use_acc:
        dense = next((p.tasks.get("dense_mean", {}).get("acc") for p in result.points if p.tasks), None)
        if dense is not None:
            ax.axhline(dense, color="#999999", lw=0.8, ls=":", label="dense")
        ax.set_ylabel("mean zero-shot accuracy")
    else:
        _dense_line(ax, result)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log)")
    ax.set_xlabel("pruned weights, % of all role weights (same count for every series)")
    ax.set_title(_title(result, "matched pruned weights"), fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


METHOD_COLORS = {"uniform": "#444444", "owl": "#2ca02c", "allocator": "#1f77b4", "allocator+owl": "#d62728"}


def figure_allocation(rows: list[dict]) -> Figure:
    """Perplexity of each method at each target (same pruned count), the allocator's per-role
    sparsities, and OWL's per-layer profile."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=DPI)
    targets = sorted({r["target"] for r in rows})
    methods = [m for m in METHOD_COLORS if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        for j, target in enumerate(targets):
            row = next((r for r in rows if r["method"] == method and r["target"] == target), None)
            uniform = next((r for r in rows if r["method"] == "uniform" and r["target"] == target), None)
            if row is None:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            axes[0].bar(
                x, row["perplexity"], width, color=METHOD_COLORS[method], label=method if j == 0 else None
            )
            if uniform and method != "uniform":
                gain = row["perplexity"] / uniform["perplexity"] - 1
                axes[0].text(x, row["perplexity"], f"{gain:+.1%}", ha="center", va="bottom", fontsize=7)
    axes[0].set_xticks(range(len(targets)), [f"{t:.0%} of role weights" for t in targets])
    axes[0].set_ylabel("perplexity (same number of pruned weights)")
    axes[0].legend(fontsize=8)
    _role_panel(axes[1], rows, targets)
    _layer_panel(axes[2], rows, targets)
    for ax in axes:
        ax.grid(True, alpha=0.25)
    methods = sorted({method_name(r["recipe"]["method"]) for r in rows if "recipe" in r})
    if methods:
        fig.suptitle(f"every row pruned with {' and '.join(methods)}", fontsize=9)
    fig.tight_layout()
    return fig


def _role_panel(ax, rows, targets) -> None:
    for k, target in enumerate(targets):
        for method, marker in (("uniform", "s"), ("allocator", "o")):
            row = next((r for r in rows if r["method"] == method and r["target"] == target), None)
            if row is None:
                continue
            roles = list(row["role_sparsity"])
            ax.plot(roles, [100 * row["role_sparsity"][r] for r in roles], marker=marker, ms=5,
                    ls="--" if method == "uniform" else "-", color=METHOD_COLORS[method], alpha=1 - 0.4 * k,
                    label=f"{method} @ {target:.0%}")  # fmt: skip
    ax.set_ylabel("sparsity of the role (%)")
    ax.set_title("per-role sparsity (allocator+owl: same, plus OWL's layer offsets)", fontsize=8)
    ax.legend(fontsize=7)


def _layer_panel(ax, rows, targets) -> None:
    for k, target in enumerate(targets):
        row = next((r for r in rows if r["method"] == "owl" and r["target"] == target), None)
        if row and row.get("layer_sparsity"):
            layers = row["layer_sparsity"]
            ax.plot(range(len(layers)), [100 * s for s in layers], "o-", ms=3, color=METHOD_COLORS["owl"],
                    alpha=1 - 0.4 * k, label=f"owl @ {target:.0%}")  # fmt: skip
            ax.axhline(100 * target, color="#444444", lw=0.8, ls="--")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity of the layer (%)")
    ax.set_title("OWL per-layer sparsity (dashed: uniform)", fontsize=8)
    ax.legend(fontsize=7)


def save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def study_figures(result, out_dir: Path) -> dict[str, str]:
    """The figures of one study, saved as PNGs: what -> path."""
    kind = result.settings.kind
    out_dir = Path(out_dir)
    if not result.points:
        return {}
    if kind == "single":
        return {
            "rate_vs_ppl": save(figure_rate_vs_perplexity(result), out_dir / "rate_vs_ppl.png"),
            "weights_vs_ppl": save(figure_weights_vs_perplexity(result), out_dir / "weights_vs_ppl.png"),
        }
    if kind == "combined":
        return {"groups": save(figure_groups(result), out_dir / "attention_vs_mlp.png")}
    if kind == "downstream":
        return {"downstream": save(figure_downstream(result), out_dir / "downstream.png")}
    return {}
