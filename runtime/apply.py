"""Reversible pruning: masks zero weights in place; a copy of the dense weights restores them.

One model in memory then serves the original and any pruned variant (side-by-side generation,
per-session recipes in the app) without loading a second copy.
"""

from __future__ import annotations

import torch
from torch import nn

from prune.roles import RoleMap
from prune.state import Masks, Values

SNAPSHOT_ROOM = 3  # the dense copy goes on the GPU only with this many times its size free there


class DenseWeights:
    """Copies of every matrix that holds a role, taken once, before any pruning.

    Kept on the CPU (pinned, for fast copies back), unless the GPU has room for three times
    their size: then on the GPU, where restoring a 7B model takes milliseconds, not seconds.
    """

    def __init__(self, model: nn.Module, roles: RoleMap):
        self.model = model
        names = [n for layer in range(roles.num_layers) for n in roles.params_in_layer(layer)]
        params = [model.get_parameter(n).data for n in names]  # full parameter names
        self.device = _snapshot_device(params)
        pin = self.device.type == "cpu" and params[0].device.type == "cuda"
        self.weights = {}
        for name, weight in zip(names, params, strict=True):
            copy = weight.detach().to(self.device, copy=True)
            self.weights[name] = copy.pin_memory() if pin else copy

    def restore(self, names: list[str] | None = None) -> None:
        """Copy the dense values back, bitwise."""
        for name in names if names is not None else self.weights:
            self.model.get_parameter(name).data.copy_(self.weights[name], non_blocking=True)
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
    return device if free > SNAPSHOT_ROOM * need else torch.device("cpu")


def snapshot_place(dense: DenseWeights | None, model_device: torch.device) -> str:
    """Where the dense copy is, or will be once something is pruned (for the memory readout)."""
    if dense is not None:
        return str(dense.device)
    return "cpu" if model_device.type == "cpu" else "the GPU if it has room, else the CPU"


def apply_masks(model: nn.Module, roles: RoleMap, masks: Masks, values: Values | None = None) -> None:
    """Zero the masked weights in place (through views, so fused matrices keep other rows); where
    a method updated the kept weights too (``values``, zeros included), write those instead."""
    for key, mask in masks.items():
        views = roles.targets[key].views(model)
        if values and key in values:
            for weight, value in zip(views, split_like(views, values[key]), strict=True):
                weight.copy_(value.to(weight.device, weight.dtype))
        else:
            for weight, part in zip(views, split_like(views, mask), strict=True):
                weight.masked_fill_(part.to(weight.device), 0)


def split_like(views: list[torch.Tensor], tensor: torch.Tensor) -> list[torch.Tensor]:
    """A role's 2D mask (or values) shaped like each of its views: (rows, in) -> (heads, head_dim,
    in) or (experts, rows, in); a role over several matrices is cut in their order."""
    if len(views) == 1:
        return [tensor.reshape(views[0].shape)]
    flat, pieces, start = tensor.reshape(-1), [], 0
    for view in views:
        pieces.append(flat[start : start + view.numel()].reshape(view.shape))
        start += view.numel()
    return pieces


def join_masks(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``split_like`` for a role over several matrices: their 2D masks stacked by
    rows when they have the same width (gate, up), else flattened into one row (down)."""
    if len({p.shape[-1] for p in pieces}) == 1:
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in pieces])
    return torch.cat([p.reshape(-1) for p in pieces]).reshape(1, -1)


def touched_modules(roles: RoleMap, masks: Masks) -> list[str]:
    """Full names of the parameters the masks touch (what ``DenseWeights.restore`` copies back)."""
    return list(dict.fromkeys(name for key in masks for name in roles.targets[key].param_names()))
