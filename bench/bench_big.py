"""Models bigger than the device: in-memory vs streamed pruning (time, peak memory, same masks),
and what 8-bit / 4-bit copies of the dense and the pruned model cost in memory and perplexity.

Each (model, placement) runs in its own process so its peak memory is its own: peak resident
memory of the process (CPU) and peak allocated GPU memory (torch.cuda.max_memory_allocated).

    python bench/bench_big.py --data-dir ../shared/data                       # CPU defaults
    python bench/bench_big.py --models random:llama2-13b --placements disk --device cuda \\
        --dtype bfloat16 --nsamples 128 --seqlen 2048                       # a GPU, streamed
    python bench/bench_big.py --models random:llama2-7b --quantize nf4 --device cuda

Models: offline aliases (smollm2-135m-instruct, gemma3-270m), a local folder, or
``random:<shape>``: random weights of a published shape (saved once as safetensors in the cache;
SmolLM2's tokenizer). Placements: ``off`` (in memory), ``cpu`` (layers wait in CPU memory),
``disk`` (layers read from the safetensors on each use). The ratios are against ``off`` in the
same run; masks are compared by digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {  # hidden, layers, intermediate, heads, kv heads (LLaMA-2 / TinyLlama shapes)
    "tiny": (256, 2, 512, 4, 2),  # for dry runs (bench/gpu_check.py --dry-run)
    "llama-1b": (2048, 22, 5632, 32, 4),
    "llama2-7b": (4096, 32, 11008, 32, 32),
    "llama2-13b": (5120, 40, 13824, 40, 40),
}


def random_model(shape: str, dtype: torch.dtype) -> str:
    """A folder with random weights of ``shape`` (written once, shard by shard, never whole in RAM)."""
    import transformers as tf
    from accelerate import init_empty_weights

    from runtime.models import DEFAULT_MODEL, OFFLINE_MODELS, _converted_dir
    from runtime.paths import cache_dir

    folder = cache_dir("bench-models", f"{shape}-{str(dtype).replace('torch.', '')}")
    if (folder / "config.json").exists():
        return str(folder)
    tokenizer = tf.AutoTokenizer.from_pretrained(_converted_dir(OFFLINE_MODELS[DEFAULT_MODEL], print))
    hidden, layers, inner, heads, kv = SHAPES[shape]
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inner,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    from safetensors.torch import save_file

    with init_empty_weights():
        empty = tf.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    index, shard, names = {}, {}, list(empty.state_dict())

    def flush(number: int) -> None:
        file = f"model-{number:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        index.update({name: file for name in shard})
        shard.clear()

    for name in names:
        shape_ = empty.state_dict()[name].shape
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(shape_, dtype=dtype)
        else:
            shard[name] = (torch.randn(shape_, generator=generator) * 0.02).to(dtype)
        if sum(t.numel() * t.element_size() for t in shard.values()) > 2**31:
            flush(len(set(index.values())) + 1)
    flush(len(set(index.values())) + 1)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def child(args: argparse.Namespace) -> None:
    """One model, one placement: load, prune, evaluate; a JSON line with times and peaks."""
    from evaluation.lab import Lab
    from prune.recipe import CalibrationSpec, Recipe
    from runtime.models import load
    from runtime.paths import set_data_dir

    set_data_dir(args.data_dir)
    dtype = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16"}[args.dtype]
    name = args.models
    source = (
        random_model(name.split(":", 1)[1], _torch_dtype(args.dtype)) if name.startswith("random:") else name
    )
    start = time.perf_counter()
    lab = Lab(load(source, dtype=dtype, device=args.device, streaming=args.placements))
    load_s = time.perf_counter() - start
    calibration = CalibrationSpec(source="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    recipe = Recipe(
        model=lab.loaded.name,
        method=args.method,
        sparsity={"all": 0.5},
        stats_mode=args.stats,
        calibration=calibration,
    )
    start = time.perf_counter()
    result = lab.prune(recipe)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    ppl = lab.perplexity("wikitext2", args.eval_seqlen, args.windows).perplexity
    eval_s = time.perf_counter() - start
    digest = hashlib.sha1()
    for key in sorted(result.masks):
        digest.update(result.masks[key].cpu().numpy().tobytes())
    out = {
        "model": name,
        "placement": args.placements,
        "parameters": lab.loaded.num_parameters(),
        "dtype": str(lab.loaded.dtype).replace("torch.", ""),
        "device": str(lab.loaded.device),
        "load_s": load_s,
        "prune_s": prune_s,
        "eval_s": eval_s,
        "perplexity": ppl,
        "masks": digest.hexdigest()[:16],
        "pruned": result.report.pruned,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
    if args.quantize:
        from evaluation.quantized import markdown, quantization_table

        rows = quantization_table(
            lab, recipe, tuple(args.quantize.split(",")), ("wikitext2",), args.windows, args.eval_seqlen
        )
        out["quantized"] = markdown(rows)
    print("RESULT " + json.dumps(out, default=str))


def _torch_dtype(text: str) -> torch.dtype:
    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[text]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m,random:llama-1b")
    p.add_argument("--placements", default="off,cpu,disk")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--method", default="wanda")
    p.add_argument("--stats", default="sequential", choices=["sequential", "cached"])
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--quantize", default="", help="also the int8/nf4 table for each model, e.g. int8,nf4")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"command: python bench/bench_big.py {' '.join(sys.argv[1:])}")
    print(
        f"torch {torch.__version__}; C4 calibration {args.nsamples} x {args.seqlen}, {args.method} "
        f"{args.stats}, 50%; WikiText-2 {args.windows} windows x {args.eval_seqlen}\n"
    )
    print("| model | params | placement | load s | prune s | eval s | peak RSS | peak GPU | ppl | masks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    tables = []
    for model in args.models.split(","):
        rows = {}
        for placement in args.placements.split(","):
            argv = [sys.executable, __file__, "--child", "--models", model, "--placements", placement]
            for flag in (
                "data_dir",
                "device",
                "dtype",
                "method",
                "stats",
                "nsamples",
                "seqlen",
                "windows",
                "eval_seqlen",
            ):
                value = getattr(args, flag)
                if value is not None:
                    argv += [f"--{flag.replace('_', '-')}", str(value)]
            if args.quantize and placement == "off":
                argv += ["--quantize", args.quantize]
            done = subprocess.run(argv, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"| {model} | | {placement} | failed: {done.stderr.strip().splitlines()[-1:]} |")
                continue
            r = rows[placement] = json.loads(line[len("RESULT ") :])
            base = rows.get("off", r)
            same = "same" if r["masks"] == base["masks"] else "DIFFERENT"
            print(
                f"| {model} | {r['parameters'] / 1e6:.0f}M {r['dtype']} | {placement} | {r['load_s']:.1f} | "
                f"{r['prune_s']:.1f} ({r['prune_s'] / base['prune_s']:.2f}x) | {r['eval_s']:.1f} | "
                f"{_gib(r['peak_rss_bytes'])} ({r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x) | "
                f"{_gib(r['peak_gpu_bytes'])} | {r['perplexity']:.3f} | {same} |",
                flush=True,
            )
            if "quantized" in r:
                tables.append((model, r["quantized"]))
    for model, table in tables:
        print(f"\n{model}: weights and perplexity of the dense and pruned model, full precision vs quantized")
        print(table)


if __name__ == "__main__":
    main()
