"""The engine: a recipe in, a pruned model (reversibly) and a report out.

A ``Pruner`` wraps one loaded model. It memoizes calibration ids and, in cached mode, the
activation statistics (in memory and on disk, keyed by model + calibration token ids), so a
new sparsity setting costs only the masks. It has no lock: ``evaluation.Lab`` is its only caller
and serialises every job on the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

import torch

from prune import calibration
from prune.apply import DenseWeights, Masks, apply_masks, touched_modules
from prune.masks import mask_from_ranks, row_ranks
from prune.methods import method_mask
from prune.models import LoadedModel
from prune.paths import cache_dir
from prune.progress import Event, Progress, scaled, silent
from prune.recipe import CalibrationSpec, Recipe, RecipeError
from prune.report import SparsityReport, sparsity_report
from prune.roles import ROLES
from prune.stats import ActivationStats, dense_pass, sequential_pass


@dataclass
class PruneResult:
    recipe: Recipe
    report: SparsityReport
    masks: Masks
    timings: dict[str, float]
    stats_source: str  # "sequential", "cached: memory", "cached: disk", "cached: computed", "none"
    calibration_passes: int  # forward passes over the calibration set this run needed
    calibration: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "stats_source": self.stats_source,
            "calibration_passes": self.calibration_passes,
            "calibration": self.calibration,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "report": self.report.to_dict(),
        }


def ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()[:16]


class Pruner:
    def __init__(self, loaded: LoadedModel, batch_size: int | None = None):
        self.loaded = loaded
        self.batch_size = batch_size or (8 if loaded.device.type == "cuda" else 1)
        self.dense: DenseWeights | None = None
        self.masks: Masks = {}  # what is applied to the model now
        self.calibration_passes = 0  # forward passes over calibration sets, ever
        self._ids: dict[str, torch.Tensor] = {}
        self._stats: dict[str, ActivationStats] = {}
        # Row ranks of dense scores per (stats key, method): re-pruning is then one comparison
        # per weight. Kept on CPU only, where kthvalue is the bottleneck (2 bytes per weight).
        self._ranks: dict[tuple[str, str], dict[tuple[int, str], torch.Tensor]] = {}
        self.use_ranks = loaded.device.type == "cpu"

    # ----- calibration and statistics -----------------------------------------------------------
    def seqlen_for(self, requested: int) -> int:
        """Never above the model's context (the reference's max_position_embeddings can OOM)."""
        return min(requested, self.loaded.max_length)

    def calibration_ids(self, spec: CalibrationSpec) -> torch.Tensor:
        """The calibration tokens of a spec (its seqlen capped at the model's context), memoized.
        Generated calibration samples the dense model; the current masks are put back after."""
        spec = dataclasses.replace(spec, seqlen=self.seqlen_for(spec.seqlen))
        if spec.key() not in self._ids:
            masks = self.masks
            self.restore()
            try:
                self._ids[spec.key()] = calibration.calibration_ids(
                    spec, self.loaded.tokenizer, self.loaded.model, self.batch_size
                )
            finally:
                self.apply(masks)
        return self._ids[spec.key()]

    def _stats_key(self, ids: torch.Tensor) -> str:
        lm = self.loaded
        text = f"{lm.name}|{lm.source}|{lm.model.config._name_or_path}|{lm.dtype}|{ids_digest(ids)}"
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def cached_statistics(
        self, ids: torch.Tensor, progress: Progress = silent
    ) -> tuple[ActivationStats, str]:
        """Dense statistics for these ids: from memory, from disk, or one calibration pass (on the
        dense model; the current masks are put back after)."""
        key = self._stats_key(ids)
        if key in self._stats:
            return self._stats[key], "cached: memory"
        path = cache_dir("stats") / f"{key}.safetensors"
        if path.exists():
            stats, source = ActivationStats.load(path, self.loaded.device), "cached: disk"
        else:
            masks = self.masks
            self.restore()
            try:
                stats = dense_pass(self.loaded.model, self.loaded.roles, ids, self.batch_size, progress)
            finally:
                self.apply(masks)
            self.calibration_passes += 1
            stats.save(path, {"model": self.loaded.name, "ids": ids_digest(ids)})
            source = "cached: computed"
        self._stats[key] = stats
        return stats, source

    # ----- masks --------------------------------------------------------------------------------
    def _layer_masks(
        self, recipe: Recipe, layer: int, stats: ActivationStats | None, ranks: dict | None = None
    ) -> Masks:
        """Masks of one layer; ``ranks`` (from ``_rank_cache``) only when the weights are dense."""
        model, roles, spec = self.loaded.model, self.loaded.roles, recipe.method_spec
        masks = {}
        for role in roles.roles:
            sparsity = recipe.sparsity_for(layer, role)
            if sparsity <= 0:
                continue
            target = roles.targets[(layer, role)]
            sq_norm = stats.sq_norms[target.module] if stats is not None else None
            weight = target.weight(model)
            if ranks is None:
                masks[(layer, role)] = method_mask(
                    spec, weight, sq_norm, sparsity, recipe.nm, recipe.use_variant
                )
                continue
            if (layer, role) not in ranks:
                ranks[(layer, role)] = row_ranks(spec.scores(weight, sq_norm))
            masks[(layer, role)] = mask_from_ranks(ranks[(layer, role)], sparsity)
        return masks

    def _rank_cache(self, recipe: Recipe, stats_key: str) -> dict | None:
        """Row ranks of the dense scores for (statistics, method), where masks can come from them."""
        row_wise = recipe.nm is None and not recipe.use_variant and recipe.method_spec.per_row
        if not (row_wise and self.use_ranks):
            return None
        return self._ranks.setdefault((stats_key, recipe.method), {})

    def _check(self, recipe: Recipe) -> None:
        """What only the loaded model can tell: its roles, its layers, its matrix widths."""
        roles = self.loaded.roles
        tables = [recipe.sparsity, *recipe.per_layer.values()]
        asked = {key for table in tables for key, value in table.items() if value > 0 and key in ROLES}
        missing = asked - set(roles.roles)
        if missing:
            raise RecipeError(
                f"{self.loaded.name} ({roles.model_type}) has no {', '.join(sorted(missing))} role; "
                f"its roles are {', '.join(roles.roles)}"
            )
        bad_layers = [layer for layer in recipe.per_layer if not 0 <= layer < roles.num_layers]
        if bad_layers:
            raise RecipeError(f"per_layer names layers {bad_layers}; the model has {roles.num_layers}")
        if recipe.nm:
            m = recipe.nm[1]
            for layer, role, target in roles.items():
                if recipe.sparsity_for(layer, role) > 0:
                    width = target.weight(self.loaded.model).shape[1]
                    if width % m:
                        raise RecipeError(f"{role} has {width} input columns, not divisible by M={m}")

    # ----- the run ------------------------------------------------------------------------------
    def prune(
        self, recipe: Recipe, progress: Progress = silent, ids: torch.Tensor | None = None
    ) -> PruneResult:
        """Restore the dense model, then prune it in place as the recipe says."""
        self._check(recipe)
        self.restore()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        passes_before = self.calibration_passes
        calib_info: dict = {}
        roles = self.loaded.roles
        wanted = [
            layer
            for layer in range(roles.num_layers)
            if any(recipe.sparsity_for(layer, r) > 0 for r in roles.roles)
        ]
        if not recipe.needs_statistics or not wanted:
            masks: Masks = {}
            ranks = self._rank_cache(recipe, "")  # scores from the weights alone
            for layer in wanted:
                masks.update(self._layer_masks(recipe, layer, None, ranks))
            source = "none"
        else:
            t = time.perf_counter()
            progress(Event("calibration", 0.0, f"calibration data: {recipe.calibration.source}"))
            if ids is None:
                ids = self.calibration_ids(recipe.calibration)
            timings["calibration_data_s"] = time.perf_counter() - t
            calib_info = {
                "source": recipe.calibration.source,
                "nsamples": int(ids.shape[0]),
                "seqlen": int(ids.shape[1]),
                "tokens": int(ids.numel()),
                "ids": ids_digest(ids),
            }
            if recipe.stats_mode == "cached":
                t = time.perf_counter()
                stats, source = self.cached_statistics(ids, scaled(progress, 0.0, 0.9))
                timings["statistics_s"] = time.perf_counter() - t
                masks = {}
                t = time.perf_counter()
                ranks = self._rank_cache(recipe, self._stats_key(ids))
                for layer in wanted:
                    masks.update(self._layer_masks(recipe, layer, stats, ranks))
                timings["masks_s"] = time.perf_counter() - t
            else:
                masks = self._sequential(recipe, ids, wanted[-1], progress)  # applied layer by layer
                source = "sequential"
                self.calibration_passes += 1
        t = time.perf_counter()
        if source != "sequential":
            self.apply(masks)
        timings["apply_s"] = time.perf_counter() - t
        report = sparsity_report(self.loaded.model, roles, masks, recipe.sparsity_for)
        timings["total_s"] = time.perf_counter() - start
        progress(Event("prune", 1.0, "pruned"))
        return PruneResult(
            recipe, report, masks, timings, source, self.calibration_passes - passes_before, calib_info
        )

    def _sequential(self, recipe: Recipe, ids: torch.Tensor, last_layer: int, progress: Progress) -> Masks:
        """The reference procedure; a failure halfway leaves the model dense, bitwise."""
        self._ensure_snapshot()
        masks: Masks = {}
        model, roles = self.loaded.model, self.loaded.roles

        def prune_layer(layer: int, stats: ActivationStats) -> bool:
            layer_masks = self._layer_masks(recipe, layer, stats)
            masks.update(layer_masks)
            apply_masks(model, roles, layer_masks)
            return bool(layer_masks)

        self.masks = masks  # grows layer by layer, so restore() knows what was touched
        try:
            sequential_pass(model, roles, ids, self.batch_size, prune_layer, last_layer, progress)
        except BaseException:
            self.restore()
            raise
        return masks

    # ----- reversibility ------------------------------------------------------------------------
    def _ensure_snapshot(self) -> None:
        if self.dense is None:
            self.dense = DenseWeights(self.loaded.model, self.loaded.roles)

    def restore(self) -> None:
        """Back to the dense model, bitwise; only the matrices the masks touched are copied."""
        if self.dense is not None and self.masks:
            self.dense.restore(touched_modules(self.loaded.roles, self.masks))
        self.masks = {}

    def apply(self, masks: Masks) -> None:
        """Switch to another pruned state (e.g. another session's) without recomputing it. Atomic:
        a failure halfway (out of memory, say) restores every matrix it may have touched."""
        self.restore()
        if not masks:
            return
        self._ensure_snapshot()
        self.masks = masks
        try:
            apply_masks(self.loaded.model, self.loaded.roles, masks)
        except BaseException:
            self.restore()
            raise
