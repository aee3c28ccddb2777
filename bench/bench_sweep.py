"""Benchmark: a 7-role x 10-rate sensitivity sweep with cached statistics vs sequential Wanda per point.

Cached: ONE dense calibration pass (really computed: the statistics cache is pointed at an empty
temporary folder), then 70 sets of masks from those statistics. Sequential: the reference
procedure, which re-runs the calibration set through the model layer by layer for every point.
Both use the same calibration token ids and, if ``--windows`` > 0, the same evaluation windows.

Timing the sequential baseline for all 70 points takes hours on a CPU, so by default it is timed
on ``--sequential-points`` points spread over the sweep and EXTRAPOLATED to 70 (printed as such);
``--sequential-points all`` times every point. Its cost does not depend on the rate: every point
prunes one role in all 30 layers, so each point re-runs all 30 layers.

    PRUNING_LAB_DATA=../shared/data python bench/bench_sweep.py
    PRUNING_LAB_DATA=../shared/data python bench/bench_sweep.py --sequential-points all --windows 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.lab import Lab  # noqa: E402
from prune.recipe import CalibrationSpec, Recipe  # noqa: E402
from runtime import pruner as pruner_module  # noqa: E402
from runtime.models import DEFAULT_MODEL, load  # noqa: E402

RATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences (32, as the studies)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration length (512, as the studies)")
    p.add_argument("--windows", type=int, default=0, help="evaluation windows x 512 per point (0: none)")
    p.add_argument("--sequential-points", default="3", help="how many points to time sequentially, or 'all'")
    return p.parse_args()


def points(roles: tuple[str, ...]) -> list[tuple[str, float]]:
    return [(role, rate) for role in roles for rate in RATES]


def recipe(role: str, rate: float, mode: str, cal: CalibrationSpec, model: str) -> Recipe:
    return Recipe(model=model, sparsity={role: rate}, stats_mode=mode, calibration=cal)


def evaluate(lab: Lab, windows: int) -> tuple[float, float]:
    if windows <= 0:
        return float("nan"), 0.0
    start = time.perf_counter()
    ppl = lab.perplexity("wikitext2", 512, windows).perplexity
    return ppl, time.perf_counter() - start


def cached_sweep(lab: Lab, sweep, cal: CalibrationSpec, windows: int) -> dict:
    """Every point from one calibration pass; returns pruning and evaluation seconds."""
    passes = lab.calibration_passes
    prune_s = eval_s = 0.0
    first = None
    for i, (role, rate) in enumerate(sweep):
        result = lab.prune(recipe(role, rate, "cached", cal, lab.loaded.name))
        prune_s += result.timings["total_s"] - result.timings.get("calibration_data_s", 0.0)
        first = first or result.timings
        ppl, seconds = evaluate(lab, windows)
        eval_s += seconds
        print(f"  cached {i + 1:2d}/{len(sweep)} {role:>4} @ {rate:.0%}: prune "
              f"{result.timings['total_s'] - result.timings.get('calibration_data_s', 0.0):7.2f}s "
              f"({result.stats_source}) ppl {ppl:.3f}", flush=True)  # fmt: skip
    lab.restore()
    return {
        "prune_s": prune_s,
        "eval_s": eval_s,
        "passes": lab.calibration_passes - passes,
        "pass_s": first.get("statistics_s", 0.0),
    }


def sequential_points(lab: Lab, chosen, cal: CalibrationSpec, windows: int) -> dict:
    prune_s = eval_s = 0.0
    for role, rate in chosen:
        result = lab.prune(recipe(role, rate, "sequential", cal, lab.loaded.name))
        seconds = result.timings["total_s"] - result.timings.get("calibration_data_s", 0.0)
        prune_s += seconds
        ppl, e = evaluate(lab, windows)
        eval_s += e
        print(f"  sequential {role:>4} @ {rate:.0%}: prune {seconds:7.2f}s ppl {ppl:.3f}", flush=True)
    lab.restore()
    return {"prune_s": prune_s, "eval_s": eval_s, "points": len(chosen)}


def spread(sweep, count: int):
    if count >= len(sweep):
        return list(sweep)
    return [sweep[round(i * (len(sweep) - 1) / max(1, count - 1))] for i in range(count)]


def main() -> int:
    args = parse()
    cal = CalibrationSpec("c4", args.nsamples, args.seqlen, 0)
    lab = Lab(load(args.model))
    sweep = points(lab.loaded.roles.roles)
    stats_dir = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    pruner_module.cache_dir = lambda *parts: stats_dir  # an empty cache: the pass is really timed
    lab.calibration_ids(cal)  # tokenizing: not timed
    if args.windows:
        lab.dense_perplexity("wikitext2", 512, args.windows)
    print(f"{lab.loaded.name}: {len(sweep)} points, calibration {args.nsamples} x {args.seqlen} C4, "
          f"evaluation {args.windows} windows x 512 per point", flush=True)  # fmt: skip
    cached = cached_sweep(lab, sweep, cal, args.windows)
    n = len(sweep) if args.sequential_points == "all" else int(args.sequential_points)
    seq = sequential_points(lab, spread(sweep, n), cal, args.windows)
    per_point = seq["prune_s"] / seq["points"]
    seq_total = per_point * len(sweep)
    measured = seq["points"] == len(sweep)
    print()
    print(f"cached:     {cached['prune_s']:9.1f} s pruning for {len(sweep)} points "
          f"({cached['passes']} calibration pass of {cached['pass_s']:.1f} s, then masks only; "
          f"{(cached['prune_s'] - cached['pass_s']) / len(sweep):.2f} s a point)")  # fmt: skip
    label = "measured" if measured else f"EXTRAPOLATED from {seq['points']} timed points x {len(sweep)}"
    print(
        f"sequential: {seq_total:9.1f} s pruning for {len(sweep)} points ({per_point:.1f} s a point; {label})"
    )
    print(f"ratio:      {seq_total / cached['prune_s']:9.1f}x less pruning time with cached statistics")
    if args.windows:
        print(
            f"evaluation: {cached['eval_s'] / len(sweep):.1f} s a point for both "
            f"(same {args.windows} windows)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
