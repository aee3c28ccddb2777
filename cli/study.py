"""``python -m prune study KIND``: the sensitivity studies and the allocation comparison from a shell.

Every study resumes: run the same command again after an interruption and finished points are
skipped. Results, plots and a summary land in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli import flags
from cli.progress import Bar
from evaluation import allocate, studies
from evaluation.lab import Lab
from evaluation.tasks import expand_tasks
from prune.allocation import BOUNDS, OWL_LAMBDA, OWL_M
from prune.methods import METHODS
from prune.recipe import CalibrationSpec, EvalSpec, Recipe, RecipeError

EPILOG = """\
defaults (chosen so the single study of all seven roles on SmolLM2-135M fits in 30 minutes on a CPU
at ~2 s per 512-token forward pass):
  calibration: 32 x 512 tokens of C4, ONE pass on the dense model; its statistics are cached and
    every point reuses them (no calibration pass per point);
  evaluation: the first 8 windows x 512 tokens of WikiText-2 test per point (--windows N to change,
    --full or --windows 0 for the full protocol); the allocate comparison defaults to 32 windows;
  single: 7 roles x 13 rates (0..100% by 10%, 95%, 99%) = 91 points: 84 pruned evaluations plus one
    dense evaluation that every 0% point shares.
rates and targets are fractions (0.5) or percents (50).

examples:
  python -m prune study single --out results/study-single
  python -m prune study single --roles q,down --grid 0,0.5,0.9 --windows 4 --out /tmp/s
  python -m prune study combined --out results/study-combined
  python -m prune study downstream --out results/study-downstream
  python -m prune study downstream --budgets 0.1,0.2 --tasks arc_easy,boolq --limit 200 --out /tmp/d
  python -m prune study allocate --targets 0.5,0.6 --full --out results/allocate
"""

ALLOCATE_HELP = """\
Compare, at each target (fraction of all role weights pruned) and at the SAME number of pruned weights:
uniform Wanda; OWL (per-layer sparsity from the layers' outlier ratios, in [S-lam, S+lam]); the
allocator (per-role sparsities by greedy marginal cost on single-role sensitivity curves, refined by a
few evaluations on held-out text); and allocator+OWL. Sensitivity curves are measured on held-out text
into OUT/curves (or taken from --curves). Writes allocation.{md,csv,json,png} in OUT; resumes.
"""


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return [v / 100 if v > 1 else v for v in values]  # 50 means 50%


def _common(p: argparse.ArgumentParser, windows: int = studies.DEFAULT_WINDOWS) -> None:
    p.add_argument("--out", help="results folder (default results/study-KIND); re-running resumes it")
    p.add_argument("--fresh", action="store_true", help="ignore finished points in --out and start over")
    p.add_argument(
        "--windows",
        type=int,
        default=windows,
        help=f"evaluation windows of --eval-seqlen tokens (default {windows}; 0: the full protocol)",
    )
    p.add_argument("--full", action="store_true", help="the full evaluation protocol (same as --windows 0)")
    p.add_argument(
        "--eval-seqlen", type=int, default=studies.DEFAULT_EVAL_SEQLEN, help="tokens per window (512)"
    )
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, c4 or a text file (wikitext2)")
    flags.add_calibration_flags(p, studies.default_calibration())
    p.add_argument("--no-plots", action="store_true", help="write CSV/JSON only")
    flags.add_model_flags(p)


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="python -m prune study",
        description="Sensitivity studies of Wanda pruning per module, and automatic per-module allocation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    single = sub.add_parser("single", help="each role alone over a grid of rates, the others dense")
    single.add_argument("--roles", help="comma list of roles (default: all the model has)")
    single.add_argument(
        "--grid", type=_floats, help="rates, e.g. 0,0.1,...,1 (default 0..1 by 0.1, .95, .99)"
    )
    combined = sub.add_parser("combined", help="attention only vs MLP only vs uniform over rates")
    combined.add_argument("--grid", type=_floats, help="rates (default 0.1..0.9 by 0.1)")
    down = sub.add_parser("downstream", help="attention/MLP/uniform matched by number of pruned weights")
    down.add_argument(
        "--budgets",
        "--grid",
        dest="grid",
        type=_floats,
        help="fractions of all role weights (0.05,0.1,0.15,0.2)",
    )
    down.add_argument("--tasks", help="lm-eval tasks (comma list or all7); omitted: perplexity only")
    down.add_argument("--limit", type=int, help="examples per task (default: the full split)")
    alloc = sub.add_parser(
        "allocate",
        help="uniform vs OWL vs the allocator at the same pruned weights",
        description=ALLOCATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _allocate_args(alloc)
    for sp in (single, combined, down):
        _common(sp)
        sp.add_argument("--method", default="wanda", choices=list(METHODS), help="pruning method (wanda)")
    _common(alloc, windows=32)  # the comparison's evaluation; the curves use --select-windows
    return p


def _allocate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--targets",
        type=_floats,
        default=[0.5, 0.6],
        help="global sparsities, fractions of all role weights (0.5,0.6)",
    )
    p.add_argument(
        "--curves",
        help="a single-study folder to take sensitivities from (default: measure them in OUT/curves)",
    )
    p.add_argument(
        "--curve-grid", type=_floats, default=allocate.CURVE_GRID, help="rates of the measured curves"
    )
    p.add_argument(
        "--select-data",
        help="held-out text the allocator's own evaluations use (default: WikiText-2 validation from the "
        "data folder, else c4), never the test set that the comparison reports",
    )
    p.add_argument(
        "--select-windows", type=int, default=allocate.SELECT_WINDOWS, help="windows for selection (8)"
    )
    p.add_argument("--bounds", type=_floats, default=list(BOUNDS), help="min,max sparsity per role (0,0.9)")
    p.add_argument("--lam", type=float, default=OWL_LAMBDA, help="OWL: layer sparsity in [S-lam, S+lam]")
    p.add_argument("--outlier-m", type=float, default=OWL_M, help="OWL: outlier if score > M x mean (5)")
    p.add_argument("--no-refine", action="store_true", help="take the greedy allocation as is")


def study(argv: list[str]) -> int:
    args = flags.parse(parser(), argv)
    windows = None if args.full or args.windows == 0 else args.windows
    if windows is not None and windows < 0:
        raise RecipeError("--windows must be >= 0")
    out = Path(args.out or f"results/study-{args.kind}")
    calibration = flags.calibration(args, studies.default_calibration())
    settings = None
    if args.kind != "allocate":
        tasks = expand_tasks(args.tasks) if getattr(args, "tasks", None) else []
        limit = getattr(args, "limit", None)  # downstream only
        settings = studies.StudySettings(
            args.kind, args.dataset, windows, args.eval_seqlen, calibration, tasks, limit, args.method
        )
        if not args.fresh:
            studies.resumable(out, settings)  # before the model loads (minutes, for a big one)
    # every point: cached statistics of one calibration set, then the same evaluation
    planned = Recipe(
        **flags.model_fields(args),
        method=getattr(args, "method", "wanda"),  # allocate compares Wanda allocations
        stats_mode="cached",
        calibration=calibration,
        evaluation=EvalSpec((args.dataset,), args.eval_seqlen, windows),
    )
    with Bar(args.quiet) as bar:
        flags.show_memory_plan(args, planned, bar)
        lab = flags.open_lab(args, planned, bar)
        if settings is None:
            return _allocate(args, lab, calibration, windows, out, bar)
        return _study(args, lab, settings, out, bar)


def _study(args: argparse.Namespace, lab: Lab, settings: studies.StudySettings, out: Path, bar: Bar) -> int:
    result = studies.run_study(
        lab,
        settings.kind,
        getattr(args, "grid", None),
        settings.windows,
        out,
        bar,
        lambda point, res: bar.message(_point_line(point)),
        roles=list(flags.comma_list(args.roles)) if getattr(args, "roles", None) else None,
        dataset=settings.dataset,
        eval_seqlen=settings.eval_seqlen,
        calibration=settings.calibration,
        tasks=settings.tasks,
        limit=settings.limit,
        method=settings.method,
        fresh=args.fresh,
        plots=not args.no_plots,
    )
    bar.close()
    print(
        json.dumps(
            {
                "points": len(result.points),
                "measured": len(result.points) - len(result.skipped),
                "resumed": len(result.skipped),
                "calibration_passes": result.calibration_passes,
                "seconds": round(result.seconds, 1),
                "files": result.files,
            },
            indent=2,
        )
    )
    return 0


def _point_line(point: studies.StudyPoint) -> str:
    acc = f", acc {point.accuracy:.4f}" if point.accuracy is not None else ""
    return (
        f"{point.series:>9} @ {point.rate:6.1%}: ppl {point.perplexity:10.3f}{acc}  "
        f"pruned {point.pruned:>11,} ({point.linear_sparsity:6.2%} of role weights)  "
        f"prune {point.prune_s:5.1f}s eval {point.eval_s:5.1f}s"
    )


def _allocate(
    args: argparse.Namespace, lab: Lab, calibration: CalibrationSpec, windows: int | None, out: Path, bar: Bar
) -> int:
    report = allocate.compare(
        lab,
        args.targets,
        out,
        calibration=calibration,
        dataset=args.dataset,
        windows=windows,
        eval_seqlen=args.eval_seqlen,
        curves=args.curves,
        curve_grid=args.curve_grid,
        select_data=args.select_data,
        select_windows=args.select_windows,
        bounds=tuple(args.bounds),
        lam=args.lam,
        outlier_m=args.outlier_m,
        refine=not args.no_refine,
        progress=bar,
        log=bar.message,
    )
    bar.close()
    print(report["markdown"])
    print(json.dumps({"files": report["files"]}, indent=2), file=sys.stderr)
    return 0
