"""The memory plan: before a model loads, what a run will hold and where, against what is free.

A model that does not fit costs minutes of loading and then fails halfway through a job. The plan
sizes everything from the model's config alone (an empty model on the "meta" device: no weight is
read) and picks how to run:

- **in-memory**: the whole model on the compute device, the usual case;
- **streamed** (``runtime/stream.py``): what lies outside the decoder layers (embeddings, final norm,
  head) stays on the compute device and the decoder layers come to it one at a time; they wait,
  dense, in CPU memory (``store="cpu"``) or are read lazily from the checkpoint's safetensors on
  disk (``store="disk"``) when CPU memory is short; the hidden states of every window wait between
  layers on the compute device when they fit (``hidden="gpu"``), else in CPU memory;
- **spread over several GPUs** (computing on a GPU with others beside it, when one alone is too
  small): in memory, the weights over every GPU, accelerate's hooks moving hidden states along;
- or it refuses before anything loads, naming the numbers.

``plan_memory`` is that one decision: the loader (``runtime.models.load``), the CLI's preview and the
app's preview all take it through ``plan_for_source``.

What each item costs (``e``: bytes per weight in the model's dtype):

- weights: every parameter, tied embeddings once. The dense copy of the pruned matrices makes
  pruning reversible (``runtime.apply.DenseWeights``: on the GPU when it has room for three times its
  size, else on the CPU); a streamed model needs none, its store stays dense. SparseGPT keeps the
  weights it rewrote as well.
- calibration: where a pass goes layer by layer (sequential statistics, any streamed pass), the
  hidden states of every sample, a layer's inputs and outputs: 2 x nsamples x seqlen x hidden x e;
  plus one batch's peak inside a layer (a few hidden-size tensors and the MLP's three widest).
- statistics: Wanda's squared norms, fp32 per input column; SparseGPT's fp32 Hessians (one per
  group of linears that read the same input: q/k/v, gate/up) and their inverse factors. Cached
  statistics keep every layer's, sequential ones a layer's at a time.
- evaluation: one batch's peak and its logits (batch x seqlen x vocab, in the model's dtype, an
  fp32 copy and fp32 log-probabilities); streamed, every window's hidden states too.
- masks: 1 bit per pruned-matrix weight for each app session, on the CPU.

A plan uses at most ``HEADROOM`` of what is free: the allocator's slack, the CUDA context and
temporaries no row names take the rest. Attention scores are not counted: PyTorch's
scaled-dot-product attention, transformers' default, does not hold them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from prune.errors import LabError
from prune.jobs import JobSize, job_size
from prune.recipe import STATS_MODES, Recipe
from prune.roles import RoleMap, role_map
from runtime.apply import SNAPSHOT_ROOM
from runtime.paths import cache_dir

GiB = 2**30
HEADROOM = 0.9  # the share of what is free a plan may use
RESIDENT_LAYERS = {"cuda": 2, "cpu": 1}  # streamed: the layer running (and, on a GPU, the next)
WIKITEXT2_TOKENS = 350_000  # WikiText-2's test split tokenized (Llama's vocabulary: ~340k tokens)
C4_WINDOWS = 256  # the C4 protocol: 256 windows of seqlen tokens
STREAMING = ("auto", "on", "off")
STATISTICS = ("norms", "moments", "hessian", "none")
SPREAD_WEIGHTS = "weights spread over the GPUs"  # a multi-gpu plan's per-GPU weight rows start so
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class MemoryPlanError(LabError):
    """A memory budget that cannot be read, or a run that does not fit in it."""


class DoesNotFit(MemoryPlanError):
    """A run that does not fit in the memory there is; ``shortfall`` says what is missing
    ('needs 27.1 GiB on cuda:0 (weights 24.2 GiB, ...), more than 90% of the ... free'), so a
    front end can word the refusal for its own audience."""

    def __init__(self, message: str, shortfall: str):
        super().__init__(message)
        self.shortfall = shortfall


class ConfigUnavailable(MemoryPlanError):
    """The model's config cannot be read without loading it (no hub, not converted yet): no plan
    then; loading reports what is wrong."""


# ----- budgets written as text -------------------------------------------------------------------
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)$", re.IGNORECASE)


def parse_max_memory(text: str | None) -> dict[str, int]:
    """accelerate-style budgets, ``"cuda:0=20GiB,cpu=64GiB"`` or ``"0=20GB,cpu=32GB"``, as bytes per
    place: ``"cuda:N"`` (a GPU number N means the same), ``"cpu"``, ``"disk"``. Units as
    ``accelerate.utils.convert_file_size_to_int`` reads them (KB/MB/GB powers of 10, KiB/MiB/GiB
    powers of 2), in any case and always bytes; a bare number is bytes."""
    budgets: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise MemoryPlanError(
                f"max memory {part.strip()!r}: write PLACE=SIZE pairs, e.g. cuda:0=20GiB,cpu=64GiB"
            )
        place = _place(key.strip())
        if place in budgets:
            raise MemoryPlanError(f"max memory names {place} twice")
        budgets[place] = _size(value.strip())
    return budgets


def _place(key: str) -> str:
    name = key.lower()
    if name in ("cpu", "disk"):
        return name
    if name.isdigit():
        return f"cuda:{int(name)}"
    if name == "cuda":
        return "cuda:0"
    if name.startswith("cuda:") and name[5:].isdigit():
        return f"cuda:{int(name[5:])}"
    raise MemoryPlanError(f"max memory: unknown place {key!r}; use cuda:N (or N), cpu or disk")


def _size(value: str) -> int:
    match = _SIZE.match(value)
    unit = match and UNITS.get(match.group(2).lower())
    if not unit:
        raise MemoryPlanError(
            f"max memory size {value!r}: a number and a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, "
            "TiB), e.g. 20GiB"
        )
    return int(float(match.group(1)) * unit)


# ----- the model, from its config ----------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    """What a model's weights take in one dtype, and the widths its activations have."""

    model_type: str
    element: int  # bytes per weight in the planned dtype
    parameters: int
    weights_bytes: int  # every parameter, tied embeddings once
    layers_bytes: int  # all decoder layers
    layer_bytes: int  # the largest decoder layer
    outside_bytes: int  # everything outside the decoder layers: embeddings, head, final norm
    linear_bytes: int  # the parameters that hold roles: what the dense copy holds
    linear_weights: int  # the weights masks cover (1 bit each per session)
    hidden_size: int
    intermediate_size: int  # the widest activation inside a layer (the MLP's, usually)
    vocab_size: int  # logits per token
    num_layers: int
    max_length: int  # the context: longer calibration or evaluation windows are cut to it
    norm_columns: tuple[int, ...]  # per layer: input columns with a Wanda norm (per expert for MoE)
    hessian_widths: tuple[tuple[int, ...], ...]  # per layer: the width of each (shared) Hessian


def model_size(config, dtype: torch.dtype, trust_remote_code: bool = False) -> ModelSize:
    """Sizes of the model ``config`` describes, in ``dtype``: built on the "meta" device (shapes
    only, about 0.05 s for a 7B model once its modeling code is imported), the roles found as for
    a loaded model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - no plan then; loading the model reports the real error
        raise ConfigUnavailable(f"no model could be built from the config ({type(err).__name__})") from None
    roles = role_map(model)
    text = config.get_text_config()
    per_layer = [_nbytes(layer.parameters()) for layer in roles.layers(model)]
    linear = [model.get_parameter(n) for i in range(roles.num_layers) for n in roles.params_in_layer(i)]
    head = model.get_output_embeddings()
    return ModelSize(
        model_type=roles.model_type,
        element=dtype.itemsize,
        parameters=sum(p.numel() for p in model.parameters()),
        weights_bytes=_nbytes(model.parameters()),
        layers_bytes=sum(per_layer),
        layer_bytes=max(per_layer),
        outside_bytes=_nbytes(model.parameters()) - sum(per_layer),
        linear_bytes=_nbytes(linear),
        linear_weights=sum(roles.param_counts(model).values()),
        hidden_size=int(text.hidden_size),
        intermediate_size=max(_widest(model, roles, i) for i in range(roles.num_layers)),
        vocab_size=int(head.weight.shape[0] if head is not None else text.vocab_size),
        num_layers=roles.num_layers,
        max_length=context_length(config),
        norm_columns=tuple(_norm_columns(model, roles, i) for i in range(roles.num_layers)),
        hessian_widths=tuple(_hessian_widths(model, roles, i) for i in range(roles.num_layers)),
    )


def context_length(config) -> int:
    """The tokens a model attends over (its config's position limit): longer calibration or
    evaluation windows are cut to it, by the plan and by the pruner alike."""
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", 2048))


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _widest(model, roles: RoleMap, layer: int) -> int:
    """The widest input or output of the layer's pruned matrices (per expert for fused experts)."""
    widths = [max(model.get_submodule(name).weight.shape) for name in roles.modules_in_layer(layer)]
    for name in roles.experts_in_layer(layer):
        experts = model.get_submodule(name)
        widths += [max(experts.gate_up_proj.shape[1:]), max(experts.down_proj.shape[1:])]
    return max(widths)


def _norm_columns(model, roles: RoleMap, layer: int) -> int:
    """Input columns with a squared norm in one layer, as ``runtime.stats`` keeps them."""
    columns = {}
    for role in roles.roles:
        for piece in roles.targets[(layer, role)].pieces():
            columns[piece.stats_key] = piece.weight(model).shape[-1] * max(piece.experts, 1)
    return sum(columns.values())


def _hessian_widths(model, roles: RoleMap, layer: int) -> tuple[int, ...]:
    """One input width per Hessian of a layer, shared as the collector shares them
    (``RoleMap.hessian_owners``: q, k and v one, gate and up another); fused experts have none."""
    owners, widths = roles.hessian_owners(layer), {}
    for role in roles.roles:
        for piece in roles.targets[(layer, role)].pieces():
            if not piece.experts:  # SparseGPT refuses fused experts
                widths.setdefault(owners[piece.stats_key], piece.weight(model).shape[-1])
    return tuple(widths.values())


# ----- what is free ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """Bytes free where a run may put things, each capped by a ``--max-memory`` budget if given."""

    device: str  # the compute device: "cuda:N" or "cpu"
    device_free: int  # free on it (on a CPU: the CPU's available memory)
    cpu_free: int  # CPU memory available
    disk_free: int  # free disk in the lab's cache folder
    capped: tuple[str, ...] = ()  # places a --max-memory budget limits
    gpus: tuple[int, ...] = ()  # free on every visible GPU, cuda:0 first (capped like the device)

    def free(self) -> dict[str, int]:
        """Bytes free per place a row can name (a CPU that computes is one place: ``cpu_free``)."""
        places = {"cpu": self.cpu_free, "disk": self.disk_free}
        if self.device == "cpu":
            return places
        others = {f"cuda:{i}": free for i, free in enumerate(self.gpus) if f"cuda:{i}" != self.device}
        return {self.device: self.device_free, **others, **places}

    def spread_gpus(self) -> dict[str, int]:
        """The GPUs a model may be spread over (every visible one, when computing on a GPU and
        there are several), with what is free on each."""
        if self.device == "cpu" or len(self.gpus) < 2:
            return {}
        free = self.free()
        return {f"cuda:{i}": free[f"cuda:{i}"] for i in range(len(self.gpus))}


def device_name(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda:N"`` (a bare ``cuda`` is the current GPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise MemoryPlanError(f"no memory plan for device {device.type!r}; use cpu or cuda")
    index = device.index if device.index is not None else _current_gpu()
    return f"cuda:{index}"


def _current_gpu() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def available(device: str | torch.device, max_memory: Mapping[str, int] | None = None) -> Budget:
    """What is free now on ``device``, in CPU memory and on the cache folder's disk, each capped by
    ``max_memory`` (as ``parse_max_memory`` returns it)."""
    import psutil

    caps = dict(max_memory or {})
    name = device_name(device)
    cpu = _capped(psutil.virtual_memory().available, caps.get("cpu"))
    disk = _capped(shutil.disk_usage(cache_dir()).free, caps.get("disk"))
    gpus: tuple[int, ...] = ()
    if name == "cpu":
        free = cpu
    elif not torch.cuda.is_available():
        raise MemoryPlanError(f"{name} asked for, but no CUDA GPU is available")
    else:
        gpus = tuple(
            _capped(torch.cuda.mem_get_info(i)[0], caps.get(f"cuda:{i}"))
            for i in range(torch.cuda.device_count())
        )
        free = gpus[int(name.split(":")[1])]
    places = (name, *(f"cuda:{i}" for i in range(len(gpus))), "cpu", "disk")
    capped = tuple(place for place in dict.fromkeys(places) if place in caps)
    return Budget(name, free, cpu, disk, capped, gpus)


def _capped(free: int, cap: int | None) -> int:
    return free if cap is None else min(free, cap)


STATE_SHARE = 0.25  # of the CPU memory free once the model is in: visitors' kept pruned states
STATE_CAP = 2 * GiB


def state_budget(budget: Budget) -> int:
    """Bytes a public app keeps for its sessions' pruned states (masks at 1 bit per weight, on the
    CPU; ``ui.sessions.SessionBook``): a share of the CPU memory free after the model loaded, at
    most ``STATE_CAP``; a state evicted past it is pruned again from its recipe when needed."""
    return int(min(STATE_CAP, STATE_SHARE * budget.cpu_free))


# ----- what a run asks for -----------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What a run will ask of the model: calibration, statistics, evaluation, app sessions."""

    nsamples: int = 128  # calibration sequences (0: a method without statistics)
    seqlen: int = 2048
    batch_size: int = 8  # calibration batch
    eval_windows: int = 0  # windows of the largest evaluation (0: none); see ``evaluation_windows``
    eval_seqlen: int = 2048
    eval_batch: int = 1
    sessions: int = 1  # app sessions, each keeping its masks
    statistics: str = "norms"  # norms (Wanda) | moments (DSnoT) | hessian (SparseGPT) | none (magnitude)
    stats_mode: str = "sequential"  # sequential | cached

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS or self.stats_mode not in STATS_MODES:
            raise MemoryPlanError(
                f"workload statistics {self.statistics!r} / {self.stats_mode!r}: use one of "
                f"{', '.join(STATISTICS)} / {', '.join(STATS_MODES)}"
            )

    @classmethod
    def for_job(cls, size: JobSize, batch_size: int, sessions: int = 1) -> Workload:
        """What a job of this size (``prune.jobs.job_size``) asks for, with this calibration batch."""
        return cls(
            nsamples=size.calibration_samples,
            seqlen=size.calibration_seqlen,
            batch_size=batch_size,
            eval_windows=evaluation_windows(size.eval_datasets, size.eval_windows, size.eval_seqlen),
            eval_seqlen=size.eval_seqlen,
            sessions=sessions,
            statistics=size.statistics,
            stats_mode=size.stats_mode,
        )

    @classmethod
    def for_recipe(cls, recipe: Recipe, batch_size: int, sessions: int = 1) -> Workload:
        """What running ``recipe`` (prune, then evaluate) asks for: ``for_job`` of its run."""
        return cls.for_job(job_size(recipe, "run"), batch_size, sessions)


def default_batch_size(device: str | torch.device) -> int:
    """The calibration batch the pruner uses unless told: 8 on a GPU, 1 on a CPU."""
    return 8 if torch.device(device).type == "cuda" else 1


def evaluation_windows(datasets: Collection[str], max_windows: int | None, seqlen: int) -> int:
    """Windows of the largest of these evaluations: ``max_windows`` when set, else the whole test
    set (C4's protocol: 256 windows; WikiText-2, or a file, taken as ~350k tokens); 0 for none."""
    if not datasets:
        return 0
    full = max(C4_WINDOWS if name == "c4" else math.ceil(WIKITEXT2_TOKENS / seqlen) for name in datasets)
    return min(full, max_windows) if max_windows else full


# ----- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One thing a run holds: how many bytes, and where ("cuda:N", "cpu" or "disk")."""

    item: str
    bytes: int
    where: str
    counted: bool = True  # False: already there (a checkpoint read from disk), shown only


@dataclass(frozen=True)
class MemoryPlan:
    """How a run will use memory: ``mode`` "in-memory", "multi-gpu" (in memory, the weights spread
    over every visible GPU) or "streamed" (with ``store`` "cpu" or "disk" and ``hidden`` "gpu" or
    "cpu"), what it holds where, and why this mode."""

    mode: str
    store: str | None
    hidden: str | None
    rows: tuple[Row, ...]
    budget: Budget
    reason: str = ""

    @property
    def device(self) -> str:
        return self.budget.device

    def totals(self) -> dict[str, int]:
        """Bytes needed per place (rows that are already there left out); a GPU other than the
        compute device only when a row is there."""
        named = {row.where for row in self.rows}
        places = [p for p in self.budget.free() if p in (self.device, "cpu", "disk") or p in named]
        totals = dict.fromkeys(places, 0)
        for row in self.rows:
            if row.counted:
                totals[row.where] += row.bytes
        return totals

    def overflows(self) -> list[tuple[str, int, int]]:
        """(place, bytes needed, bytes free) where the need is over ``HEADROOM`` of what is free."""
        free = self.budget.free()
        return [(p, need, free[p]) for p, need in self.totals().items() if need > HEADROOM * free[p]]

    def fits(self) -> bool:
        return not self.overflows()

    def worst_overflow(self) -> float:
        """How far over its budget the worst place is (bytes over, as a share of the budget)."""
        return max((need - HEADROOM * free) / max(free, 1) for _, need, free in self.overflows())

    def shortfall(self) -> str:
        """What does not fit: '27.1 GiB on cuda:0 (weights 24.2 GiB, ...), more than 90% of ...'."""
        parts = []
        for place, need, free in self.overflows():
            rows = [r for r in self.rows if r.counted and r.where == place and r.bytes >= need / 100]
            largest = sorted(rows, key=lambda r: -r.bytes)[:3]
            items = ", ".join(f"{_short(r.item)} {size_text(r.bytes)}" for r in largest)
            cap = " under --max-memory" if place in self.budget.capped else ""
            parts.append(
                f"needs {size_text(need)} on {place} ({items}), more than {HEADROOM:.0%} of the "
                f"{size_text(free)} {_free_word(place)}{cap}"
            )
        return "; ".join(parts)

    def headline(self) -> str:
        """The choice in one line: 'in memory on cuda:0', 'in memory, spread over 2 GPUs ...',
        'streamed: 2 decoder layers at a time ...'."""
        if self.mode == "in-memory":
            return f"in memory on {self.device}"
        if self.mode == "multi-gpu":
            gpus = self.spread_budgets()
            return f"in memory, spread over {len(gpus)} GPUs ({', '.join(gpus)}), computing on {self.device}"
        layers = RESIDENT_LAYERS[self.device.split(":")[0]]
        store = "CPU memory" if self.store == "cpu" else "the checkpoint on disk"
        hidden = self.device if self.hidden == "gpu" else "cpu"
        return (
            f"streamed: {layers} decoder layer{'s' if layers > 1 else ''} at a time on {self.device}, "
            f"the others in {store}; hidden states between layers on {hidden}"
        )

    def spread_budgets(self) -> dict[str, int]:
        """Spread over GPUs: the bytes of weights each GPU may take (its share, and whatever of its
        ``HEADROOM`` the plan leaves over), for accelerate's ``max_memory``; else nothing."""
        if self.mode != "multi-gpu":
            return {}
        gpus, totals = self.budget.spread_gpus(), self.totals()
        shares = {row.where: row.bytes for row in self.rows if row.item.startswith(SPREAD_WEIGHTS)}
        return {gpu: shares[gpu] + int(HEADROOM * free) - totals[gpu] for gpu, free in gpus.items()}

    def text(self) -> str:
        """A short table for a person: the choice and why, each item in GiB and where, the totals
        against what is free (no paths)."""
        lines = [f"memory plan: {self.headline()}", f"  why: {self.reason}"]
        for row in self.rows:
            note = " (already there)" if not row.counted else ""
            lines.append(f"  {row.bytes / GiB:8.2f} GiB  {row.where:<7} {row.item}{note}")
        lines.append(f"  total: {self.totals_text()}")
        return "\n".join(lines)

    def totals_text(self) -> str:
        """'cuda:0 8.09 of 16.0 GiB free · cpu 12.8 of 64.0 GiB available · disk ...'."""
        free = self.budget.free()
        return " · ".join(
            f"{place} {size_text(need)} of {size_text(free[place])} {_free_word(place)}"
            + (" (--max-memory)" if place in self.budget.capped else "")
            for place, need in self.totals().items()
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "store": self.store,
            "hidden": self.hidden,
            "device": self.device,
            "reason": self.reason,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "totals": self.totals(),
            "free": self.budget.free(),
            "capped": list(self.budget.capped),
            "headroom": HEADROOM,
        }


def size_text(count: int) -> str:
    """Bytes with a unit people read: 14.2 GiB, 0.53 GiB; MiB or KiB below 0.01 GiB (tiny models)."""
    unit, scale = (
        ("GiB", GiB) if count >= GiB / 100 else ("MiB", 2**20) if count >= 2**20 / 100 else ("KiB", 1024)
    )
    value = count / scale
    return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"


def _free_word(place: str) -> str:
    return "available" if place == "cpu" else "free"


def _short(item: str) -> str:
    return item.split(" (")[0].split(":")[0]


def plan_memory(
    size: ModelSize, budget: Budget, workload: Workload, streaming: str = "auto", download_bytes: int = 0
) -> MemoryPlan:
    """Where a run's model lives, the one decision the loader and both previews take: in memory on
    the compute device when everything fits; else, on a GPU with others beside it, in memory spread
    over all of them (the references' multi-GPU layout) when that fits; else streamed, the fastest
    way that fits (layers in CPU memory before disk, hidden states on the GPU before the CPU); else
    a ``MemoryPlanError`` that names the numbers. ``streaming="off"`` never streams, "on" always
    does. ``download_bytes``: a checkpoint that must first land on disk."""
    if streaming not in STREAMING:
        raise MemoryPlanError(f"streaming {streaming!r}: use {', '.join(STREAMING)}")
    extra = [Row("checkpoint to download", download_bytes, "disk")] if download_bytes else []
    whole = MemoryPlan("in-memory", None, None, tuple(_in_memory(size, budget, workload) + extra), budget)
    if streaming != "on" and whole.fits():
        reason = "streaming off, and everything fits" if streaming == "off" else _fits_reason(whole)
        return dataclasses.replace(whole, reason=reason)
    gpus = budget.spread_gpus()
    if streaming != "on" and gpus:
        spread = MemoryPlan("multi-gpu", None, None, tuple(_spread(size, budget, workload) + extra), budget)
        if spread.fits():
            why = f"on {budget.device} alone it {whole.shortfall()}; {len(gpus)} GPUs hold it"
            return dataclasses.replace(spread, reason=why)
    if streaming == "off":
        raise DoesNotFit(
            f"this run does not fit in memory (streaming off): it {whole.shortfall()}; "
            f"{_advice(budget, streaming)}",
            whole.shortfall(),
        )
    streamed = [
        MemoryPlan(
            "streamed", store, hidden, tuple(_streamed(size, budget, workload, store, hidden) + extra), budget
        )
        for store, hidden in _streamed_options(budget.device)
    ]
    for plan in streamed:
        if plan.fits():
            why = "streaming asked for" if streaming == "on" else f"in memory it {whole.shortfall()}"
            return dataclasses.replace(plan, reason=why)
    closest = min(streamed, key=MemoryPlan.worst_overflow)
    raise DoesNotFit(
        f"this run does not fit, even streamed: it {closest.shortfall()}; {_advice(budget, streaming)}",
        closest.shortfall(),
    )


def _fits_reason(plan: MemoryPlan) -> str:
    free, totals = plan.budget.free(), plan.totals()
    device = plan.device
    return f"everything fits: {size_text(totals[device])} of {size_text(free[device])} on {device}"


def _advice(budget: Budget, streaming: str) -> str:
    tips = []
    if budget.capped:
        tips.append("a larger --max-memory")
    if streaming == "off":
        tips.append("streaming (--streaming auto)")
    tips += ["fewer calibration samples or tokens", "fewer evaluation windows", "a smaller model or dtype"]
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1]


def _streamed_options(device: str) -> list[tuple[str, str]]:
    """(store, hidden) from fastest to most frugal; a CPU reads the layers from disk."""
    if device == "cpu":
        return [("disk", "cpu")]
    return [("cpu", "gpu"), ("cpu", "cpu"), ("disk", "gpu"), ("disk", "cpu")]


def _tokens(seqlen: int, size: ModelSize) -> int:
    return min(seqlen, size.max_length)


def _batch_peak(size: ModelSize, tokens: int) -> int:
    """One batch inside a decoder layer: the residual stream and a few hidden-size tensors, and the
    MLP's three widest (gate, up and their product) at once."""
    return tokens * (4 * size.hidden_size + 3 * size.intermediate_size) * size.element


def _logits(size: ModelSize, tokens: int) -> int:
    """Logits in the model's dtype, their fp32 copy and fp32 log-probabilities (perplexity)."""
    return tokens * size.vocab_size * (size.element + 8)


def _hidden_states(size: ModelSize, work: Workload) -> tuple[int, int]:
    """Every sequence's hidden states, a layer's inputs and outputs: (calibration, evaluation)."""
    per_token = 2 * size.hidden_size * size.element
    calibration = work.nsamples * _tokens(work.seqlen, size) * per_token
    return calibration, work.eval_windows * _tokens(work.eval_seqlen, size) * per_token


def _working(size: ModelSize, work: Workload, calibration_states: int) -> tuple[int, int]:
    """(calibration, evaluation) bytes a pass needs on the compute device beyond the weights."""
    calibration = 0
    if work.nsamples:
        calibration = _batch_peak(size, work.batch_size * _tokens(work.seqlen, size)) + calibration_states
    evaluation = 0
    if work.eval_windows:
        tokens = work.eval_batch * _tokens(work.eval_seqlen, size)
        evaluation = _batch_peak(size, tokens) + _logits(size, tokens)
    return calibration, evaluation


def _statistics(size: ModelSize, work: Workload, every_layer: bool) -> int:
    """fp32 norms (DSnoT's moments: norms, sums and variances), or Hessians with their inverse
    factors, of every layer or of the largest one (with one Hessian's worth of temporaries while it
    accumulates)."""
    if work.statistics == "none" or not work.nsamples:
        return 0
    if work.statistics in ("norms", "moments"):
        vectors = 3 if work.statistics == "moments" else 1
        per_layer = [vectors * 4 * columns for columns in size.norm_columns]
        return sum(per_layer) if every_layer else max(per_layer)
    per_layer = [2 * 4 * sum(w * w for w in widths) for widths in size.hessian_widths]
    widest = max(w for widths in size.hessian_widths for w in widths)
    return (sum(per_layer) if every_layer else max(per_layer)) + 4 * widest * widest


def _statistics_label(work: Workload) -> str:
    labels = {"norms": "Wanda's norms", "moments": "DSnoT's input moments"}
    return labels.get(work.statistics, "SparseGPT's Hessians and inverses")


def _masks(size: ModelSize, work: Workload) -> Row:
    sessions = f"{work.sessions} session{'s' if work.sessions != 1 else ''}"
    return Row(
        f"masks, 1 bit per pruned-matrix weight ({sessions})",
        work.sessions * -(-size.linear_weights // 8),
        "cpu",
    )


def _activations(calibration: int, evaluation: int, where: str) -> list[Row]:
    if not (calibration or evaluation):
        return []
    phases = f"calibration ({size_text(calibration)}) and evaluation ({size_text(evaluation)})"
    item = f"activations: the larger of {phases}"
    return [Row(item, max(calibration, evaluation), where)]


def _in_memory(size: ModelSize, budget: Budget, work: Workload) -> list[Row]:
    device = budget.device
    room = budget.device_free - size.weights_bytes
    snapshot = device if device != "cpu" and room > SNAPSHOT_ROOM * size.linear_bytes else "cpu"
    rewrote = [Row("weights SparseGPT rewrote", size.linear_bytes, device)]
    return _resident(size, work, device, [Row("weights", size.weights_bytes, device)], snapshot, rewrote)


def _spread(size: ModelSize, budget: Budget, work: Workload) -> list[Row]:
    """In memory over every GPU, the weights in proportion to what is free on each (accelerate's
    balanced layout, near enough); the dense copy on the CPU (``runtime.apply`` keeps it there for
    weights on several devices); statistics and activations on the compute device."""
    gpus = budget.spread_gpus()
    total = max(sum(gpus.values()), 1)

    def shares(item: str, count: int) -> list[Row]:
        return [Row(f"{item} ({gpu}'s share)", count * free // total, gpu) for gpu, free in gpus.items()]

    weights = shares(SPREAD_WEIGHTS, size.weights_bytes)
    rewrote = shares("weights SparseGPT rewrote", size.linear_bytes)
    return _resident(size, work, budget.device, weights, "cpu", rewrote)


def _resident(
    size: ModelSize, work: Workload, device: str, weights: list[Row], snapshot: str, rewrote: list[Row]
) -> list[Row]:
    """What a model held in memory needs besides its weights (``weights``): the dense copy (on
    ``snapshot``), SparseGPT's rewritten weights (``rewrote``), statistics, activations, masks."""
    copy = Row("dense copy of the pruned matrices (makes pruning reversible)", size.linear_bytes, snapshot)
    rows = [*weights, copy]
    if work.statistics == "hessian":
        rows += rewrote
    cached = work.stats_mode == "cached"
    stats = _statistics(size, work, every_layer=cached)
    if stats:
        rows.append(
            Row(f"{_statistics_label(work)} ({'every layer' if cached else 'one layer'})", stats, device)
        )
    states = 0 if cached else _hidden_states(size, work)[0]  # sequential: a layer's inputs and outputs
    rows += _activations(*_working(size, work, states), device)
    rows.append(_masks(size, work))
    return rows


def _streamed(size: ModelSize, budget: Budget, work: Workload, store: str, hidden: str) -> list[Row]:
    device = budget.device
    resident = RESIDENT_LAYERS[device.split(":")[0]]
    rows = [
        Row("embeddings, head and final norm", size.outside_bytes, device),
        Row(
            f"{resident} decoder layer{'s' if resident > 1 else ''} at a time",
            resident * size.layer_bytes,
            device,
        ),
    ]
    if store == "cpu":
        rows.append(Row("decoder layers, dense (the store is the dense copy)", size.layers_bytes, "cpu"))
    else:
        rows.append(Row("decoder layers, read from the checkpoint", size.layers_bytes, "disk", counted=False))
    if work.statistics == "hessian":
        rows.append(Row("weights SparseGPT rewrote", size.linear_bytes, "cpu"))
    stats = _statistics(size, work, every_layer=False)
    if stats:
        rows.append(Row(f"{_statistics_label(work)} (one layer)", stats, device))
    if stats and work.stats_mode == "cached":
        rows.append(
            Row(f"{_statistics_label(work)} (every layer, cached)", _statistics(size, work, True), "cpu")
        )
    rows += _activations(*_working(size, work, 0), device)
    states = max(_hidden_states(size, work))
    if states:
        where = device if hidden == "gpu" else "cpu"
        rows.append(Row("hidden states of every window between layers (inputs and outputs)", states, where))
    rows.append(_masks(size, work))
    return rows


# ----- from a model's name -----------------------------------------------------------------------
def read_config(source: str, revision: str | None = None, trust_remote_code: bool = False, token=None):
    """The config of a local folder or hub id (a small file: no weights), from the download cache
    when it is there (no request: offline, the hub's retries take half a minute), else from the hub;
    ``ConfigUnavailable`` when it cannot be read (offline, gated, no such model: loading says which)."""
    from transformers import AutoConfig

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if token is not None:
        kwargs["token"] = token
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not in the cache (or not readable there): ask the hub
        pass
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, there is no plan; loading reports it
        raise ConfigUnavailable(f"the model's config could not be read ({type(err).__name__})") from None


def plan_for_source(
    source_or_config,
    dtype: torch.dtype,
    device: str | torch.device,
    workload: Workload,
    max_memory: str | Mapping[str, int] | None = None,
    streaming: str = "auto",
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    token=None,
    source: str | None = None,
    budget: Budget | None = None,
) -> MemoryPlan:
    """The plan (``plan_memory``) for a model given by a local folder or hub id (its config is read)
    or by its config (what ``runtime.models.load`` has read; ``source``: where from); a hub
    checkpoint not yet downloaded must fit on disk. ``max_memory``: text as ``parse_max_memory``
    reads it, or its result; ``budget``: what is free, when not measured now (``available``)."""
    if isinstance(source_or_config, str):
        source = source_or_config
        config = read_config(source, revision, trust_remote_code, token)
    else:
        config = source_or_config
    caps = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    size = model_size(config, dtype, trust_remote_code)
    download = 0
    if source is not None and not _on_disk(source, revision):
        download = size.parameters * _stored_element(config, dtype)
    return plan_memory(size, budget or available(device, caps), workload, streaming, download)


def _on_disk(source: str, revision: str | None) -> bool:
    """A local folder, or a hub checkpoint already in the download cache."""
    if Path(source).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors.index.json", "model.safetensors"):
        try:
            if isinstance(try_to_load_from_cache(source, filename, revision=revision), str):
                return True
        except ValueError:  # not a valid repository id: loading says so
            return True
    return False


def _stored_element(config, fallback: torch.dtype) -> int:
    """Bytes per weight in the checkpoint, as its config says (else the planned dtype's)."""
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored.itemsize if isinstance(stored, torch.dtype) else fallback.itemsize
