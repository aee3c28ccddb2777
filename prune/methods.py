"""The one method table: what each pruning method is, read by the recipe, the pruner, the command
line and the app alike. Adding a method is adding a row here (plus its score function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prune.dsnot import dsnot_mask
from prune.errors import RecipeError
from prune.masks import (
    magnitude_scores,
    matrix_threshold_mask,
    nm_mask,
    row_topk_mask,
    variant_mask,
    wanda_scores,
)
from prune.ria import permuted_nm_mask, ria_scores

Scores = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (weight (out, in), sq norms)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # what the app's dropdown shows
    scores: Scores | None  # None: the method chooses its mask while it solves (SparseGPT)
    per_row: bool  # compare within each output row (else one threshold per matrix or block)
    statistics: str | None  # calibration statistics it needs: "norms", "hessian" or None
    supports_nm: bool
    supports_variant: bool  # Wanda's cumulative-sum threshold (use_variant)
    changes_weights: bool = False  # updates the weights it keeps, not just zeros (SparseGPT)
    supports_permute: bool = False  # RIA's channel permutation before N:M (``Recipe.permute``)

    @property
    def needs_statistics(self) -> bool:
        return self.statistics is not None


def _magnitude(weight: torch.Tensor, _sq_norm: torch.Tensor | None) -> torch.Tensor:
    return magnitude_scores(weight)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("wanda", "Wanda (|W| x input norm, per output row)", wanda_scores, True, "norms", True, True),
        Method("magnitude", "Magnitude (one threshold per matrix)", _magnitude, False, None, True, False),
        Method("magnitude-row", "Magnitude per output row", _magnitude, True, None, True, False),
        # RIA's reference prunes unstructured with one threshold per matrix; --per_outneuron per row
        Method(
            "ria",
            "RIA (relative importance x input norm^0.5, one threshold per matrix)",
            ria_scores,
            False,
            "norms",
            True,
            False,
            supports_permute=True,
        ),
        Method(
            "ria-row", "RIA per output row", ria_scores, True, "norms", True, False, supports_permute=True
        ),
        Method(
            "sparsegpt",
            "SparseGPT (inverse-Hessian weight updates, adaptive mask per 128 columns)",
            None,
            False,
            "hessian",
            True,
            False,
            changes_weights=True,
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
    permute: bool = False,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The mask one (out, in) weight gets under a scoring method and structure (True = pruned);
    ``permute``: N:M in RIA's permuted column order; ``moments`` (the input's per-sequence column
    sums and variances): refined by DSnoT."""
    scores = m.scores(weight, sq_norm)
    scores = scores.reshape(-1, scores.shape[-1])  # views (heads, head_dim, in), (experts, rows, in)
    mask = _scored_mask(m, scores, sparsity, nm, use_variant, permute)
    if moments is None:
        return mask
    return dsnot_mask(weight.reshape(scores.shape), mask, sq_norm, *moments, scores, nm)


def _scored_mask(
    m: Method,
    scores: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    use_variant: bool,
    permute: bool,
) -> torch.Tensor:
    if nm is not None:
        return permuted_nm_mask(scores, *nm) if permute else nm_mask(scores, *nm)
    if not m.per_row:
        return matrix_threshold_mask(scores, sparsity)
    if use_variant:
        return variant_mask(scores, sparsity)
    return row_topk_mask(scores, sparsity)
