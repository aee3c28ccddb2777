"""Calibration statistics of every pruned matrix's input: the squared norm of each column (Wanda)
or the Hessian ``2/n sum x x^T`` (SparseGPT; linears that read the same input share one).

Two ways to get them, on any placement (held in memory or streamed):
- ``sequential_pass``: the reference procedure. Layer by layer, statistics come from one pass of
  the still-dense layer; the caller prunes it; the pruned layer is re-run and its outputs feed
  the next layer (``runtime.stream.layer_by_layer``, the one layer loop).
- ``calibration_statistics``: one pass of the dense model, so any later sparsity setting needs no
  forward pass at all ("cached" mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prune.allocation import layer_outlier_ratio
from prune.progress import Event, Progress, checkpoint, silent
from prune.recipe import OWL_M
from prune.roles import RoleMap
from prune.sparsegpt import inverse_hessian
from runtime.models import LoadedModel
from runtime.stream import _Stop, input_device, layer_by_layer

KINDS = ("norms", "hessian", "moments")  # moments: norms, column sums and variances (DSnoT)


class RunningMean:
    """A running mean over calibration sequences, as the references' ``add_batch`` keeps it:
    sequences are added one at a time, in order, so batching the forward pass gives the same
    floating-point result as the references' batch of one."""

    nsamples: int

    def add(self, inputs: torch.Tensor) -> None:
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0)
        for sequence in inputs:
            x = sequence.reshape(-1, sequence.shape[-1]).t().float()  # (columns, tokens)
            self.scale(self.nsamples / (self.nsamples + 1))
            self.nsamples += 1
            self.accumulate(x)


class RunningNorm(RunningMean):
    """Wanda's ``WrappedGPT.add_batch``: the mean over sequences of ||X_j||^2 per input column."""

    def __init__(self, columns: int, device: torch.device):
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def scale(self, factor: float) -> None:
        self.sq_norm *= factor

    def accumulate(self, x: torch.Tensor) -> None:
        self.sq_norm += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


class RunningMoments(RunningNorm):
    """DSnoT's ``WrappedGPT.add_batch``: Wanda's norms, the mean over sequences of each input
    column's sum over the sequence's tokens (``sums``), and the column's variance over the tokens
    of each sequence, averaged token-weighted over sequences (``var``, as the reference pools it)."""

    def __init__(self, columns: int, device: torch.device):
        super().__init__(columns, device)
        self.sums = torch.zeros(columns, dtype=torch.float32, device=device)
        self.var = torch.zeros(columns, dtype=torch.float32, device=device)
        self.ntokens = 0

    def scale(self, factor: float) -> None:
        super().scale(factor)
        self.sums *= factor

    def accumulate(self, x: torch.Tensor) -> None:
        super().accumulate(x)
        self.sums += torch.sum(x, dim=1) / self.nsamples
        var, tokens = torch.var(x, dim=1, unbiased=False), x.shape[1]
        self.var = (
            var if self.ntokens == 0 else (self.var * self.ntokens + var * tokens) / (self.ntokens + tokens)
        )
        self.ntokens += tokens


class RunningHessian(RunningMean):
    """SparseGPT's ``add_batch``: ``H = 2/n sum x x^T`` over the sequences seen so far."""

    def __init__(self, columns: int, device: torch.device):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def scale(self, factor: float) -> None:
        self.hessian *= factor

    def accumulate(self, x: torch.Tensor) -> None:
        x = (2 / self.nsamples) ** 0.5 * x
        self.hessian += x.matmul(x.t())


@dataclass
class ActivationStats:
    """Module name -> mean squared L2 norm of each input column (fp32), or -> the input Hessian
    (one tensor object shared by the modules that read the same input)."""

    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    nsamples: int = 0
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    _inverses: dict = field(default_factory=dict, repr=False, compare=False)
    # fused-experts module -> calibration tokens routed to each expert (MoE; see ExpertNorms)
    expert_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    # kind "moments" (DSnoT): module -> per-column sums and variances (see RunningMoments)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    variances: dict[str, torch.Tensor] = field(default_factory=dict)

    def moments(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sums, variances) of a module's input, when these statistics have them."""
        return (self.sums[module], self.variances[module]) if module in self.sums else None

    def unreached_experts(self, modules: list[str] | None = None) -> dict[str, list[int]]:
        """Experts no calibration token reached, per fused-experts module (scored by magnitude)."""
        names = self.expert_tokens if modules is None else [m for m in modules if m in self.expert_tokens]
        found = {name: (self.expert_tokens[name] == 0).nonzero().flatten().tolist() for name in names}
        return {name: experts for name, experts in found.items() if experts}

    def inverse(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT's inverse-Hessian factor and dead columns, computed once per shared Hessian."""
        hessian = self.hessians[module]
        if id(hessian) not in self._inverses:
            self._inverses[id(hessian)] = inverse_hessian(hessian)
        return self._inverses[id(hessian)]

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in self.sq_norms.items()}
        tensors.update({f"tokens:{name}": t.detach().cpu() for name, t in self.expert_tokens.items()})
        for prefix, table in (("sum", self.sums), ("var", self.variances)):
            tensors.update({f"{prefix}:{name}": t.detach().cpu().contiguous() for name, t in table.items()})
        save_file(tensors, str(path), metadata={**metadata, "nsamples": str(self.nsamples)})

    @classmethod
    def load(cls, path: Path, device: torch.device) -> ActivationStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            nsamples = int(f.metadata()["nsamples"])
            norms = {name: f.get_tensor(name).to(device) for name in f.keys() if ":" not in name}
            tables = {prefix: {} for prefix in ("tokens", "sum", "var")}
            for name in f.keys():
                prefix, _, module = name.partition(":")
                if module:
                    tensor = f.get_tensor(name)
                    tables[prefix][module] = tensor if prefix == "tokens" else tensor.to(device)
        return cls(
            norms, nsamples, expert_tokens=tables["tokens"], sums=tables["sum"], variances=tables["var"]
        )


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]


def _watch(model: nn.Module, owners: dict[str, str], kind: str) -> tuple[dict, list]:
    """Hooks that accumulate the input statistics of each module of ``owners`` (module -> the module
    whose Hessian it shares, ``RoleMap.hessian_owners``): a shared Hessian (q, k, v; gate, up) is
    added once, by its owner, and every sharer names the same accumulator. Norms are per module."""
    stats, handles = {}, []
    for name, owner in owners.items():
        if kind != "hessian" or owner == name:
            module = model.get_submodule(name)
            accumulator = _accumulator(kind, _in_features(module), module.weight.device)
            stats[name] = accumulator

            def hook(_m, inp, _out, accumulator=accumulator):
                accumulator.add(inp[0].detach())

            handles.append(module.register_forward_hook(hook))
    for name, owner in owners.items():
        stats.setdefault(name, stats[owner])
    return stats, handles


ACCUMULATORS = {"norms": RunningNorm, "hessian": RunningHessian, "moments": RunningMoments}


def _accumulator(kind: str, columns: int, device: torch.device) -> RunningMean:
    return ACCUMULATORS[kind](columns, device)


def _collected(stats: dict, kind: str, nsamples: int) -> ActivationStats:
    if kind == "hessian":
        return ActivationStats(nsamples=nsamples, hessians={n: acc.hessian for n, acc in stats.items()})
    collected = ActivationStats({n: acc.sq_norm for n, acc in stats.items()}, nsamples)
    if kind == "moments":
        collected.sums = {n: acc.sums for n, acc in stats.items()}
        collected.variances = {n: acc.var for n, acc in stats.items()}
    return collected


class ExpertNorms:
    """Per-expert input statistics of one fused-experts module (Mixtral, Qwen2/3-MoE, OLMoE), from
    the tokens the router sends to each expert: for ``gate_up_proj`` the squared norm of each hidden
    column, for ``down_proj`` that of ``act(gate) * up`` recomputed per expert, summed over the
    expert's tokens and divided by the number of calibration sequences (like ``RunningNorm``), shaped
    (experts, in) so Wanda's scores broadcast per expert over (experts, rows, in).

    Experts that no calibration token reaches get norms of ones: Wanda then ranks their weights by
    magnitude. They still get the role's sparsity (every expert row is pruned like any other row),
    because the router may send them tokens at inference; leaving them dense would break the per-role
    budget, and all-zero norms would tie every score and prune by column index. Which experts these
    are is reported (``ActivationStats.unreached_experts``, the result's calibration info).
    """

    def __init__(self, module: nn.Module):
        experts, rows, hidden = module.gate_up_proj.shape
        device = module.gate_up_proj.device
        self.gate_up = torch.zeros(experts, hidden, dtype=torch.float32, device=device)
        self.down = torch.zeros(experts, module.down_proj.shape[-1], dtype=torch.float32, device=device)
        self.tokens = torch.zeros(experts, dtype=torch.int64)

    def add(self, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = top_k_index.reshape(hidden.shape[0], -1)
        for expert in range(self.tokens.numel()):
            rows = (index == expert).any(dim=-1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            x = hidden[rows]
            self.tokens[expert] += rows.numel()
            self.gate_up[expert] += x.float().pow(2).sum(dim=0)
            gate_up = nn.functional.linear(x, module.gate_up_proj[expert])
            if hasattr(module, "_apply_gate"):  # transformers' own gating of the fused output
                inner = module._apply_gate(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                inner = module.act_fn(gate) * up
            self.down[expert] += inner.float().pow(2).sum(dim=0)

    def collected(self, name: str, nsamples: int) -> dict[str, torch.Tensor]:
        unreached = (self.tokens == 0).to(self.gate_up.device)
        norms = {}
        for param, total in (("gate_up_proj", self.gate_up), ("down_proj", self.down)):
            norms[f"{name}.{param}"] = torch.where(unreached[:, None], 1.0, total / max(nsamples, 1))
        return norms


def _watch_experts(model: nn.Module, names: list[str]) -> tuple[dict[str, ExpertNorms], list]:
    """Hooks on fused-experts modules; their forward gets (hidden_states, top_k_index, weights)."""
    norms, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        norm = ExpertNorms(module)

        def hook(m, args, kwargs, norm=norm):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            norm.add(m, hidden.detach(), index)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        norms[name] = norm
    return norms, handles


def _with_experts(stats: ActivationStats, experts: dict[str, ExpertNorms]) -> ActivationStats:
    for name, norm in experts.items():
        stats.sq_norms.update(norm.collected(name, stats.nsamples))
        stats.expert_tokens[name] = norm.tokens
    return stats


def calibration_statistics(
    lm: LoadedModel, ids: torch.Tensor, batch_size: int, progress: Progress = silent, kind: str = "norms"
) -> ActivationStats:
    """Dense statistics (``kind``: norms or hessian) of every pruned matrix from one pass over
    ``ids``, wherever the model lives: held in memory, one model call per batch (``dense_pass``);
    streamed, layer by layer (same floats, batch by batch), the Hessians waiting on the CPU, beside
    the layer weights, until the solves."""
    if lm.stream is None:
        return dense_pass(lm.model, lm.roles, ids, batch_size, progress, kind)
    merged = ActivationStats(nsamples=ids.shape[0])

    def collect(_layer: int, stats: ActivationStats) -> bool:
        merged.sq_norms.update(stats.sq_norms)
        merged.sums.update(stats.sums)
        merged.variances.update(stats.variances)
        moved: dict[int, torch.Tensor] = {}  # one CPU tensor per shared Hessian
        for name, hessian in stats.hessians.items():
            if id(hessian) not in moved:
                moved[id(hessian)] = hessian.cpu()
            merged.hessians[name] = moved[id(hessian)]
        merged.expert_tokens.update(stats.expert_tokens)
        return False  # nothing pruned: the next layer gets the dense outputs

    sequential_pass(lm, ids, batch_size, collect, None, progress, kind, "statistics")
    return merged


@torch.no_grad()
def dense_pass(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    progress: Progress = silent,
    kind: str = "norms",
) -> ActivationStats:
    """Statistics (``kind``: norms or hessian) of every pruned matrix of a model held in memory, from
    one dense pass of the whole model per batch; stops before the LM head."""
    owners = {}
    for layer in range(roles.num_layers):
        owners.update(roles.hessian_owners(layer))
    stats, handles = _watch(model, owners, kind)
    experts_names = [n for layer in range(roles.num_layers) for n in roles.experts_in_layer(layer)]
    experts, more = _watch_experts(model, experts_names if kind == "norms" else [])
    handles += more

    def stop(*_):
        raise _Stop

    handles.append(roles.layers(model)[-1].register_forward_hook(stop))
    try:
        chunks = ids.split(batch_size)
        for i, chunk in enumerate(chunks):
            checkpoint()
            try:
                model(chunk.to(input_device(model)), use_cache=False)
            except _Stop:
                pass
            done, steps = i + 1, len(chunks)
            progress(
                Event(
                    "statistics",
                    done / steps,
                    f"calibration pass: batch {done}/{steps}",
                    step=done,
                    steps=steps,
                )
            )
    finally:
        for h in handles:
            h.remove()
    return _with_experts(_collected(stats, kind, ids.shape[0]), experts)


def sequential_pass(
    lm: LoadedModel,
    ids: torch.Tensor,
    batch_size: int,
    prune_layer: Callable[[int, ActivationStats], bool],
    last_layer: int | None = None,
    progress: Progress = silent,
    kind: str = "norms",
    stage: str = "prune",
) -> None:
    """The references' layer-by-layer procedure (Wanda and SparseGPT alike), on any placement.
    ``prune_layer(i, stats)`` gets the statistics of one pass of the still-dense layer i, prunes it
    in place and says whether it changed anything; only then is the layer re-run for the next one's
    inputs. Layers after ``last_layer`` (the last one with anything to prune) are not visited."""
    model, roles = lm.model, lm.roles

    def visit(layer: int) -> tuple[list, Callable[[], bool]]:
        accumulators, handles = _watch(model, roles.hessian_owners(layer), kind)
        experts, more = _watch_experts(model, roles.experts_in_layer(layer) if kind == "norms" else [])

        def prune() -> bool:
            return prune_layer(layer, _with_experts(_collected(accumulators, kind, ids.shape[0]), experts))

        return handles + more, prune

    def on_layer(done: int, steps: int) -> None:
        message = f"{'sequential pruning' if stage == 'prune' else 'calibration pass'}: layer {done}/{steps}"
        progress(Event(stage, done / steps, message, step=done, steps=steps))

    layer_by_layer(model, roles, ids, batch_size, lm.stream, visit, last_layer, on_layer)


@torch.no_grad()
def layer_outlier_ratios(lm: LoadedModel, stats: ActivationStats, m: float = OWL_M) -> list[float]:
    """OWL's outlier ratio of every decoder layer of the model as it is now (dense, when a schedule
    asks), from ``stats`` (its calibration statistics); each layer's weights read on any placement."""
    return [
        layer_outlier_ratio([(weight, stats.sq_norms[piece.stats_key]) for piece, weight in pieces], m)
        for _layer, pieces in lm.layer_weights()
    ]
