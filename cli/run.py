"""``python -m prune`` prunes and evaluates; ``python -m prune info MODEL`` shows the role map.

Flags build (or override) one ``Recipe``; the result is JSON on stdout, progress and a short
summary on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from cli import flags
from cli.progress import Bar
from evaluation.lab import Lab
from evaluation.quantized import markdown, quantization_table, recipe_key
from evaluation.speed import ModelSpeed, SideBySide, side_by_side
from prune.errors import LabError
from prune.methods import METHODS
from prune.recipe import (
    LAYER_SCHEDULES,
    OWL_LAMBDA,
    OWL_M,
    REFINES,
    STATS_MODES,
    EvalSpec,
    Recipe,
    RecipeError,
    parse_sparsity,
)
from prune.roles import Target
from prune.state import PrunedState
from runtime import calibration
from runtime.models import DEFAULT_MODEL
from runtime.quantize import QUANT_KINDS, check_backend, check_kind

EVAL_ALIASES = {"wikitext2", "c4"}


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="python -m prune",
        description="Prune a causal LM with Wanda at per-module sparsities and measure what it cost. "
        "Other commands: 'info MODEL' (role map), 'study ...' (sensitivity sweeps).",
    )
    p.add_argument("--recipe", help="a recipe file (.json or .yaml); flags below override it")
    p.add_argument(
        "--sparsity",
        help="per role: all=0.5 | attn=0.3,mlp=0.6 | q=0.3,k=0.3,v=0.5,o=0.5,"
        "gate=0.6,up=0.6,down=0.6 (fractions in [0, 1])",
    )
    p.add_argument("--method", choices=list(METHODS))
    p.add_argument(
        "--structure",
        help="unstructured (default), N:M such as 2:4, or whole units that really shrink the model: "
        "channels (MLP channels at the mlp rate, heads / kv groups at the attn rate, Wanda-sp) or "
        "depth (the fraction 'all' of decoder layers, ShortGPT's block influence)",
    )
    p.add_argument("--use-variant", action="store_true", default=None, help="Wanda's cumulative-sum variant")
    p.add_argument(
        "--permute",
        action="store_true",
        default=None,
        help="RIA's channel permutation before N:M (ria, ria-row; the mask stays on the original columns)",
    )
    p.add_argument(
        "--refine",
        choices=list(REFINES),
        help="refine the method's mask: dsnot (DSnoT's training-free prune-and-grow; calibrates)",
    )
    p.add_argument("--layers", help="only decoder layers START:END (end exclusive)")
    p.add_argument(
        "--layer-schedule",
        choices=list(LAYER_SCHEDULES),
        help="spread the budget over layers: uniform (default); owl: OWL's published mapping of the "
        "layers' outlier ratios; owl-band: OWL's mean-band variant (same pruned count; unstructured)",
    )
    p.add_argument(
        "--owl-m", type=float, help=f"OWL: a score above M x its layer's mean is an outlier ({OWL_M:g})"
    )
    p.add_argument(
        "--owl-lambda", type=float, help=f"OWL: layer sparsities spread over 2 lambda ({OWL_LAMBDA:g})"
    )
    p.add_argument(
        "--stats",
        dest="stats_mode",
        choices=STATS_MODES,
        help="sequential: the reference procedure; cached: one dense pass, reused",
    )
    flags.add_calibration_flags(p)
    p.add_argument("--eval", help="comma list of wikitext2, c4, a text file, or none")
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick estimate)")
    p.add_argument("--tasks", help="lm-eval tasks: comma list or all7")
    p.add_argument("--limit", type=int, help="lm-eval examples per task")
    p.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    p.add_argument(
        "--speed",
        action="store_true",
        help="time prefill and decode tokens/s of the dense and the pruned model side by side",
    )
    p.add_argument(
        "--quantize",
        help=f"also evaluate bitsandbytes copies of the dense and pruned model: {' or '.join(QUANT_KINDS)} "
        "(or both, comma-separated); needs bitsandbytes",
    )
    p.add_argument(
        "--save", help="write the pruned model to this folder (safetensors that from_pretrained loads)"
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the pruned model, its recipe, result and a model card to this hub repo "
        "(the token of `hf auth login`); written to --save if given, else a temporary folder",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: make the repo private")
    p.add_argument("--save-recipe", help="write the effective recipe here (.json or .yaml)")
    p.add_argument("--save-calibration", help="write the calibration token ids used (safetensors)")
    p.add_argument("--calibration-ids", help="reuse calibration token ids from such a file")
    p.add_argument("--output", help="also write the JSON result to this file")
    flags.add_model_flags(p)
    return p


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file (or the defaults with all=0.5), with every flag that is set applied."""
    if args.recipe:
        base = flags.trusted(Recipe.load(args.recipe), args, args.recipe)
    else:
        base = Recipe(sparsity=parse_sparsity("all=0.5"))
    changes = flags.model_fields(args)
    names = ("method", "structure", "use_variant", "permute", "refine", "stats_mode", "layer_schedule")
    for name in (*names, "owl_m", "owl_lambda"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.sparsity is not None:
        changes["sparsity"] = parse_sparsity(args.sparsity)
    if args.layers:
        changes["layers"] = _layers(args.layers)
    changes["calibration"] = flags.calibration(args, base.calibration)
    changes["evaluation"] = _evaluation(args, base.evaluation)
    return dataclasses.replace(base, **changes)


def _layers(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise RecipeError(f"--layers takes START:END, e.g. 0:15; got {text!r}") from None
    return start, end


def _evaluation(args: argparse.Namespace, base: EvalSpec) -> EvalSpec:
    changes: dict = {}
    if args.eval is not None:
        changes["datasets"] = () if args.eval == "none" else flags.comma_list(args.eval)
    if args.tasks is not None:
        changes["tasks"] = flags.comma_list(args.tasks)
    for flag, name in (("eval_seqlen", "seqlen"), ("max_windows", "max_windows"), ("limit", "limit")):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    evaluation = dataclasses.replace(base, **changes)
    for dataset in evaluation.datasets:
        if dataset not in EVAL_ALIASES and not Path(dataset).is_file():
            raise RecipeError(f"--eval {dataset!r}: not wikitext2, c4 or an existing file")
    return evaluation


def run(argv: list[str]) -> int:
    args = flags.parse(parser(), argv)
    recipe = build_recipe(args)
    ids = calibration.load_ids(args.calibration_ids) if args.calibration_ids else None
    kinds = flags.comma_list(args.quantize) if args.quantize else ()
    for kind in kinds:
        check_kind(kind)
    with Bar(args.quiet) as bar:
        flags.show_memory_plan(args, recipe, bar)
        lab = flags.open_lab(args, recipe, bar)
        for kind in kinds:  # before pruning: a missing bitsandbytes or kernel says so at once
            check_backend(kind, lab.loaded.device)
        result = lab.run(recipe, bar, dense=not args.no_dense, ids=ids, key=recipe_key(recipe))
        output = result.to_dict(lab.model_info())
        if kinds:
            ev = recipe.evaluation
            output["quantized"] = quantization_table(
                lab,
                recipe,
                kinds,
                ev.datasets,
                ev.max_windows,
                ev.seqlen,
                bar,
                known=result.perplexity,
                dense=not args.no_dense,
            )
        if args.speed:
            bar.message("timing prefill and decode, dense and pruned")
            output["speed"] = side_by_side(lab, result.prune.state).to_dict()
        if recipe.evaluation.tasks:
            from evaluation.tasks import evaluate_recipe_tasks

            output["tasks"] = evaluate_recipe_tasks(lab, recipe, dense=not args.no_dense, progress=bar)
        text = json.dumps(output, indent=2)
        print(text, flush=True)  # the result is out before anything else can fail
        for line in summary(output):
            bar.message(line)
        write_files(args, lab, recipe, ids, result.prune.state, output, bar)
    return 0


class OutputError(LabError):
    """A file the command line was asked to write that could not be written."""


def write_files(
    args: argparse.Namespace,
    lab: Lab,
    recipe: Recipe,
    ids: torch.Tensor | None,
    state: PrunedState,
    output: dict,
    bar: Bar,
) -> None:
    """What the flags ask to be written beside stdout, the pruned model last (the longest; where it
    went is said on stderr). A failure is one line and exit code 2, the result already printed."""
    text = json.dumps(output, indent=2)
    files = [
        (args.output, "the JSON result", lambda path: Path(path).write_text(text)),
        (args.save_recipe, "the recipe", recipe.save),
        (
            args.save_calibration,
            "the calibration ids",
            lambda path: calibration.save_ids(
                ids if ids is not None else lab.calibration_ids(recipe.calibration), path
            ),
        ),
    ]
    for path, what, write in files:
        if path:
            try:
                write(path)
            except OSError as err:
                raise OutputError(f"cannot write {what} to {path}: {err.strerror or err}") from None
    if args.push_to_hub:
        push(args, lab, state, output, bar)
    elif args.save:
        bar.message(f"saved the pruned model to {lab.save(args.save, state, bar)}")


def push(args: argparse.Namespace, lab: Lab, state: PrunedState, output: dict, bar: Bar) -> None:
    """Write the folder a push uploads (into --save, or a temporary folder), then upload it."""
    bar.message(f"pushing the pruned model to the hub as {args.push_to_hub}")
    url = lab.push(args.push_to_hub, state, output, private=args.private, folder=args.save, progress=bar)
    bar.message(f"pushed: {url}")


def summary(output: dict) -> list[str]:
    """A few lines for a person: per role asked / achieved / pruned weights, then what it cost."""
    report = output["prune"]["report"]
    lines = [f"{'role':<6} {'asked':>7} {'achieved':>9} {'pruned weights':>15}"]
    for role, r in report["roles"].items():
        lines.append(f"{role:<6} {r['requested']:>7.2%} {r['sparsity']:>9.2%} {r['pruned']:>15,}")
    lines.append(
        f"{'all':<6} {'':>7} {report['linear_sparsity']:>9.2%} {report['pruned']:>15,}"
        f"  ({report['total_sparsity']:.2%} of all parameters)"
    )
    for dataset, pair in output["perplexity"].items():
        dense = pair["dense"]["perplexity"] if "dense" in pair else None
        lines.append(f"perplexity {dataset}: {_arrow(dense, pair['pruned']['perplexity'], '.3f')}")
    for row in output.get("tasks", {}).get("rows", []):
        if row["task"] == "mean":
            lines.append(f"tasks mean {row['metric']}: {_arrow(row['dense'], row['pruned'], '.4f')}")
    if "quantized" in output:
        lines.extend(markdown(output["quantized"]).splitlines())
    if "speed" in output:
        speed = {k: v for k, v in output["speed"].items() if k != "ratios"}
        pair = {k: ModelSpeed(**speed.pop(k)) for k in ("dense", "pruned")}
        lines.extend(SideBySide(**speed, **pair).lines())
    return lines


def _arrow(dense: float | None, pruned: float, fmt: str) -> str:
    """``dense -> pruned``, or the pruned value alone when the dense model was not evaluated."""
    if dense is None:
        return f"{pruned:{fmt}} (pruned; dense not evaluated)"
    return f"{dense:{fmt}} -> {pruned:{fmt}}"


def info(argv: list[str]) -> int:
    p = flags.Parser(prog="python -m prune info", description="Show a model's role map.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    flags.add_model_flags(p, model_flag=False)
    args = flags.parse(p, argv)
    recipe = Recipe(**flags.model_fields(args))
    with Bar(args.quiet) as bar:
        flags.show_memory_plan(args, recipe, bar)  # what a default run of this model would need
        lab = flags.open_lab(args, recipe, bar)
    info = lab.model_info()
    roles = lab.loaded.roles
    info["role_modules"] = {role: [_module_name(roles.targets[(0, role)])] for role in roles.roles}
    print(json.dumps(info, indent=2))
    return 0


def _module_name(target: Target) -> str:
    """Layer 0's module, written for every layer: ``model.layers.{i}.mlp.down_proj``."""
    return " + ".join(
        piece.name.replace(".0.", ".{i}.", 1).removesuffix(".weight")
        + (f"[rows {piece.rows[0]}:{piece.rows[1]}]" if piece.rows else "")
        + (" (transposed)" if piece.transposed else "")
        + (f" ({piece.experts} experts)" if piece.experts else "")
        for piece in target.pieces()
    )
