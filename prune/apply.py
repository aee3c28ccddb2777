"""Reversible pruning: masks zero weights in place; a CPU copy of the dense weights restores them.

One model in memory then serves the original and any pruned variant (side-by-side generation,
per-session recipes in the app) without loading a second copy.
"""

from __future__ import annotations

import torch
from torch import nn

from prune.roles import RoleMap

Masks = dict[tuple[int, str], torch.Tensor]  # (layer, role) -> bool (out, in), True = pruned


class DenseWeights:
    """CPU copies of every matrix that holds a role, taken once, before any pruning."""

    def __init__(self, model: nn.Module, roles: RoleMap):
        self.model = model
        names = [n for layer in range(roles.num_layers) for n in roles.modules_in_layer(layer)]
        self.weights = {n: model.get_submodule(n).weight.data.detach().to("cpu", copy=True) for n in names}
        self.pinned = False

    def restore(self, names: list[str] | None = None) -> None:
        """Copy the dense values back, bitwise."""
        for name in names if names is not None else self.weights:
            self.model.get_submodule(name).weight.data.copy_(self.weights[name], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())


def apply_masks(model: nn.Module, roles: RoleMap, masks: Masks) -> None:
    """Zero the masked weights in place (through views, so fused matrices keep other rows)."""
    for (layer, role), mask in masks.items():
        for target in roles.targets[(layer, role)]:
            weight = target.weight(model)
            weight.masked_fill_(mask.to(weight.device), 0)


def touched_modules(roles: RoleMap, masks: Masks) -> list[str]:
    return list(dict.fromkeys(t.module for key in masks for t in roles.targets[key]))
