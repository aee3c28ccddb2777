"""Reversible pruning: masks zero weights in place; a copy of the dense weights restores them.

One model in memory then serves the original and any pruned variant (side-by-side generation,
per-session recipes in the app) without loading a second copy.
"""

from __future__ import annotations

import torch
from torch import nn

from prune.roles import RoleMap

Masks = dict[tuple[int, str], torch.Tensor]  # (layer, role) -> bool (out, in), True = pruned


class DenseWeights:
    """Copies of every matrix that holds a role, taken once, before any pruning.

    Kept on the CPU (pinned, for fast copies back), unless the GPU has room for three times
    their size: then on the GPU, where restoring a 7B model takes milliseconds, not seconds.
    """

    def __init__(self, model: nn.Module, roles: RoleMap):
        self.model = model
        names = [n for layer in range(roles.num_layers) for n in roles.modules_in_layer(layer)]
        params = [model.get_submodule(n).weight.data for n in names]
        self.device = _snapshot_device(params)
        pin = self.device.type == "cpu" and params[0].device.type == "cuda"
        self.weights = {}
        for name, weight in zip(names, params, strict=True):
            copy = weight.detach().to(self.device, copy=True)
            self.weights[name] = copy.pin_memory() if pin else copy

    def restore(self, names: list[str] | None = None) -> None:
        """Copy the dense values back, bitwise."""
        for name in names if names is not None else self.weights:
            self.model.get_submodule(name).weight.data.copy_(self.weights[name], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values())


def _snapshot_device(params: list[torch.Tensor]) -> torch.device:
    device = params[0].device
    if device.type != "cuda" or any(p.device != device for p in params):
        return torch.device("cpu")
    need = sum(p.numel() * p.element_size() for p in params)
    free, _ = torch.cuda.mem_get_info(device)
    return device if free > 3 * need else torch.device("cpu")


def snapshot_place(dense: DenseWeights | None, model_device: torch.device) -> str:
    """Where the dense copy is, or will be once something is pruned (for the memory readout)."""
    if dense is not None:
        return str(dense.device)
    return "cpu" if model_device.type == "cpu" else "the GPU if it has room, else the CPU"


def apply_masks(model: nn.Module, roles: RoleMap, masks: Masks) -> None:
    """Zero the masked weights in place (through views, so fused matrices keep other rows)."""
    for key, mask in masks.items():
        weight = roles.targets[key].weight(model)
        weight.masked_fill_(mask.to(weight.device), 0)


def touched_modules(roles: RoleMap, masks: Masks) -> list[str]:
    return list(dict.fromkeys(roles.targets[key].module for key in masks))
