"""Flags that ``run``, ``info`` and ``study`` share, and what they mean, written once.

Every parser here is a ``Parser``: a flag argparse rejects becomes a ``UsageError`` (a LabError),
so it ends like every other user error: one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import NoReturn

from cli.progress import Bar
from evaluation.lab import Lab
from prune.errors import LabError, RecipeError
from prune.progress import Progress
from prune.recipe import CalibrationSpec, Recipe
from runtime import memory
from runtime.models import DEFAULT_MODEL, OFFLINE_MODELS, choose_dtype, config_source, resolve_device
from runtime.paths import set_data_dir

NAMED_CALIBRATION = ("c4", "wikitext2", "generated")  # any other --calibration is a file
MODEL_FIELDS = ("model", "revision", "dtype", "device", "trust_remote_code")  # what the model flags set


class UsageError(LabError):
    """A command line argparse cannot parse."""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (sub-commands inherit it)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_model_flags(parser: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Which model, from where, on what device; and ``--quiet``."""
    if model_flag:
        parser.add_argument(
            "--model",
            help=f"offline alias ({', '.join(OFFLINE_MODELS)}), hub id or local folder ({DEFAULT_MODEL})",
        )
    parser.add_argument("--data-dir", help="offline data folder (default: $PRUNING_LAB_DATA; unset: the hub)")
    parser.add_argument(
        "--dtype", help="auto (CPU fp32, GPU bf16, fp16 on a GPU without bf16), float32, bfloat16, float16"
    )
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a hub model's own code to run (only for models you trust; a recipe file's "
        "trust_remote_code: true is refused without this flag)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a pickle checkpoint (pytorch_model.bin) when the model has no safetensors; "
        "reading a pickle can run code, so only for files you trust",
    )
    parser.add_argument(
        "--max-memory",
        type=memory.parse_max_memory,
        help="memory budgets, e.g. cuda:0=20GiB,cpu=64GiB (default: what is free)",
    )
    parser.add_argument(
        "--streaming",
        choices=memory.STREAMING,
        default="auto",
        help="decoder layers one at a time on the device: auto (when the model does not fit), on, off",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_calibration_flags(parser: argparse.ArgumentParser, defaults: CalibrationSpec | None = None) -> None:
    """Calibration data and batch size. Without ``defaults`` an unset flag keeps the recipe's value."""
    values: dict = {}
    if defaults:
        values = {"calibration": defaults.source, **dataclasses.asdict(defaults)}

    def flag(name: str, text: str, **kwargs) -> None:
        shown = f" ({values[name]})" if defaults else ""
        parser.add_argument(f"--{name}", default=values.get(name), help=text + shown, **kwargs)

    flag("calibration", "c4, wikitext2, generated, or a text/jsonl/parquet file")
    flag("nsamples", "calibration sequences", type=int)
    flag("seqlen", "calibration sequence length, capped at the model's context", type=int)
    flag("seed", "calibration sampling seed", type=int)
    parser.add_argument("--batch-size", type=int, help="calibration batch size (default 1 on CPU, 8 on GPU)")


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, then point the data loaders at ``--data-dir``."""
    args = parser.parse_args(argv)
    set_data_dir(args.data_dir)
    return args


def trusted(recipe: Recipe, args: argparse.Namespace, path: str) -> Recipe:
    """A recipe read from the file ``path``: one that asks to run a model's own code is refused
    unless the person running the command asked for that too (``--trust-remote-code``)."""
    if recipe.trust_remote_code and not args.trust_remote_code:
        raise RecipeError(
            f"{path} sets trust_remote_code: true, which runs code from the model's repository; "
            "a recipe file alone never enables it: pass --trust-remote-code as well if you trust "
            f"{recipe.model}"
        )
    return recipe


def model_fields(args: argparse.Namespace) -> dict:
    """The Recipe fields the model flags set (unset flags are left out)."""
    return {name: getattr(args, name) for name in MODEL_FIELDS if getattr(args, name, None) is not None}


def calibration(args: argparse.Namespace, base: CalibrationSpec) -> CalibrationSpec:
    """``base`` with the calibration flags that are set applied."""
    changes = {
        name: getattr(args, name)
        for name in ("nsamples", "seqlen", "seed")
        if getattr(args, name) is not None
    }
    if args.calibration:
        named = args.calibration in NAMED_CALIBRATION
        changes["source"] = args.calibration if named else "file"
        changes["path"] = None if named else args.calibration
    return dataclasses.replace(base, **changes)


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def show_memory_plan(args: argparse.Namespace, recipe: Recipe, bar: Bar) -> memory.MemoryPlan | None:
    """Print the memory plan for running ``recipe`` (its model, calibration, evaluation) before the
    model loads, the one place the CLI shows it (the loader decides the same, silently); a run that
    cannot fit is refused here (``MemoryPlanError``), not minutes later. Nothing is printed when the
    config cannot be read without loading (an offline model's first start, no hub): loading then
    says what is wrong."""
    source = config_source(recipe.model)
    if source is None:
        return None
    device = resolve_device(recipe.device)
    dtype, why = choose_dtype(recipe.dtype, device)
    batch_size = getattr(args, "batch_size", None) or memory.default_batch_size(device)
    try:
        plan = memory.plan_for_source(
            source,
            dtype,
            device,
            memory.Workload.for_recipe(recipe, batch_size),
            args.max_memory,
            args.streaming,
            revision=recipe.revision,
            trust_remote_code=recipe.trust_remote_code,
        )
    except memory.ConfigUnavailable:
        return None
    bar.message(f"{plan.text()}\n  dtype: {str(dtype).replace('torch.', '')} ({why})")
    return plan


def open_lab(args: argparse.Namespace, recipe: Recipe, progress: Progress) -> Lab:
    """Load the recipe's model into a Lab as the memory plan says, with ``--batch-size`` applied."""
    return Lab.open(
        recipe,
        progress,
        streaming=args.streaming,
        max_memory=args.max_memory,
        batch_size=getattr(args, "batch_size", None),
        allow_pickle=args.allow_pickle,
    )
