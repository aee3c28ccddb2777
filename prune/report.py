"""What a pruning run achieved: per role, per layer, overall, and how many weights it removed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from prune.recipe import Recipe
from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES, RoleMap
from prune.state import Masks


@dataclass
class RoleReport:
    params: int
    pruned: int
    requested: float  # the recipe's sparsity for this role (layers outside the range count as 0)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    roles: dict[str, RoleReport]
    per_layer: list[dict[str, float]]  # layer -> role -> achieved sparsity
    linear_params: int  # weights in all role matrices
    total_params: int  # every parameter of the model
    pruned: int
    pruned_per_layer: list[int] = field(default_factory=list)

    @property
    def linear_sparsity(self) -> float:
        return self.pruned / self.linear_params if self.linear_params else 0.0

    @property
    def total_sparsity(self) -> float:
        return self.pruned / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        return {
            "roles": {
                role: {**asdict(r), "sparsity": round(r.sparsity, 6)} for role, r in self.roles.items()
            },
            "per_layer": [{k: round(v, 6) for k, v in layer.items()} for layer in self.per_layer],
            "pruned_per_layer": self.pruned_per_layer,
            "linear_params": self.linear_params,
            "total_params": self.total_params,
            "pruned": self.pruned,
            "linear_sparsity": round(self.linear_sparsity, 6),
            "total_sparsity": round(self.total_sparsity, 6),
        }


def sparsity_report(model: nn.Module, roles: RoleMap, masks: Masks, requested) -> SparsityReport:
    """``requested(layer, role)`` gives the asked-for sparsity; counts come from the masks."""
    table = {role: RoleReport(0, 0, 0.0) for role in roles.roles}
    per_layer, pruned_per_layer = [], []
    for layer in range(roles.num_layers):
        layer_counts = roles.layer_param_counts(model, layer)  # MoE models may mix dense layers
        row, layer_pruned = {}, 0
        for role in roles.roles:
            params = layer_counts[role]
            pruned = int(masks[(layer, role)].sum()) if (layer, role) in masks else 0
            table[role].params += params
            table[role].pruned += pruned
            table[role].requested += requested(layer, role) * params
            row[role] = pruned / params
            layer_pruned += pruned
        per_layer.append(row)
        pruned_per_layer.append(layer_pruned)
    for r in table.values():
        r.requested = r.requested / r.params if r.params else 0.0
    linear = sum(r.params for r in table.values())
    total = sum(p.numel() for p in model.parameters())
    return SparsityReport(
        table, per_layer, linear, total, sum(r.pruned for r in table.values()), pruned_per_layer
    )


def planned_counts(recipe: Recipe, layer_counts: Mapping[str, int], num_layers: int) -> dict[str, int]:
    """Weights a recipe will prune before anything runs (all, attention, MLP) and the totals they
    are counted against. Each role loses its realised fraction of its weights, rounded; row-wise
    pruning takes int(in * s) per row, so it may prune up to one weight per row fewer."""

    def pruned(group: tuple[str, ...]) -> int:
        return sum(
            int(round(recipe.realised_sparsity(layer, role) * layer_counts[role]))
            for layer in range(num_layers)
            for role in group
            if role in layer_counts
        )

    def params(group: tuple[str, ...]) -> int:
        return num_layers * sum(layer_counts.get(role, 0) for role in group)

    return {
        "pruned": pruned(ROLES),
        "attention": pruned(ATTENTION_ROLES),
        "mlp": pruned(MLP_ROLES),
        "linear": params(ROLES),
        "attention_params": params(ATTENTION_ROLES),
        "mlp_params": params(MLP_ROLES),
    }


def removed_report(
    dense: list[dict[str, int]], kept: dict[int, dict[str, int]], total_params: int, requested
) -> SparsityReport:
    """A structured run's report: per (layer, role) the weights its shrunk matrices no longer hold.
    ``dense``: each dense layer's weights per role; ``kept``: dense layer number -> weights per role
    after shrinking (a removed layer is absent); ``requested(role)``: the recipe's unit rate."""
    roles = list(dense[0])
    table = {role: RoleReport(0, 0, requested(role)) for role in roles}
    per_layer, pruned_per_layer = [], []
    for layer, counts in enumerate(dense):
        left = kept.get(layer, dict.fromkeys(roles, 0))
        row = {}
        for role in roles:
            pruned = counts[role] - left[role]
            table[role].params += counts[role]
            table[role].pruned += pruned
            row[role] = pruned / counts[role] if counts[role] else 0.0
        per_layer.append(row)
        pruned_per_layer.append(sum(counts[r] - left[r] for r in roles))
    linear = sum(r.params for r in table.values())
    pruned = sum(r.pruned for r in table.values())
    return SparsityReport(table, per_layer, linear, total_params, pruned, pruned_per_layer)
