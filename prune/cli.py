"""Command line: ``python -m prune`` prunes and evaluates; ``python -m prune info MODEL`` shows roles.

Flags build (or override) one ``Recipe``; the result is printed as JSON on stdout, progress on
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prune.models import DEFAULT_MODEL, OFFLINE_MODELS, ModelLoadError
from prune.recipe import Recipe, RecipeError, parse_sparsity

EVAL_ALIASES = {"wikitext2", "c4"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="offline data folder (default: $PRUNING_LAB_DATA; unset: the hub)")
    parser.add_argument("--dtype", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a hub model's own code to run (only for models you trust)",
    )


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prune",
        description="Prune a causal LM with Wanda at per-module sparsities and measure what it cost. "
        "Other commands: 'info MODEL' (role map), 'study ...' (sensitivity sweeps).",
    )
    p.add_argument("--recipe", help="a recipe file (.json or .yaml); flags below override it")
    p.add_argument("--model", help=f"offline alias ({', '.join(OFFLINE_MODELS)}), hub id or local folder")
    p.add_argument(
        "--sparsity",
        help="per role: all=0.5 | attn=0.3,mlp=0.6 | q=0.3,k=0.3,v=0.5,o=0.5,"
        "gate=0.6,up=0.6,down=0.6 (fractions in [0, 1])",
    )
    p.add_argument("--method", choices=["wanda", "magnitude", "magnitude-row"])
    p.add_argument("--structure", help="unstructured (default) or N:M such as 2:4, 4:8")
    p.add_argument("--use-variant", action="store_true", default=None, help="Wanda's cumulative-sum variant")
    p.add_argument("--layers", help="only decoder layers START:END (end exclusive)")
    p.add_argument(
        "--stats",
        dest="stats_mode",
        choices=["sequential", "cached"],
        help="sequential: the reference procedure; cached: one dense pass, reused",
    )
    p.add_argument("--calibration", help="c4, wikitext2, generated, or a text/jsonl/parquet file")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int, help="calibration sequence length (capped at the model's context)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval", help="comma list of wikitext2, c4, a text file, or none")
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick estimate)")
    p.add_argument("--tasks", help="lm-eval tasks: comma list or all7")
    p.add_argument("--limit", type=int, help="lm-eval examples per task")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 1 on CPU, 8 on GPU)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    p.add_argument("--save", help="write the pruned model here (safetensors, save_pretrained)")
    p.add_argument("--save-recipe", help="write the effective recipe here (.json or .yaml)")
    p.add_argument("--save-calibration", help="write the calibration token ids used (safetensors)")
    p.add_argument("--calibration-ids", help="reuse calibration token ids from such a file")
    p.add_argument("--output", help="also write the JSON result to this file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _common(p)
    return p


def build_recipe(args: argparse.Namespace) -> Recipe:
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe()
    for name in (
        "model",
        "method",
        "structure",
        "use_variant",
        "stats_mode",
        "dtype",
        "device",
        "revision",
        "trust_remote_code",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(recipe, name, value)
    if args.sparsity is not None:
        recipe.sparsity = parse_sparsity(args.sparsity)
    elif not args.recipe:
        recipe.sparsity = parse_sparsity("all=0.5")
    if args.layers:
        try:
            start, end = (int(x) for x in args.layers.split(":"))
        except ValueError:
            raise RecipeError(f"--layers takes START:END, e.g. 0:15; got {args.layers!r}") from None
        recipe.layers = [start, end]
    cal = recipe.calibration
    if args.calibration:
        if args.calibration in ("c4", "wikitext2", "generated"):
            cal.source, cal.path = args.calibration, None
        else:
            cal.source, cal.path = "file", args.calibration
    for flag, attr in (("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            setattr(cal, attr, getattr(args, flag))
    ev = recipe.evaluation
    if args.eval is not None:
        ev.datasets = [] if args.eval == "none" else [d.strip() for d in args.eval.split(",") if d.strip()]
    if args.eval_seqlen is not None:
        ev.seqlen = args.eval_seqlen
    if args.max_windows is not None:
        ev.max_windows = args.max_windows
    if args.tasks is not None:
        ev.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None:
        ev.limit = args.limit
    for dataset in ev.datasets:
        if dataset not in EVAL_ALIASES and not Path(dataset).is_file():
            raise RecipeError(f"--eval {dataset!r}: not wikitext2, c4 or an existing file")
    return recipe.validate()


class _Bar:
    """tqdm on stderr for the engine's progress callbacks."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, fraction: float, message: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed} {desc}")
        self.bar.n = int(1000 * fraction)
        self.bar.set_description_str(message[:80])
        self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)


def run(argv: list[str]) -> int:
    from evaluation.lab import Lab
    from prune import calibration
    from prune.paths import set_data_dir

    args = run_parser().parse_args(argv)
    set_data_dir(args.data_dir)
    recipe = build_recipe(args)
    bar = _Bar(args.quiet)
    lab = Lab.open(recipe, bar.message)
    if args.batch_size:
        lab.pruner.batch_size = args.batch_size
    ids = calibration.load_ids(args.calibration_ids) if args.calibration_ids else None
    result = lab.run(recipe, bar, dense=not args.no_dense, ids=ids)
    output = result.to_dict(lab.model_info())
    if recipe.evaluation.tasks:
        from evaluation.tasks import evaluate_recipe_tasks

        output["tasks"] = evaluate_recipe_tasks(lab, recipe, dense=not args.no_dense, progress=bar)
    if args.save_calibration:
        calibration.save_ids(
            ids if ids is not None else lab.pruner.calibration_ids(recipe), args.save_calibration
        )
    if args.save_recipe:
        recipe.save(args.save_recipe)
    if args.save:
        lab.loaded.model.save_pretrained(args.save, safe_serialization=True)
        lab.loaded.tokenizer.save_pretrained(args.save)
        output["saved"] = str(Path(args.save).resolve())
    text = json.dumps(output, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    if bar.bar is not None:
        bar.bar.close()
    print(text)
    return 0


def info(argv: list[str]) -> int:
    from evaluation.lab import Lab
    from prune.models import load
    from prune.paths import set_data_dir

    p = argparse.ArgumentParser(prog="python -m prune info", description="Show a model's role map.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _common(p)
    args = p.parse_args(argv)
    set_data_dir(args.data_dir)
    loaded = load(
        args.model,
        revision=args.revision,
        dtype=args.dtype or "auto",
        device=args.device or "auto",
        trust_remote_code=bool(args.trust_remote_code),
        progress=lambda m: print(m, file=sys.stderr),
    )
    info = Lab(loaded).model_info()
    info["role_modules"] = {
        role: [
            t.module.replace(".0.", ".{i}.", 1)
            + (f"[rows {t.rows[0]}:{t.rows[1]}]" if t.rows else "")
            + (" (transposed)" if t.transposed else "")
            for t in loaded.roles.targets[(0, role)]
        ]
        for role in loaded.roles.roles
    }
    print(json.dumps(info, indent=2))
    return 0


def study(argv: list[str]) -> int:
    from evaluation.cli_study import study as run_study

    return run_study(argv)


def main(argv: list[str] | None = None) -> int:
    from prune.calibration import CalibrationError
    from prune.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"info": info, "study": study}
    errors: tuple[type[BaseException], ...] = (
        RecipeError,
        ModelLoadError,
        CalibrationError,
        DataError,
        FileNotFoundError,
    )
    try:
        from evaluation.perplexity import EvaluationError

        errors += (EvaluationError,)
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "error: out of memory; try fewer calibration samples, a shorter seqlen or a smaller model",
            file=sys.stderr,
        )
        return 3
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            print("error: out of memory on the device; lower nsamples, seqlen or batch size", file=sys.stderr)
            return 3
        raise
