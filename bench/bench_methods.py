"""Magnitude vs Wanda vs SparseGPT vs RIA (with its channel permutation for 2:4) vs Wanda + DSnoT
on one model at the same calibration: time to prune and perplexity, at 50%, 60% and 70%
unstructured and 2:4, each through the Lab as the CLI and the app run them.

    python bench/bench_methods.py --data-dir ../shared/data            # SmolLM2, CPU defaults
    python bench/bench_methods.py --nsamples 128 --seqlen 2048 --windows 0 --device cuda
    python bench/bench_methods.py --rows magnitude,ria,"wanda + dsnot" --settings 0.5,2:4

Prints a markdown table; the ratios are against magnitude pruning measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.lab import Lab  # noqa: E402
from prune.recipe import CalibrationSpec, Recipe  # noqa: E402
from runtime.paths import set_data_dir  # noqa: E402

ROWS = {  # label -> recipe fields; each row at every setting its structure allows
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt"),
    "ria": dict(method="ria"),
    "ria + permutation": dict(method="ria", permute=True),  # N:M only
    "wanda + dsnot": dict(method="wanda", refine="dsnot"),
}


def settings(text: str) -> list[tuple[str, float]]:
    """(structure, sparsity) of "0.5,0.6,2:4": a rate is unstructured; N:M prunes N/M whatever the rate."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [(item, 0.5) if ":" in item else ("unstructured", float(item)) for item in items]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--stats", default="sequential", choices=["sequential", "cached"])
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 windows (0: the full protocol)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--settings", default="0.5,0.6,0.7,2:4", help="unstructured rates and N:M structures")
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of " + ", ".join(ROWS))
    args = p.parse_args()
    set_data_dir(args.data_dir)

    lab = Lab.open(Recipe(model=args.model, device=args.device))
    calibration = CalibrationSpec(source="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    ids = lab.calibration_ids(calibration)  # sampled once: every method sees the same tokens
    windows = args.windows or None
    dense = lab.dense_perplexity("wikitext2", args.eval_seqlen, windows).perplexity
    print(
        f"{lab.loaded.name} on {lab.loaded.device} ({lab.loaded.dtype}); calibration C4 "
        f"{ids.shape[0]} x {ids.shape[1]}, {args.stats} statistics; WikiText-2 "
        f"{'full protocol' if windows is None else f'{windows} windows'} x {args.eval_seqlen}; "
        f"dense {dense:.3f}"
    )
    rows = []
    labels = [label.strip() for label in args.rows.split(",") if label.strip()]
    for structure, rate in settings(args.settings):
        for label in labels:
            if ROWS[label].get("permute") and structure == "unstructured":
                continue
            recipe = Recipe(
                model=lab.loaded.name,
                structure=structure,
                sparsity={"all": rate},
                stats_mode=args.stats,
                calibration=calibration,
                **ROWS[label],
            )
            start = time.perf_counter()
            result = lab.prune(recipe, ids=ids)
            seconds = time.perf_counter() - start
            ppl = lab.perplexity("wikitext2", args.eval_seqlen, windows).perplexity
            setting = structure if structure != "unstructured" else f"{100 * rate:.0f}% unstructured"
            rows.append((setting, label, seconds, ppl, result.report.linear_sparsity))
            print(f"  {setting:>17} {label:>18}: prune {seconds:7.2f} s, perplexity {ppl:9.3f}", flush=True)
    lab.restore()
    print("\n| setting | method | time to prune | perplexity | vs magnitude | sparsity |")
    print("|---|---|---|---|---|---|")
    for setting, label, seconds, ppl, sparsity in rows:
        base = next((r[3] for r in rows if r[0] == setting and r[1] == "magnitude"), float("nan"))
        cells = [
            setting,
            label,
            f"{seconds:.1f} s",
            f"{ppl:.2f}",
            f"{ppl / base:.3f}x",
            f"{100 * sparsity:.1f}%",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
