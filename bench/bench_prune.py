"""Pruning speed: the engine against a reference-style Wanda loop, measured in the same run.

CPU (default): SmolLM2-135M-Instruct, real C4 calibration, also perplexity of cached vs
sequential statistics.
    python bench/bench_prune.py --data-dir ../shared/data
GPU: a random-weight model of LLaMA-2-7B's shapes, 128 x 2048 calibration tokens.
    python bench/bench_prune.py --random llama-2-7b --device cuda --nsamples 128 --seqlen 2048

Printed: (a) sequential pruning, (b) cached re-pruning with new per-module configurations,
(c) the baseline (batch 1, full sort per row, two passes per layer), and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.lab import Lab  # noqa: E402
from prune.recipe import CalibrationSpec, Recipe, parse_sparsity  # noqa: E402
from prune.roles import role_map  # noqa: E402
from runtime.models import LoadedModel, load  # noqa: E402
from runtime.paths import set_data_dir  # noqa: E402

SHAPES = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
    ),
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
}
NEW_CONFIGS = [
    "attn=0.3,mlp=0.6",
    "q=0.2,k=0.2,v=0.5,o=0.5,gate=0.6,up=0.6,down=0.7",
    "all=0.4",
    "attn=0.6,mlp=0.4",
    "mlp=0.5",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, use_cache=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    return LoadedModel(shape, model, None, role_map(model), device, dtype, "random weights")


class _Stop(Exception):
    pass


@torch.no_grad()
def reference_style(model: nn.Module, ids: torch.Tensor, sparsity: float) -> float:
    """The Wanda reference's loop: Catcher for layer-0 inputs, then per layer batch-1 passes with
    hooks, a full stable sort per row, pruning, and a second batch-1 pass. Returns seconds."""
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    layers = model.model.layers
    cache = []

    def catch(_m, args, kwargs):
        cache.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for j in range(ids.shape[0]):
        try:
            model(ids[j : j + 1].to(device), use_cache=False)
        except _Stop:
            pass
    handle.remove()
    inps = [h for h, _ in cache]
    kwargs = [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in cache]
    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler = {n: torch.zeros(m.in_features, device=device) for n, m in linears.items()}
        count = dict.fromkeys(linears, 0)

        def add_batch(name, scaler=scaler, count=count):
            def hook(_m, inp, _out):
                x = inp[0].reshape(-1, inp[0].shape[-1]).t().float()
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / count[name]

            return hook

        handles = [m.register_forward_hook(add_batch(n)) for n, m in linears.items()]
        for j in range(len(inps)):
            layer(inps[j], **kwargs[j])
        for h in handles:
            h.remove()
        for name, m in linears.items():
            metric = m.weight.data.abs() * torch.sqrt(scaler[name].reshape(1, -1))
            order = torch.sort(metric, dim=-1, stable=True)[1]
            mask = torch.zeros_like(metric, dtype=torch.bool)
            mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
            m.weight.data[mask] = 0
        outs = []
        for j in range(len(inps)):
            out = layer(inps[j], **kwargs[j])
            outs.append(out[0] if isinstance(out, tuple) else out)
        inps = outs
    sync(device)
    return time.perf_counter() - start


def zeros(layers: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in layers.named_modules() if isinstance(m, nn.Linear)}


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--random", choices=sorted(SHAPES), help="random weights of these shapes instead")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-windows", type=int, default=8, help="perplexity windows (real models)")
    p.add_argument("--data-dir")
    args = p.parse_args()
    set_data_dir(args.data_dir)

    if args.random:
        device = torch.device("cuda" if args.device == "auto" else args.device)
        dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
        lm = random_model(args.random, device, dtype)
        ids = torch.randint(0, lm.model.config.vocab_size, (args.nsamples, args.seqlen))
    else:
        lm = load(args.model, dtype=args.dtype, device=args.device)
        device = lm.device
    lab = Lab(lm, args.batch_size)
    spec = CalibrationSpec(source="c4", nsamples=args.nsamples, seqlen=args.seqlen)
    base = Recipe(model=lm.name, sparsity=parse_sparsity("all=0.5"), calibration=spec)
    if not args.random:
        ids = lab.calibration_ids(spec)
    print(
        f"model {lm.name} ({lm.roles.num_layers} layers, {lm.num_parameters() / 1e6:.0f}M params) "
        f"on {device} {lm.dtype}; calibration {ids.shape[0]} x {ids.shape[1]} tokens; "
        f"batch size {lab.batch_size}; torch threads {torch.get_num_threads()}"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # (c) the baseline first, on the dense model
    saved = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    t_ref = reference_style(lm.model, ids, 0.5)
    ref_zeros = zeros(lm.model.model.layers)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            p.copy_(saved[name])
    del saved
    print(f"(c) reference-style baseline:           {t_ref:8.2f} s")

    # (a) sequential, the same procedure
    t_seq, seq = timed(lambda: lab.prune(base, ids=ids), device)
    seq_zeros = zeros(lm.model.model.layers)
    same = sum(int((ref_zeros[n] == seq_zeros[n]).sum()) for n in ref_zeros)
    total = sum(z.numel() for z in ref_zeros.values())
    print(
        f"(a) sequential (engine):                {t_seq:8.2f} s   baseline/sequential = "
        f"{t_ref / t_seq:5.2f}x   masks equal to baseline: {same / total:.6f}"
    )
    seq_ppl = None
    if not args.random:
        seq_ppl = ppl(lab, args.eval_windows)

    # (b) cached: one dense pass, then new configurations need only masks
    cached = Recipe(model=lm.name, sparsity=parse_sparsity("all=0.5"), stats_mode="cached", calibration=spec)
    t_pass, first = timed(lambda: lab.prune(cached, ids=ids), device)
    print(f"    cached, first run (dense pass + masks): {t_pass:6.2f} s ({first.stats_source})")
    cached_ppl = ppl(lab, args.eval_windows) if not args.random else None
    times = []
    for config in NEW_CONFIGS:
        recipe = Recipe(model=lm.name, sparsity=parse_sparsity(config), stats_mode="cached", calibration=spec)
        t, result = timed(lambda r=recipe: lab.prune(r, ids=ids), device)
        assert result.calibration_passes == 0
        times.append(t)
    t_re = statistics.median(times)
    print(
        f"(b) cached re-prune, new configuration: {t_re:8.3f} s median of {len(times)} "
        f"(min {min(times):.3f}, max {max(times):.3f})   baseline/re-prune = {t_ref / t_re:7.1f}x"
    )
    if device.type == "cuda":
        print(f"    peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    memory = lab.memory()
    size = memory["dense_copy_bytes"] / 2**30
    print(f"    dense weight copy kept on {memory['dense_copy_on']}: {size:.2f} GiB")
    if seq_ppl is not None:
        print(
            f"perplexity, WikiText-2, {args.eval_windows} windows x 2048 at 50% Wanda: "
            f"sequential {seq_ppl:.3f}  cached {cached_ppl:.3f}  "
            f"(cached/sequential {cached_ppl / seq_ppl:.4f})"
        )
    print(
        f"SUMMARY sequential_s={t_seq:.2f} reference_s={t_ref:.2f} ratio={t_ref / t_seq:.2f} "
        f"reprune_s={t_re:.3f} target_reprune<=1s={'yes' if t_re <= 1 else 'no'}"
    )


def ppl(lab: Lab, windows: int) -> float:
    return lab.perplexity("wikitext2", 2048, windows).perplexity


if __name__ == "__main__":
    main()
