"""Does 2:4 pruning make the model faster? Measured, not assumed.

Pruned 2:4 linears hold as many bytes as dense ones and run the same dense kernels. On an NVIDIA
GPU with compute capability >= 8.0, ``torch.sparse.to_sparse_semi_structured`` stores them in the
compressed 2:4 format (half the values plus metadata) and runs the sparse tensor-core kernels
(cuSPARSELt, else CUTLASS). ``measure_24`` converts the pruned role linears of a model in place,
times prefill and decode against the same pruned weights in dense format, and puts the dense
parameters back. The sparse kernels pay off at large batch x sequence (prefill); at small decode
batches they are known to be slower, and the result says what was measured either way.

The caller holds the model in the pruned state for the duration (``with lab.using(state) as
model:``, or the app's ``engine.pruned(session)``), so no other job runs on it meanwhile.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prune.errors import LabError
from prune.progress import checkpoint
from prune.roles import RoleMap

MIN_CAPABILITY = (8, 0)
DTYPES = (torch.float16, torch.bfloat16)
NOT_AVAILABLE = (
    "2:4 speed measurement is not available here: semi-structured sparsity "
    "(torch.sparse.to_sparse_semi_structured) needs an NVIDIA GPU with compute capability >= 8.0"
)


class SpeedError(LabError):
    """2:4 kernels cannot run on this model or device as it is."""


def semi_structured_support(
    available: bool | None = None, capability: tuple[int, int] | None = None
) -> tuple[bool, str]:
    """(True, the GPU) where 2:4 semi-structured kernels can run, else (False, why not).
    ``available`` and ``capability`` default to what ``torch.cuda`` reports."""
    if available is None:
        available = torch.cuda.is_available()
    if not available:
        return False, f"{NOT_AVAILABLE}; this machine has none."
    if capability is None:
        capability = torch.cuda.get_device_capability()
    if tuple(capability) < MIN_CAPABILITY:
        return False, f"{NOT_AVAILABLE}; this GPU has {capability[0]}.{capability[1]}."
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "GPU"
    return True, f"{name} (compute capability {capability[0]}.{capability[1]})"


def _backend():
    """The sparse tensor class ``to_sparse_semi_structured`` will build, and its name."""
    from torch.sparse import SparseSemiStructuredTensor

    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS or not (cusparselt and cusparselt.is_available())
    SparseSemiStructuredTensor._FORCE_CUTLASS = use_cutlass
    if use_cutlass:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS, "CUTLASS"
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT, "cuSPARSELt"


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input columns."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def convertible(model: nn.Module, roles: RoleMap) -> tuple[list[str], dict[str, str]]:
    """The role linears that can be stored as 2:4 (names), and the others with why not."""
    cls, _ = _backend()
    names = sorted({piece.module for _, _, t in roles.items() for piece in t.pieces()})
    ok, skipped = [], {}
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            skipped[name] = f"{type(module).__name__}, not nn.Linear"
        elif weight.dtype not in DTYPES:
            skipped[name] = f"{weight.dtype} (2:4 kernels take float16 or bfloat16)"
        elif not is_24(weight):
            skipped[name] = "not 2:4 sparse (prune it with structure 2:4)"
        else:
            limits = cls._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
            rows, cols = weight.shape
            if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
                skipped[name] = (
                    f"shape {rows} x {cols} is not a multiple of "
                    f"{limits.sparse_min_rows} x {limits.sparse_min_cols}"
                )
            else:
                ok.append(name)
    return ok, skipped


@contextmanager
def semi_structured(model: nn.Module, names: Sequence[str]) -> Iterator[int]:
    """Inside the block, these linears hold their weights as 2:4 semi-structured tensors; the
    original parameters (the same objects, untouched) are put back after. Yields the bytes the
    converted weights take."""
    from torch.sparse import to_sparse_semi_structured

    originals: dict[str, nn.Parameter] = {}
    try:
        nbytes = 0
        for name in names:
            module = model.get_submodule(name)
            originals[name] = module.weight
            sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
            module.weight = nn.Parameter(sparse, requires_grad=False)
            nbytes += sparse_bytes(sparse)
        yield nbytes
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            raise
        raise SpeedError(f"2:4 kernels failed: {str(err).splitlines()[0]}") from err
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight = weight


def sparse_bytes(tensor: torch.Tensor) -> int:
    """Bytes a semi-structured tensor stores (values and metadata, both orientations if kept)."""
    parts = [getattr(tensor, a, None) for a in ("packed", "meta", "packed_t", "meta_t")]
    return sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))


# ----- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (on the CPU it is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        checkpoint()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model: nn.Module, batch: int, seqlen: int, device: torch.device, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen)).to(device)
    return _time(lambda: model(ids, use_cache=False), repeats, device)


@torch.no_grad()
def decode_seconds(
    model: nn.Module, batch: int, prompt: int, steps: int, device: torch.device, repeats: int
) -> float:
    """Seconds for ``steps`` greedy decode steps of ``batch`` sequences after a ``prompt``-token
    prefill (the prefill itself is not timed)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt)).to(device)

    def run() -> None:
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        timer[0] = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    timer = [0.0]
    times = []
    run()  # warm-up
    for _ in range(repeats):
        checkpoint()
        run()
        _sync(device)
        times.append(time.perf_counter() - timer[0])
    return statistics.median(times)


@dataclass
class Pair:
    """One measurement, dense format vs 2:4 format, in the same run."""

    what: str
    tokens: int  # tokens processed per timed run
    dense_s: float
    sparse_s: float

    @property
    def dense_tokens_per_s(self) -> float:
        return self.tokens / self.dense_s

    @property
    def sparse_tokens_per_s(self) -> float:
        return self.tokens / self.sparse_s

    @property
    def speedup(self) -> float:
        """2:4 tokens/s over dense tokens/s (below 1: 2:4 is slower)."""
        return self.dense_s / self.sparse_s

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "dense_tokens_per_s": round(self.dense_tokens_per_s, 1),
            "sparse_tokens_per_s": round(self.sparse_tokens_per_s, 1),
            "speedup": round(self.speedup, 3),
        }


@dataclass
class SpeedResult:
    device: str
    dtype: str
    backend: str
    converted: int  # linears stored as 2:4
    skipped: dict[str, str]
    dense_weight_bytes: int  # the converted linears' weights, dense format
    sparse_weight_bytes: int  # the same weights, 2:4 format
    max_logit_error: float  # max |dense - 2:4| logit over max |dense| logit, one batch
    timings: list[Pair] = field(default_factory=list)

    @property
    def memory_ratio(self) -> float:
        return self.sparse_weight_bytes / self.dense_weight_bytes if self.dense_weight_bytes else 1.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "timings"}
        return {
            **data,
            "memory_ratio": round(self.memory_ratio, 4),
            "timings": [p.to_dict() for p in self.timings],
        }

    def lines(self) -> list[str]:
        """A few lines for a person (the bench prints them; the app shows them)."""
        out = [
            f"2:4 on {self.device}, {self.dtype}, {self.backend}: {self.converted} linears converted"
            + (f", {len(self.skipped)} left dense" if self.skipped else ""),
            f"weight memory of those linears: dense {self.dense_weight_bytes / 2**20:.1f} MiB -> 2:4 "
            f"{self.sparse_weight_bytes / 2**20:.1f} MiB ({self.memory_ratio:.2f}x)",
        ]
        for p in self.timings:
            verdict = "faster" if p.speedup > 1 else "slower"
            out.append(
                f"{p.what}: dense {p.dense_tokens_per_s:,.0f} tok/s, 2:4 {p.sparse_tokens_per_s:,.0f} tok/s "
                f"({p.speedup:.2f}x, {verdict})"
            )
        out.append(f"max logit difference 2:4 vs dense format: {self.max_logit_error:.2e} (relative)")
        return out


def measure_24(
    model: nn.Module,
    roles: RoleMap,
    *,
    prefill: tuple[int, int] = (8, 512),
    decode_batches: Sequence[int] = (1, 32),
    decode_steps: int = 32,
    prompt: int = 64,
    repeats: int = 3,
) -> SpeedResult:
    """Prefill tokens/s (batch x seqlen), decode tokens/s per batch size and weight memory of the
    pruned 2:4 role linears, dense format vs 2:4 format, measured in the same run. ``model`` must
    already be pruned 2:4 (and held in that state by the caller); it is unchanged afterwards."""
    ok, why = semi_structured_support()
    if not ok:
        raise SpeedError(why)
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise SpeedError(f"the model is on {device}; 2:4 kernels run on the GPU")
    names, skipped = convertible(model, roles)
    if not names:
        reasons = sorted(set(skipped.values()))
        raise SpeedError("no linear can be stored as 2:4: " + "; ".join(reasons))
    _, backend = _backend()
    weights = [model.get_submodule(n).weight for n in names]
    dense_bytes = sum(w.numel() * w.element_size() for w in weights)
    batch, seqlen = prefill
    check = torch.randint(0, model.config.vocab_size, (2, min(seqlen, 64))).to(device)
    with torch.no_grad():
        dense_logits = model(check, use_cache=False).logits.float()
    timings = {"prefill": prefill_seconds(model, batch, seqlen, device, repeats)}
    for b in decode_batches:
        timings[b] = decode_seconds(model, b, prompt, decode_steps, device, repeats)
    sparse: dict = {}
    with semi_structured(model, names) as sparse_bytes_:
        with torch.no_grad():
            sparse_logits = model(check, use_cache=False).logits.float()
        sparse["prefill"] = prefill_seconds(model, batch, seqlen, device, repeats)
        for b in decode_batches:
            sparse[b] = decode_seconds(model, b, prompt, decode_steps, device, repeats)
    error = float((dense_logits - sparse_logits).abs().max() / dense_logits.abs().max().clamp(min=1e-12))
    pairs = [Pair(f"prefill {batch} x {seqlen}", batch * seqlen, timings["prefill"], sparse["prefill"])]
    pairs += [
        Pair(f"decode batch {b} ({decode_steps} steps)", b * decode_steps, timings[b], sparse[b])
        for b in decode_batches
    ]
    dtype = str(weights[0].dtype).replace("torch.", "")
    return SpeedResult(
        torch.cuda.get_device_name(device),
        dtype,
        backend,
        len(names),
        skipped,
        dense_bytes,
        sparse_bytes_,
        error,
        pairs,
    )


# ----- dense vs pruned, as the pruned state really stores it ----------------------------------------
DENSE_NOTE = (
    "{structure}: the pruned matrices stay dense (their zeros are stored and multiplied), so no "
    "speedup is expected; only structured pruning (channels, depth) makes them smaller"
)


@dataclass
class ModelSpeed:
    """One model's prefill and decode tokens/s (medians) and its size."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    parameters: int
    weight_bytes: int


@dataclass
class SideBySide:
    """The dense and the pruned model timed in one run: same threads, prompt, new tokens, repeats."""

    device: str
    threads: int
    prompt: int  # prefill prompt tokens (batch 1)
    new_tokens: int  # greedy decode steps (batch 1) after a prompt of ``prompt`` tokens
    repeats: int
    dense: ModelSpeed
    pruned: ModelSpeed
    note: str

    def ratios(self) -> dict[str, float]:
        """Pruned over dense: tokens/s (above 1: faster) and size (below 1: smaller)."""
        d, p = self.dense, self.pruned
        return {
            "prefill": p.prefill_tokens_per_s / d.prefill_tokens_per_s,
            "decode": p.decode_tokens_per_s / d.decode_tokens_per_s,
            "parameters": p.parameters / d.parameters,
            "weight_bytes": p.weight_bytes / d.weight_bytes,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "ratios": {k: round(v, 4) for k, v in self.ratios().items()}}

    def lines(self) -> list[str]:
        r = self.ratios()
        d, p = self.dense, self.pruned
        return [
            f"speed on {self.device} ({self.threads} threads), dense and pruned alternating, median of "
            f"{self.repeats} rounds, warm-up excluded:",
            f"prefill {self.prompt} tokens: dense {d.prefill_tokens_per_s:,.0f} tok/s, pruned "
            f"{p.prefill_tokens_per_s:,.0f} tok/s ({r['prefill']:.2f}x)",
            f"decode {self.new_tokens} tokens: dense {d.decode_tokens_per_s:,.1f} tok/s, pruned "
            f"{p.decode_tokens_per_s:,.1f} tok/s ({r['decode']:.2f}x)",
            f"parameters: dense {d.parameters:,}, pruned {p.parameters:,} ({r['parameters']:.2f}x); weights "
            f"{d.weight_bytes / 2**20:,.1f} -> {p.weight_bytes / 2**20:,.1f} MiB",
            self.note,
        ]


def _size(model: nn.Module) -> tuple[int, int]:
    """Parameters and the bytes they take."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def side_by_side(lab, state, prompt: int = 256, new_tokens: int = 32, repeats: int = 3) -> SideBySide:
    """Prefill and decode tokens/s of the dense model and of ``state`` (a ``PrunedState``) through
    ``lab`` (an ``evaluation.lab.Lab``), in one run. The two alternate round by round (each round
    one warm-up and one timed call of each), so a load change on a shared machine hits both alike;
    medians over ``repeats`` rounds. Token ids are random (speed does not depend on them), the
    same for both."""
    recipe = state.recipe
    structured = recipe is not None and recipe.structured
    note = (
        f"{recipe.structure}: the matrices are smaller, so the pruned model does less work"
        if structured
        else DENSE_NOTE.format(structure=recipe.structure if recipe is not None else "dense")
    )
    seconds: dict[str, tuple[list[float], list[float]]] = {"dense": ([], []), "pruned": ([], [])}
    sizes = {}
    for _ in range(repeats):
        for name, which in (("dense", None), ("pruned", state)):
            with lab.dense() if which is None else lab.using(which) as model:
                device = next(model.parameters()).device
                torch.manual_seed(0)
                seconds[name][0].append(prefill_seconds(model, 1, prompt, device, 1))
                seconds[name][1].append(decode_seconds(model, 1, prompt, new_tokens, device, 1))
                sizes[name] = _size(model)
    speeds = {
        name: ModelSpeed(
            prompt / statistics.median(prefill), new_tokens / statistics.median(decode), *sizes[name]
        )
        for name, (prefill, decode) in seconds.items()
    }
    device = str(lab.loaded.device)
    return SideBySide(device, torch.get_num_threads(), prompt, new_tokens, repeats, **speeds, note=note)
