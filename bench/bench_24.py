"""Is 2:4 faster? Prune 2:4 through the Lab, store the pruned linears in the semi-structured format
(``torch.sparse.to_sparse_semi_structured``) and time prefill and decode against the same weights in
dense format, in the same run. Needs an NVIDIA GPU with compute capability >= 8.0; elsewhere it
says so and exits 0.

    python bench/bench_24.py                                   # SmolLM2 (offline alias), bf16
    python bench/bench_24.py --random llama-2-7b --prefill 8x2048 --decode-batches 1,16,64

Printed: weight memory of the converted linears, prefill tokens/s (batch x seqlen) and decode
tokens/s per batch size, dense vs 2:4, each with its ratio; ``--output`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.speed import measure_24, semi_structured_support  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="offline alias, hub id or folder")
    p.add_argument(
        "--random", help="a random LLaMA of these shapes instead (see bench_prune.py: tiny, llama-2-7b)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=16, help="calibration samples (wanda)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration sequence length")
    p.add_argument("--prefill", default="8x512", help="BATCHxSEQLEN of the timed prefill")
    p.add_argument("--decode-batches", default="1,32", help="decode batch sizes")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data-dir", help="offline data folder")
    p.add_argument("--output", help="also write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ok, why = semi_structured_support()
    if not ok:
        print(why)
        return 0
    from evaluation.lab import Lab
    from prune.recipe import CalibrationSpec, Recipe, parse_sparsity
    from runtime.models import load
    from runtime.paths import set_data_dir

    set_data_dir(args.data_dir)
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    calibration = CalibrationSpec(nsamples=args.nsamples, seqlen=args.seqlen)
    ids = None
    if args.random:
        from bench_prune import random_model

        loaded = random_model(args.random, device, dtype)
        ids = torch.randint(0, loaded.model.config.vocab_size, (args.nsamples, args.seqlen))
    else:
        loaded = load(args.model, dtype=args.dtype, device="cuda")
    lab = Lab(loaded)
    recipe = Recipe(
        model=loaded.name,
        method=args.method,
        structure="2:4",
        sparsity=parse_sparsity("all=0.5"),
        stats_mode="cached",
        calibration=calibration,
    )
    result = lab.prune(recipe, ids=ids)
    batch, seqlen = (int(x) for x in args.prefill.lower().split("x"))
    decode = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    sparsity = result.report.linear_sparsity
    print(f"{why}; torch {torch.__version__}; model {loaded.name}; {sparsity:.1%} of role weights pruned 2:4")
    with lab.using(lab.masks) as model:  # holds the pruned state (and the lock) while timing
        speed = measure_24(
            model,
            loaded.roles,
            prefill=(batch, seqlen),
            decode_batches=decode,
            decode_steps=args.decode_steps,
            repeats=args.repeats,
        )
    for line in speed.lines():
        print(line)
    for name, reason in speed.skipped.items():
        print(f"  left dense: {name}: {reason}")
    if args.output:
        Path(args.output).write_text(json.dumps({"command": sys.argv, **speed.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
