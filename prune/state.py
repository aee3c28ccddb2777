"""The pruned state: what a pruned model is, apart from the dense model it came from.

Masks say which weights are zero; ``values`` hold the weights a method rewrote (SparseGPT), so a
state is complete whatever method made it. A structured state has no masks: its ``structure``
names the heads, channels and layers it keeps. One ``PrunedState`` is what a session keeps, what
``Lab.using`` applies, what a save writes, what a ZeroGPU worker receives and what a quantized
copy starts from. A compact state (a session's, kept at one bit per weight) may leave the values
out: they follow from the recipe, and whoever applies it (``Lab.using``, through the Pruner) solves
them again, so no caller needs to know which method made a state.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from prune.recipe import Recipe
from prune.structured import Structure

Masks = dict[tuple[int, str], torch.Tensor]  # (layer, role) -> bool (rows, in), True = pruned
Values = dict[tuple[int, str], torch.Tensor]  # (layer, role) -> the weights a method rewrote (SparseGPT)


@dataclass(frozen=True, eq=False)
class PrunedState:
    """Masks and rewritten values of one pruning run, the recipe that made them, and a key that
    names the state (two states with one key are the same weights). A state with a key is a
    lasting one (a session's): applied, it stays until a job needs another."""

    masks: Masks = field(default_factory=dict)
    values: Values = field(default_factory=dict)
    recipe: Recipe | None = None
    key: Hashable | None = None
    structure: Structure | None = None  # structured pruning: the units kept (the matrices shrink)

    @property
    def is_dense(self) -> bool:
        return not self.masks and self.structure is None

    @property
    def is_compact(self) -> bool:
        """Values left out that the recipe's method rewrites: applying it solves them again."""
        changes = self.recipe is not None and self.recipe.method_spec.changes_weights
        return changes and bool(self.masks) and not self.values

    def pruned(self) -> int:
        """Weights this state sets to zero by its masks."""
        return sum(int(mask.sum()) for mask in self.masks.values())


DENSE = PrunedState()
