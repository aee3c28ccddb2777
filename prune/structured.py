"""Structured pruning: whole units go, so the matrices really shrink and the model runs faster.

Two kinds, chosen by ``Recipe.structure``:
- ``channels``: MLP channels (a gate row, an up row and a down column together) and attention
  units, scored by Wanda-sp (An et al., FLAP, 2024, the baseline ``prune_wanda_sp``): the score of
  a unit is ``|W| * sqrt(||X_j||^2)`` of its output matrix (down_proj for a channel, o_proj for a
  head), averaged over that matrix's output rows and summed over the unit's input columns. An
  attention unit is a key/value group (the kv head and every query head that shares it; its score
  is the sum of its query heads' scores) whenever the model has more than one kv head, so grouped
  attention keeps equal groups and the kv cache shrinks too; with one kv head (multi-query) the
  units are the query heads and the kv head stays.
- ``depth``: whole decoder layers, ranked by ShortGPT's block influence (Men et al., 2024):
  ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]`` over the calibration tokens, the layers with the lowest
  BI removed.

Every layer loses the same number of units, so the result is a plain model of a smaller config
(whose query-head count must divide the hidden size, as transformers' Llama configs check).
Here only tensors: which units to keep. ``runtime.structured`` shrinks the modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

STRUCTURED = ("channels", "depth")


@dataclass(frozen=True)
class Structure:
    """The units a structurally pruned model keeps, by the dense model's layer numbers."""

    q_heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> kept query heads
    kv_heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> kept kv heads
    channels: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> kept MLP channels
    layers: tuple[int, ...] | None = None  # kept decoder layers; None: every layer


def removed_count(rate: float, units: int, allowed: Callable[[int], bool] = lambda kept: True) -> int:
    """Units a rate removes: the nearest whole number, at least one unit kept, among the counts
    that leave an ``allowed`` number of units (ties: the fewer removed)."""
    wanted = min(int(round(rate * units)), units - 1)
    counts = [n for n in range(units) if allowed(units - n)]
    return min(counts, key=lambda n: (abs(n - wanted), n))


def kept(scores: torch.Tensor, remove: int) -> tuple[int, ...]:
    """The units left once the ``remove`` lowest-scoring ones go, in their original order."""
    order = torch.argsort(scores.float(), stable=True)
    return tuple(sorted(order[remove:].tolist()))


def wanda_sp_columns(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda-sp's score of each input column of an output matrix (FLAP's ``prune_wanda_sp``):
    ``(|W| * sqrt(scaler_row)).mean(axis=0)``."""
    return (weight.abs().float() * torch.sqrt(sq_norm.float().reshape(1, -1))).mean(dim=0)


def attention_units(num_heads: int, num_kv_heads: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(query heads, kv heads) of each removable attention unit: a whole kv group when there are
    several kv heads (transformers' grouping: query head h reads kv head h // group), else one
    query head with the single kv head kept."""
    group = num_heads // num_kv_heads
    if num_kv_heads == 1:
        return [((h,), ()) for h in range(num_heads)]
    return [(tuple(range(g * group, (g + 1) * group)), (g,)) for g in range(num_kv_heads)]


def head_scores(o_weight: torch.Tensor, o_sq_norm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Wanda-sp's score of each query head: its o_proj columns' scores summed."""
    return wanda_sp_columns(o_weight, o_sq_norm).reshape(-1, head_dim).sum(dim=1)


def kept_heads(
    scores: torch.Tensor, num_kv_heads: int, rate: float, hidden_size: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kept query heads, kept kv heads) of one layer for per-head ``scores``. The kept query heads
    must divide ``hidden_size``: transformers' Llama-family configs refuse any other head count
    (checked on save and load), so the rate goes to the nearest count that is allowed."""
    units = attention_units(scores.numel(), num_kv_heads)
    per_unit = len(units[0][0])
    unit_scores = torch.stack([scores[list(q)].sum() for q, _ in units])
    remove = removed_count(rate, len(units), lambda left: hidden_size % (left * per_unit) == 0)
    keep = kept(unit_scores, remove)
    q = tuple(h for u in keep for h in units[u][0])
    kv = tuple(h for u in keep for h in units[u][1]) if num_kv_heads > 1 else (0,)
    return q, kv


def kept_channels(down_weight: torch.Tensor, down_sq_norm: torch.Tensor, rate: float) -> tuple[int, ...]:
    """The MLP channels one layer keeps (scored on down_proj, whose input columns they are)."""
    scores = wanda_sp_columns(down_weight, down_sq_norm)
    return kept(scores, removed_count(rate, scores.numel()))


def one_minus_cos(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_in, x_out)`` of every token (ShortGPT's block influence before the mean)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    y = outputs.reshape(-1, outputs.shape[-1]).float()
    return 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)


def kept_layers(influence: Sequence[float], rate: float) -> tuple[int, ...]:
    """The decoder layers left once the lowest block influences go (a rate of the layer count)."""
    scores = torch.tensor(list(influence), dtype=torch.float64)
    return kept(scores, removed_count(rate, scores.numel()))
