"""Calibration statistics of every pruned matrix's input: the squared norm of each column (Wanda)
or the Hessian ``2/n sum x x^T`` (SparseGPT; linears that read the same input share one).

Two ways to get them:
- ``sequential_pass``: the reference procedure. Layer by layer, statistics come from one pass of
  the still-dense layer; the caller prunes it; the pruned layer is re-run and its outputs feed
  the next layer.
- ``dense_pass``: one pass of the dense model, every layer at once, so any later sparsity
  setting needs no forward pass at all ("cached" mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prune.progress import Event, Progress, silent
from prune.roles import RoleMap
from prune.sparsegpt import inverse_hessian
from runtime.stream import (
    LayerStream,
    _Stop,
    hidden_of,
    input_device,
    layer_calls,
    resident_fn,
    run_layer,
    with_hidden,
)

KINDS = ("norms", "hessian")


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
        save_file(tensors, str(path), metadata={**metadata, "nsamples": str(self.nsamples)})

    @classmethod
    def load(cls, path: Path, device: torch.device) -> ActivationStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            nsamples = int(f.metadata()["nsamples"])
            norms = {name: f.get_tensor(name).to(device) for name in f.keys() if ":" not in name}
            tokens = {n.split(":", 1)[1]: f.get_tensor(n) for n in f.keys() if n.startswith("tokens:")}
        return cls(norms, nsamples, expert_tokens=tokens)


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]


def _watch(model: nn.Module, names: list[str], kind: str) -> tuple[dict, list]:
    """Hooks that accumulate each module's input statistics. A Hessian is shared by modules that
    receive the very same input tensor one after the other (q, k, v; gate, up): it is added once."""
    stats, owner, handles = {}, {}, []
    last: dict = {"input": None, "owner": None}  # holding the tensor keeps its identity unique
    for name in names:
        module = model.get_submodule(name)
        columns, device = _in_features(module), module.weight.device

        def hook(_m, inp, _out, name=name, columns=columns, device=device):
            x = inp[0]
            if name not in owner:  # the first batch decides who shares
                if kind == "hessian" and x is last["input"]:
                    owner[name] = last["owner"]
                    stats[name] = stats[owner[name]]
                else:
                    owner[name] = name
                    stats[name] = _accumulator(kind, columns, device)
            if owner[name] == name:
                stats[name].add(x.detach())
            last["input"], last["owner"] = x, owner[name]

        handles.append(module.register_forward_hook(hook))
    return stats, handles


def _accumulator(kind: str, columns: int, device: torch.device) -> RunningNorm | RunningHessian:
    return RunningHessian(columns, device) if kind == "hessian" else RunningNorm(columns, device)


def _collected(stats: dict, kind: str, nsamples: int) -> ActivationStats:
    if kind == "hessian":
        return ActivationStats(nsamples=nsamples, hessians={n: acc.hessian for n, acc in stats.items()})
    return ActivationStats({n: acc.sq_norm for n, acc in stats.items()}, nsamples)


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


@torch.no_grad()
def dense_pass(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    progress: Progress = silent,
    kind: str = "norms",
    stream: LayerStream | None = None,
) -> ActivationStats:
    """Statistics (``kind``: norms or hessian) of every pruned matrix from one dense pass; stops
    before the LM head. A streamed model goes layer by layer (same floats, batch by batch); its
    Hessians wait on the CPU, beside the layer weights, until the solves."""
    if stream is not None:
        return _layerwise_dense_pass(model, roles, ids, batch_size, progress, kind, stream)
    names = [n for layer in range(roles.num_layers) for n in roles.modules_in_layer(layer)]
    stats, handles = _watch(model, names, kind)
    experts_names = [n for layer in range(roles.num_layers) for n in roles.experts_in_layer(layer)]
    experts, more = _watch_experts(model, experts_names if kind == "norms" else [])
    handles += more

    def stop(*_):
        raise _Stop

    handles.append(roles.layers(model)[-1].register_forward_hook(stop))
    try:
        chunks = ids.split(batch_size)
        for i, chunk in enumerate(chunks):
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


def _layerwise_dense_pass(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    progress: Progress,
    kind: str,
    stream: LayerStream,
) -> ActivationStats:
    merged = ActivationStats(nsamples=ids.shape[0])

    def collect(_layer: int, stats: ActivationStats) -> bool:
        merged.sq_norms.update(stats.sq_norms)
        moved: dict[int, torch.Tensor] = {}  # one CPU tensor per shared Hessian
        for name, hessian in stats.hessians.items():
            if id(hessian) not in moved:
                moved[id(hessian)] = hessian.cpu()
            merged.hessians[name] = moved[id(hessian)]
        merged.expert_tokens.update(stats.expert_tokens)
        return False  # nothing pruned: the next layer gets the dense outputs

    sequential_pass(model, roles, ids, batch_size, collect, None, progress, kind, stream, "statistics")
    return merged


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    prune_layer: Callable[[int, ActivationStats], bool],
    last_layer: int | None = None,
    progress: Progress = silent,
    kind: str = "norms",
    stream: LayerStream | None = None,
    stage: str = "prune",
) -> None:
    """The references' layer-by-layer procedure (Wanda and SparseGPT alike). ``prune_layer(i,
    stats)`` prunes layer i in place and says whether it changed anything; only then is the layer
    re-run for the next one's inputs. A streamed model's layer is on the compute device for its
    turn only; hidden states wait where the stream says.
    Layers after ``last_layer`` (the last one with anything to prune) are not visited."""
    layers = roles.layers(model)
    last = len(layers) - 1 if last_layer is None else last_layer
    resident = resident_fn(stream)
    hidden_device = stream.hidden_device if stream is not None else None
    calls = layer_calls(model, roles, ids, batch_size)
    hidden = [hidden_of(call) for call in calls[0]]
    for i, layer in enumerate(layers[: last + 1]):
        with resident(i):
            device = next(layer.parameters()).device
            inputs = [with_hidden(call, h.to(device)) for call, h in zip(calls[i], hidden, strict=True)]
            accumulators, handles = _watch(model, roles.modules_in_layer(i), kind)
            experts, more = _watch_experts(model, roles.experts_in_layer(i) if kind == "norms" else [])
            handles += more
            try:
                outputs = [run_layer(layer, *call)[0] for call in inputs]
            finally:
                for h in handles:
                    h.remove()
            stats = _with_experts(_collected(accumulators, kind, ids.shape[0]), experts)
            if prune_layer(i, stats):
                outputs = [run_layer(layer, *call)[0] for call in inputs]
        hidden = [out.to(hidden_device or out.device) for out in outputs]
        done, steps = i + 1, last + 1
        message = f"{'sequential pruning' if stage == 'prune' else 'calibration pass'}: layer {done}/{steps}"
        progress(Event(stage, done / steps, message, step=done, steps=steps))
