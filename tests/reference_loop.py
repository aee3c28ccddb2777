"""The references' way of feeding a layer, by other means than the engine: full forward passes of
the model, one calibration sequence at a time, stopped after the layer, with hooks on its linears.
The earlier layers are already pruned, so each layer sees the pruned model's activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Stop(Exception):
    pass


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def feed_layer(
    model: nn.Module, layer: nn.Module, ids: torch.Tensor, hooks: dict[nn.Module, Callable]
) -> None:
    """Run every sequence of ``ids`` (batch 1) up to the end of ``layer`` with ``hooks`` (module ->
    forward hook) in place."""

    def stop(*_):
        raise _Stop

    handles = [m.register_forward_hook(hook) for m, hook in hooks.items()]
    handles.append(layer.register_forward_hook(stop))
    try:
        for j in range(ids.shape[0]):
            try:
                model(ids[j : j + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
