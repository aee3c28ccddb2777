"""Calibration statistics: the squared input norm of every column of every pruned matrix.

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


class RunningNorm:
    """The reference's ``WrappedGPT.add_batch``: running mean over sequences of ||X_j||^2.

    Sequences are added one at a time, in order, so batching the forward pass gives the same
    floating-point result as the reference's batch of one.
    """

    def __init__(self, columns: int, device: torch.device):
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, inputs: torch.Tensor) -> None:
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0)
        for sequence in inputs:
            x = sequence.reshape(-1, sequence.shape[-1]).t().float()
            self.sq_norm *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            self.sq_norm += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


@dataclass
class ActivationStats:
    """Module name -> mean squared L2 norm of each input column (fp32)."""

    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    nsamples: int = 0

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in self.sq_norms.items()}
        save_file(tensors, str(path), metadata={**metadata, "nsamples": str(self.nsamples)})

    @classmethod
    def load(cls, path: Path, device: torch.device) -> ActivationStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            nsamples = int(f.metadata()["nsamples"])
            norms = {name: f.get_tensor(name).to(device) for name in f.keys()}
        return cls(norms, nsamples)


def _in_features(module: nn.Module) -> int:
    weight = module.weight
    return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]


def _watch(model: nn.Module, names: list[str]) -> tuple[dict[str, RunningNorm], list]:
    norms, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        norm = RunningNorm(_in_features(module), module.weight.device)
        handles.append(module.register_forward_hook(lambda _m, inp, _out, n=norm: n.add(inp[0].detach())))
        norms[name] = norm
    return norms, handles


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def dense_pass(
    model: nn.Module, roles: RoleMap, ids: torch.Tensor, batch_size: int, progress: Progress = silent
) -> ActivationStats:
    """Statistics of every pruned matrix from one dense pass; stops before the LM head."""
    names = [n for layer in range(roles.num_layers) for n in roles.modules_in_layer(layer)]
    norms, handles = _watch(model, names)

    def stop(*_):
        raise _Stop

    handles.append(roles.layers(model)[-1].register_forward_hook(stop))
    try:
        chunks = ids.split(batch_size)
        for i, chunk in enumerate(chunks):
            try:
                model(chunk.to(_device(model)), use_cache=False)
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
    return ActivationStats({n: r.sq_norm for n, r in norms.items()}, ids.shape[0])


@torch.no_grad()
def _layer_inputs(model: nn.Module, first_layer: nn.Module, ids: torch.Tensor, batch_size: int):
    """The hidden states (and call arguments) that reach the first decoder layer, per batch."""
    captured = []

    def catch(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for chunk in ids.split(batch_size):
            try:
                model(chunk.to(_device(model)), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    prune_layer: Callable[[int, ActivationStats], bool],
    last_layer: int | None = None,
    progress: Progress = silent,
) -> None:
    """Wanda's layer-by-layer procedure. ``prune_layer(i, stats)`` prunes layer i in place and
    says whether it changed anything; only then is the layer re-run for the next one's inputs.
    Layers after ``last_layer`` (the last one with anything to prune) are not visited."""
    layers = roles.layers(model)
    last = len(layers) - 1 if last_layer is None else last_layer
    calls = _layer_inputs(model, layers[0], ids, batch_size)
    for i, layer in enumerate(layers[: last + 1]):
        norms, handles = _watch(model, roles.modules_in_layer(i))
        try:
            outputs = [_run_layer(layer, *call) for call in calls]
        finally:
            for h in handles:
                h.remove()
        stats = ActivationStats({n: r.sq_norm for n, r in norms.items()}, ids.shape[0])
        if prune_layer(i, stats):
            outputs = [_run_layer(layer, *call) for call in calls]
        calls = [_with_hidden(args, kwargs, out) for (args, kwargs), out in zip(calls, outputs, strict=True)]
        done, steps = i + 1, last + 1
        progress(
            Event("prune", done / steps, f"sequential pruning: layer {done}/{steps}", step=done, steps=steps)
        )
