"""The one method table: what each pruning method is, read by the recipe, the pruner, the command
line and the app alike. Adding a method is adding a row here (plus its score function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prune.errors import RecipeError
from prune.masks import (
    magnitude_scores,
    matrix_threshold_mask,
    nm_mask,
    row_topk_mask,
    variant_mask,
    wanda_scores,
)

Scores = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (weight (out, in), sq norms)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # what the app's dropdown shows
    scores: Scores
    per_row: bool  # compare within each output row (else one threshold per matrix)
    needs_statistics: bool  # needs calibration activations
    supports_nm: bool
    supports_variant: bool  # Wanda's cumulative-sum threshold (use_variant)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "wanda",
            "Wanda (|W| x input norm, per output row)",
            wanda_scores,
            per_row=True,
            needs_statistics=True,
            supports_nm=True,
            supports_variant=True,
        ),
        Method(
            "magnitude",
            "Magnitude (one threshold per matrix)",
            lambda weight, _norms: magnitude_scores(weight),
            per_row=False,
            needs_statistics=False,
            supports_nm=True,
            supports_variant=False,
        ),
        Method(
            "magnitude-row",
            "Magnitude per output row",
            lambda weight, _norms: magnitude_scores(weight),
            per_row=True,
            needs_statistics=False,
            supports_nm=True,
            supports_variant=False,
        ),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_mask(
    m: Method,
    weight: torch.Tensor,
    sq_norm: torch.Tensor | None,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    use_variant: bool = False,
) -> torch.Tensor:
    """The mask one (out, in) weight gets under a method and structure (True = pruned)."""
    scores = m.scores(weight, sq_norm)
    if nm is not None:
        return nm_mask(scores, *nm)
    if not m.per_row:
        return matrix_threshold_mask(scores, sparsity)
    if use_variant:
        return variant_mask(scores, sparsity)
    return row_topk_mask(scores, sparsity)
