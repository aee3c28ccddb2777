"""Does structured pruning make the model faster? Dense vs pruned in one run, on the CPU.

For each model, two structured recipes that remove about ``--target`` of all parameters:
``channels`` (the fewest kv groups whose removal leaves a valid head count: one of SmolLM2's
three, two of the 1.2B shape's four; MLP channels at the rate that makes up the rest; Wanda-sp)
and ``depth`` (whole decoder layers; ShortGPT's block influence). Each is timed against the dense
model in the same process, same threads (prefill tokens/s of one long prompt, greedy decode
tokens/s, dense and pruned alternating, medians, warm-up excluded), with WikiText-2 perplexity on a
few windows beside; then the pruned model is saved, loaded back with plain
``AutoModelForCausalLM.from_pretrained`` and its logits compared with the lab's in-memory model.

    python bench/bench_structured.py --data-dir ../shared/data \\
        --out bench/results/bench_structured_cpu.txt

Models: offline aliases (smollm2-135m-instruct) or ``random:<shape>`` from bench/bench_big.py
(random weights: their perplexity only shows that nothing broke, not quality).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m-instruct,random:llama-1b")
    p.add_argument("--target", type=float, default=0.25, help="fraction of all parameters to remove")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--prompt", type=int, default=256, help="prefill prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 windows (of --eval-seqlen)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU (bench/gpu_check.py)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="also write the report here")
    return p


def rates(config, total: int, target: float) -> dict[str, dict[str, float]]:
    """Sparsity tables that remove about ``target`` of ``total`` parameters: one kv group (or one
    head) per layer plus MLP channels for the rest; or whole layers."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    units = kv if kv > 1 else heads
    per_unit = heads // units
    # the fewest units whose removal leaves a head count that divides the hidden size (see
    # prune.structured.kept_heads): one kv group of SmolLM2's 3, two of the 1.2B shape's 4
    removed = next(n for n in range(1, units) if hidden % ((units - n) * per_unit) == 0)
    attn_rate = removed / units
    attn_removed = layers * attn_rate * hidden * head_dim * 2 * (heads + kv)
    mlp_rate = (target * total - attn_removed) / (layers * 3 * hidden * inner)
    per_layer = hidden * head_dim * 2 * (heads + kv) + 3 * hidden * inner
    depth = round(target * total / per_layer) / layers
    return {"channels": {"attn": attn_rate, "mlp": round(mlp_rate, 4)}, "depth": {"all": depth}}


def source_of(name: str, dtype: str) -> str:
    if not name.startswith("random:"):
        return name
    from bench.bench_big import random_model

    return random_model(name.split(":", 1)[1], getattr(torch, dtype))


def bench_model(name: str, args: argparse.Namespace, say) -> None:
    from evaluation.lab import Lab
    from evaluation.speed import side_by_side
    from prune.recipe import CalibrationSpec, EvalSpec, Recipe
    from runtime.models import load

    lab = Lab(load(source_of(name, args.dtype), dtype=args.dtype, device=args.device, streaming="off"))
    total = lab.loaded.num_parameters()
    say(
        f"\n## {name}: {total:,} parameters, {lab.loaded.roles.num_layers} layers, "
        f"{torch.get_num_threads()} threads"
    )
    dense_ppl = lab.dense_perplexity("wikitext2", args.eval_seqlen, args.windows).perplexity
    say(f"dense WikiText-2 perplexity ({args.windows} windows of {args.eval_seqlen}): {dense_ppl:.3f}")
    calibration = CalibrationSpec(source="c4", nsamples=args.nsamples, seqlen=args.seqlen)
    ids = lab.calibration_ids(calibration)
    probe = ids[:2, :64].to(lab.loaded.device)
    for structure, sparsity in rates(lab.loaded.model.config, total, args.target).items():
        recipe = Recipe(
            model=lab.loaded.name,
            structure=structure,
            sparsity=sparsity,
            stats_mode="cached",
            calibration=calibration,
            evaluation=EvalSpec(datasets=("wikitext2",), seqlen=args.eval_seqlen, max_windows=args.windows),
        )
        start = time.perf_counter()
        result = lab.prune(recipe, ids=ids)
        prune_s = time.perf_counter() - start
        state = result.state
        ppl = lab.perplexity("wikitext2", args.eval_seqlen, args.windows).perplexity
        config = lab.loaded.model.config
        say(
            f"\n### {structure} {dict(sparsity)}: removed {1 - lab.loaded.num_parameters() / total:.1%} of "
            f"the parameters in {prune_s:.1f} s -> {config.num_hidden_layers} layers, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv, intermediate "
            f"{config.intermediate_size}"
        )
        say(f"WikiText-2 perplexity: dense {dense_ppl:.3f} -> pruned {ppl:.3f}")
        speed = side_by_side(lab, state, args.prompt, args.new_tokens, args.repeats)
        for line in speed.lines():
            say(line)
        with lab.using(state) as model, torch.no_grad():
            expected = model(probe, use_cache=False).logits
        with tempfile.TemporaryDirectory(dir=Path(args.out).parent if args.out else None) as folder:
            lab.save(Path(folder) / "pruned", state)
            size = sum(f.stat().st_size for f in (Path(folder) / "pruned").glob("*.safetensors"))
            check = saved_check(Path(folder) / "pruned", probe, expected)
            say(f"saved: {size / 2**20:,.0f} MiB of safetensors; {check}")
        lab.restore()
        gc.collect()
    del lab
    gc.collect()


def saved_check(folder: Path, probe: torch.Tensor, expected: torch.Tensor) -> str:
    """The saved folder through plain transformers: its logits against the lab's pruned model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=expected.dtype).to(expected.device).eval()
    with torch.no_grad():
        logits = model(probe, use_cache=False).logits
    error = float((logits - expected).abs().max())
    tolerance = 1e-4 if expected.dtype == torch.float32 else 2e-2  # bf16/fp16 kernels may differ by order
    same = (
        "same logits"
        if torch.allclose(logits, expected, rtol=tolerance, atol=tolerance)
        else "DIFFERENT logits"
    )
    del model
    gc.collect()
    return f"from_pretrained loads it: {same} as the lab's pruned model (max |diff| {error:.2e})"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from runtime.paths import set_data_dir

    set_data_dir(args.data_dir)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    import transformers

    say(
        f"# bench_structured: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"target {args.target:.0%} of parameters, prompt {args.prompt}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}"
    )
    for name in args.models.split(","):
        bench_model(name, args, say)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
