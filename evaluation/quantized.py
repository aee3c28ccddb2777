"""Dense and pruned, at full precision and as bitsandbytes int8 / NF4 copies: the bytes the weights
take, the perplexity, and whether the pruned zeros survived quantization.

Weight memory is every parameter as stored. Pruning alone saves none of it: a pruned matrix is
still a dense matrix full of zeros, so the pruned model at full precision takes exactly the dense
model's bytes; quantization is what makes either smaller. Embeddings and the head stay at full
precision in the copies (shared with the original model), so they count at full size.
"""

from __future__ import annotations

from collections.abc import Sequence

from evaluation.lab import Lab
from evaluation.perplexity import PerplexityResult, dataset_label, perplexity
from prune.progress import Progress, silent
from prune.recipe import Recipe
from prune.state import DENSE
from runtime.quantize import check_kind, stored_bytes

FULL = "full precision"


def recipe_key(recipe: Recipe) -> str:
    """The name of the state a recipe prunes to (``Lab.prune(..., key=)``): a table for the recipe
    the lab holds already prunes nothing again."""
    return "recipe:" + recipe.to_json()


def quantization_table(
    lab: Lab,
    recipe: Recipe,
    kinds: Sequence[str],
    datasets: Sequence[str],
    windows: int | None,
    seqlen: int,
    progress: Progress = silent,
    known: dict[str, dict[str, PerplexityResult]] | None = None,
    dense: bool = True,
) -> list[dict]:
    """One row per model (dense unless ``dense`` is off, then pruned as ``recipe`` says) and
    precision (full, then each of ``kinds``): weight memory, perplexity on each dataset (the first
    ``windows`` windows of ``seqlen`` tokens) and, for quantized rows, the zero check per role.
    ``known``: full-precision results already measured (``RunResult.perplexity``), reused. One
    quantized copy is in memory at a time (the lab's are dropped after each model)."""
    for kind in kinds:
        check_kind(kind)
    key = recipe_key(recipe)
    if not lab.holds(key):
        lab.prune(recipe, key=key)
    lm, known = lab.loaded, known or {}
    seqlen = min(seqlen, lm.max_length)
    full_bytes = stored_bytes(lm.model)
    rows = []
    for state in ("dense", "pruned") if dense else ("pruned",):
        full = {}
        for dataset in datasets:
            result = known.get(dataset, {}).get(state)
            if result is None and state == "dense":
                result = lab.dense_perplexity(dataset, seqlen, windows, progress)
            elif result is None:
                result = lab.perplexity(dataset, seqlen, windows, progress)
            full[dataset_label(dataset)] = result.perplexity
        rows.append({"model": state, "weights": FULL, "bytes": full_bytes, "perplexity": full})
        for kind in kinds:
            model, report = lab.quantized(kind, DENSE if state == "dense" else None)
            ppl = {
                dataset_label(dataset): perplexity(
                    model, lm.tokenizer, dataset, seqlen, windows, progress=progress, which=f"{state} {kind}"
                ).perplexity
                for dataset in datasets
            }
            rows.append(
                {
                    "model": state,
                    "weights": kind,
                    "bytes": report.model_bytes,
                    "perplexity": ppl,
                    "zeros": report.zeros,
                    "zeros_moved": report.moved,
                    "roles": report.to_dict()["roles"],
                    "kept_full_precision": list(report.kept),
                }
            )
        lab.drop_quantized()
    return rows


def markdown(rows: list[dict]) -> str:
    """The table for a person: weight memory in MiB, perplexity per dataset, zeros kept."""
    datasets = list(rows[0]["perplexity"]) if rows else []
    head = ["model", "weights", "weight memory", *(f"perplexity {d}" for d in datasets), "zeros kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        zeros = (
            f"{row['zeros'] - row['zeros_moved']:,} of {row['zeros']:,}" if "zeros" in row else "(original)"
        )
        cells = [
            row["model"],
            row["weights"],
            f"{row['bytes'] / 2**20:,.1f} MiB",
            *(f"{row['perplexity'][d]:.3f}" for d in datasets),
            zeros,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "Weight memory: every parameter as stored (quantization scales included; embeddings and head "
        "stay full precision). A pruned model in dense storage takes the dense model's bytes."
    )
    return "\n".join(lines)
