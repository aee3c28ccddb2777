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
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prune.allocation import schedule_per_layer
from prune.dsnot import refines
from prune.errors import LabError
from prune.masks import mask_from_ranks, row_ranks
from prune.methods import method_mask
from prune.progress import Event, Progress, checkpoint, scaled, silent
from prune.recipe import CalibrationSpec, Recipe, RecipeError
from prune.report import SparsityReport, removed_report, sparsity_report
from prune.roles import ROLES
from prune.sparsegpt import sparsegpt_prune
from prune.state import DENSE, PrunedState
from runtime import calibration
from runtime.apply import DenseWeights, Masks, Values, apply_masks, join_masks, touched_modules
from runtime.cache import LRU, cap_folder
from runtime.memory import default_batch_size
from runtime.models import LoadedModel
from runtime.paths import cache_dir
from runtime.stats import ActivationStats, calibration_statistics, layer_outlier_ratios, sequential_pass
from runtime.structured import Shrunk, block_influences, check_structured, plan_channels, plan_depth, shrink

SAVED_KINDS = ("norms", "moments")  # statistics kept on disk too (Hessians are too large)


@dataclass
class PruneResult:
    recipe: Recipe
    report: SparsityReport
    state: PrunedState  # masks, the rewritten weights of a method that changes them, recipe, key
    timings: dict[str, float]
    stats_source: str  # "sequential", "cached: memory", "cached: disk", "cached: computed", "none"
    calibration_passes: int  # forward passes over the calibration set this run needed
    calibration: dict = field(default_factory=dict)

    @property
    def masks(self) -> Masks:
        return self.state.masks

    @property
    def values(self) -> Values:
        return self.state.values

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


def calibration_info(recipe: Recipe, ids: torch.Tensor) -> dict:
    """What a result says of its calibration: source, shape and a digest of the token ids."""
    n, length = ids.shape
    return {
        "source": recipe.calibration.source,
        "nsamples": int(n),
        "seqlen": int(length),
        "tokens": int(ids.numel()),
        "ids": ids_digest(ids),
    }


class Pruner:
    def __init__(self, loaded: LoadedModel, batch_size: int | None = None):
        self.loaded = loaded
        self.batch_size = batch_size or default_batch_size(loaded.device)
        self.dense: DenseWeights | None = None
        self.state: PrunedState = DENSE  # what is applied to the model now (always complete)
        self.calibration_passes = 0  # forward passes over calibration sets, ever
        # Bounded LRUs (runtime.cache: entries and bytes, set by the host), not ever-growing dicts.
        self._ids: LRU = LRU()  # calibration spec key -> ids
        self._stats: LRU = LRU()  # statistics key -> ActivationStats
        # Row ranks of dense scores per (stats key, method): re-pruning is then one comparison
        # per weight. Kept on CPU only, where kthvalue is the bottleneck (2 bytes per weight).
        self._ranks: LRU = LRU()  # (stats key, method) -> {(layer, role): ranks}
        self.use_ranks = loaded.device.type == "cpu"
        self.stream = loaded.stream  # a streamed model: layers come to the device one at a time
        self.shrunk: Shrunk | None = None  # a structured state's replaced modules, while it is applied

    @property
    def masks(self) -> Masks:
        return self.state.masks

    @property
    def values(self) -> Values:
        return self.state.values

    # ----- calibration and statistics -----------------------------------------------------------
    def seqlen_for(self, requested: int) -> int:
        """Never above the model's context (the reference's max_position_embeddings can OOM)."""
        return min(requested, self.loaded.max_length)

    def drop_caches(self) -> None:
        """Empty the in-memory caches (ids, statistics, ranks); the disk cache stays."""
        for cache in (self._ids, self._stats, self._ranks):
            cache.clear()

    def calibration_ids(self, spec: CalibrationSpec) -> torch.Tensor:
        """The calibration tokens of a spec (its seqlen capped at the model's context), memoized.
        Generated calibration samples the dense model; the current state is put back after."""
        spec = dataclasses.replace(spec, seqlen=self.seqlen_for(spec.seqlen))
        if spec.key() not in self._ids:
            with self._dense():
                self._ids[spec.key()] = calibration.calibration_ids(
                    spec, self.loaded.tokenizer, self.loaded.model, self.batch_size
                )
        return self._ids[spec.key()]

    def _stats_key(self, ids: torch.Tensor) -> str:
        lm = self.loaded
        text = f"{lm.name}|{lm.source}|{lm.model.config._name_or_path}|{lm.dtype}|{ids_digest(ids)}"
        return hashlib.sha1(text.encode() + self._fingerprint()).hexdigest()[:20]

    def _fingerprint(self) -> bytes:
        """What tells two models of the same name apart on disk: the config, the first rows of the
        input embeddings (always in memory) and the checkpoint files' sizes and times."""
        lm = self.loaded
        rows = lm.model.get_input_embeddings().weight[:4].detach().float().cpu().numpy().tobytes()
        folder = Path(lm.source).expanduser()
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        stamps = "".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return lm.model.config.to_json_string().encode() + rows + stamps.encode()

    def cached_statistics(
        self, ids: torch.Tensor, progress: Progress = silent, kind: str = "norms"
    ) -> tuple[ActivationStats, str]:
        """Dense statistics (``kind``: norms, moments or hessian) for these ids: from memory, from
        disk (norms and moments; Hessians are large), or one calibration pass on the dense model.
        Each kind has its own key, so a norms file is never read as moments."""
        key = self._stats_key(ids) + ("" if kind == "norms" else f"-{kind}")
        if key in self._stats:
            return self._stats[key], "cached: memory"
        path = cache_dir("stats") / f"{key}.safetensors"
        if kind in SAVED_KINDS and path.exists():
            stats, source = ActivationStats.load(path, self.loaded.device), "cached: disk"
        else:
            with self._dense():
                lm = self.loaded
                stats = calibration_statistics(lm, ids, self.batch_size, progress, kind)
            self.calibration_passes += 1
            if kind in SAVED_KINDS:
                stats.save(path, {"model": self.loaded.name, "ids": ids_digest(ids)})
            cap_folder(path.parent)  # the disk cache stays under its cap (oldest files go first)
            source = "cached: computed"
        self._stats[key] = stats
        return stats, source

    # ----- masks --------------------------------------------------------------------------------
    def _layer_masks(
        self, recipe: Recipe, layer: int, stats: ActivationStats | None, ranks: dict | None = None
    ) -> tuple[Masks, Values]:
        """Masks of one layer (and the rewritten weights, for a method that changes them);
        ``ranks`` (from ``_rank_cache``) only when the weights are dense."""
        checkpoint()  # a cancelled job stops between layers, before any mask is applied
        model, roles, spec = self.loaded.model, self.loaded.roles, recipe.method_spec
        masks, values = {}, {}
        for role in roles.roles:
            sparsity = recipe.sparsity_for(layer, role)
            if sparsity <= 0:
                continue
            key, target = (layer, role), roles.targets[(layer, role)]
            if target.parts:  # a role over several matrices (Qwen2-MoE's shared expert): one mask each
                norms = [stats.sq_norms[p.stats_key] if stats is not None else None for p in target.parts]
                args = (sparsity, recipe.nm, recipe.use_variant, recipe.permute)
                pieces = zip(target.views(model), norms, strict=True)
                masks[key] = join_masks([method_mask(spec, w, n, *args) for w, n in pieces])
                continue
            weight = target.weight(model)
            if spec.changes_weights:  # solved on (rows, in); apply_masks writes it back through the view
                hinv, dead = stats.inverse(target.module)
                flat = weight.reshape(-1, weight.shape[-1])
                hinv, dead = hinv.to(flat.device), dead.to(flat.device)  # streamed: Hessians wait on the CPU
                new, masks[key] = sparsegpt_prune(flat, hinv, dead, sparsity, recipe.nm)
                values[key] = new.to(weight.dtype)
                continue
            sq_norm = stats.sq_norms[target.stats_key] if stats is not None else None
            if ranks is None:
                moments = stats.moments(target.stats_key) if refines(recipe.refine, role) else None
                args = (sparsity, recipe.nm, recipe.use_variant, recipe.permute, moments)
                masks[key] = method_mask(spec, weight, sq_norm, *args)
                continue
            if key not in ranks:
                ranks[key] = row_ranks(spec.scores(weight, sq_norm).reshape(-1, weight.shape[-1]))
            masks[key] = mask_from_ranks(ranks[key], sparsity)
        if self.stream is not None:  # the state waits on the CPU with the weights, not on the device
            masks = {key: mask.cpu() for key, mask in masks.items()}
            values = {key: value.cpu() for key, value in values.items()}
        return masks, values

    def _rank_cache(self, recipe: Recipe, stats_key: str) -> dict | None:
        """Row ranks of the dense scores for (statistics, method), where masks can come from them."""
        row_wise = recipe.nm is None and not recipe.use_variant and recipe.method_spec.per_row
        if not (row_wise and self.use_ranks) or recipe.refine != "none":  # DSnoT's masks are no rank cut
            return None
        return self._ranks.setdefault((stats_key, recipe.method), {})

    def _check(self, recipe: Recipe) -> None:
        """What only the loaded model can tell: its roles, its layers, its matrix widths."""
        roles = self.loaded.roles
        if recipe.structured:
            check_structured(self.loaded, recipe)
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
        experts = any(p.experts for _, _, t in roles.items() for p in t.pieces())
        if recipe.method_spec.changes_weights and experts:
            raise RecipeError(f"{recipe.method} does not support mixture-of-experts models yet")
        if recipe.refine != "none" and experts:
            raise RecipeError("DSnoT does not support mixture-of-experts models yet (no per-expert moments)")
        if recipe.nm:
            m = recipe.nm[1]
            for layer, role, target in roles.items():
                if recipe.sparsity_for(layer, role) > 0:
                    for width in {view.shape[-1] for view in target.views(self.loaded.model)}:
                        if width % m:
                            raise RecipeError(f"{role} has {width} input columns, not divisible by M={m}")

    # ----- the run ------------------------------------------------------------------------------
    def prune(
        self,
        recipe: Recipe,
        progress: Progress = silent,
        ids: torch.Tensor | None = None,
        key: Hashable | None = None,
    ) -> PruneResult:
        """Restore the dense model, then prune it in place as the recipe says (the state named ``key``)."""
        self._check(recipe)
        self.restore()
        timings: dict[str, float] = {}
        start = time.perf_counter()
        passes_before = self.calibration_passes
        run = self._prune_structured if recipe.structured else self._prune_weights
        recipe, state, report, source, calib_info = run(recipe, progress, ids, key, timings)
        timings["total_s"] = time.perf_counter() - start
        progress(Event("prune", 1.0, "pruned"))
        passes = self.calibration_passes - passes_before
        return PruneResult(recipe, report, state, timings, source, passes, calib_info)

    def _prune_weights(
        self,
        recipe: Recipe,
        progress: Progress,
        ids: torch.Tensor | None,
        key: Hashable | None,
        timings: dict,
    ) -> tuple[Recipe, PrunedState, dict, str, dict]:
        """Single weights zeroed (unstructured or N:M), from cached statistics, sequentially, or
        from the weights alone; returns the recipe as run (an OWL schedule written out)."""
        recipe = self._scheduled(recipe, ids, timings, progress)  # OWL: per_layer written out
        calib_info: dict = {}
        roles, spec = self.loaded.roles, recipe.method_spec
        wanted = [
            layer
            for layer in range(roles.num_layers)
            if any(recipe.sparsity_for(layer, r) > 0 for r in roles.roles)
        ]
        masks: Masks = {}
        values: Values = {}
        unreached: dict[str, list[int]] = {}
        if not recipe.needs_statistics or not wanted:
            ranks = self._rank_cache(recipe, "")  # scores from the weights alone
            for layer in wanted:
                with self.loaded.layer(layer):
                    masks.update(self._layer_masks(recipe, layer, None, ranks)[0])
            source = "none"
        else:
            t = time.perf_counter()
            progress(Event("calibration", 0.0, f"calibration data: {recipe.calibration.source}"))
            if ids is None:
                ids = self.calibration_ids(recipe.calibration)
            timings["calibration_data_s"] = time.perf_counter() - t
            calib_info = calibration_info(recipe, ids)
            if recipe.stats_mode == "cached":
                t = time.perf_counter()
                stats, source = self.cached_statistics(ids, scaled(progress, 0.0, 0.9), recipe.statistics)
                experts = [name for layer in wanted for name in roles.experts_in_layer(layer)]
                unreached = stats.unreached_experts(experts)
                timings["statistics_s"] = time.perf_counter() - t
                t = time.perf_counter()
                ranks = self._rank_cache(recipe, self._stats_key(ids))
                for done, layer in enumerate(wanted, 1):
                    with self.loaded.layer(layer):
                        layer_masks, layer_values = self._layer_masks(recipe, layer, stats, ranks)
                    masks.update(layer_masks)
                    values.update(layer_values)
                    if spec.changes_weights:  # solves take seconds a layer: say where they are
                        progress(Event("prune", 0.9 + 0.1 * done / len(wanted), f"solving layer {layer}"))
                timings["masks_s"] = time.perf_counter() - t
            else:
                masks, values, unreached = self._sequential(recipe, ids, wanted[-1], progress)  # applied
                source = "sequential"
                self.calibration_passes += 1
        t = time.perf_counter()
        state = PrunedState(masks, values, recipe, key)
        if source == "sequential":  # applied layer by layer already
            self._set_state(state)
        else:
            self.apply(state)
        timings["apply_s"] = time.perf_counter() - t
        if unreached:  # MoE experts no calibration token reached (scored by magnitude)
            calib_info["unreached_experts"] = unreached
        report = sparsity_report(self.loaded.model, roles, masks, recipe.sparsity_for)
        return recipe, state, report, source, calib_info

    def _prune_structured(
        self,
        recipe: Recipe,
        progress: Progress,
        ids: torch.Tensor | None,
        key: Hashable | None,
        timings: dict,
    ) -> tuple[Recipe, PrunedState, dict, str, dict]:
        """Whole units removed (the model is dense here): heads and channels by Wanda-sp from the
        cached dense statistics (whatever ``stats_mode`` says), or layers by block influence from
        one dense pass; then the model shrinks."""
        progress(Event("calibration", 0.0, f"calibration data: {recipe.calibration.source}"))
        ids = self.calibration_ids(recipe.calibration) if ids is None else ids
        calib_info = calibration_info(recipe, ids)
        t = time.perf_counter()
        if recipe.structure == "channels":
            stats, source = self.cached_statistics(ids, scaled(progress, 0.0, 0.9))
            structure = plan_channels(self.loaded, stats, recipe)
        else:
            influence = block_influences(self.loaded, ids, self.batch_size, scaled(progress, 0.0, 0.9))
            self.calibration_passes += 1
            calib_info["block_influence"] = [round(x, 6) for x in influence]
            structure, source = plan_depth(influence, recipe), "block influence"
        timings["statistics_s"] = time.perf_counter() - t
        lm = self.loaded
        dense = [lm.roles.layer_param_counts(lm.model, layer) for layer in range(lm.roles.num_layers)]
        total = lm.num_parameters()
        t = time.perf_counter()
        state = PrunedState(recipe=recipe, key=key, structure=structure)
        self.apply(state)
        timings["apply_s"] = time.perf_counter() - t
        numbers = structure.layers if structure.layers is not None else range(len(dense))
        kept = {old: lm.roles.layer_param_counts(lm.model, new) for new, old in enumerate(numbers)}
        report = removed_report(dense, kept, total, recipe.unit_rate)
        return recipe, state, report, source, calib_info

    def _scheduled(
        self, recipe: Recipe, ids: torch.Tensor | None, timings: dict, progress: Progress
    ) -> Recipe:
        """The recipe with its layer schedule written out as per_layer sparsities (the model is
        dense here). OWL's outlier ratios come from the dense statistics of the recipe's calibration
        (one cached pass, shared with cached pruning; in sequential mode an extra dense pass, as OWL
        computes them); ``schedule_per_layer`` keeps the pruned count of the recipe without it."""
        lm = self.loaded
        if not recipe.schedules_layers(lm.roles.num_layers):
            return recipe
        t = time.perf_counter()
        if ids is None:
            ids = self.calibration_ids(recipe.calibration)
        kind = "moments" if recipe.statistics == "moments" else "norms"  # moments hold the norms too
        stats, _ = self.cached_statistics(ids, scaled(progress, 0.0, 0.2, "outlier ratios"), kind)
        ratios = layer_outlier_ratios(lm, stats, recipe.owl_m)
        shapes = {
            (layer, role): target.shape(lm.model) for layer, role, target in lm.roles.items()
        }  # rows, in
        table = schedule_per_layer(recipe, ratios, shapes, recipe.method_spec.per_row)
        timings["schedule_s"] = time.perf_counter() - t
        return dataclasses.replace(recipe, per_layer={**recipe.per_layer, **table})

    def _sequential(
        self, recipe: Recipe, ids: torch.Tensor, last_layer: int, progress: Progress
    ) -> tuple[Masks, Values, dict[str, list[int]]]:
        """The reference procedure; a failure halfway leaves the model dense, bitwise. Also which MoE
        experts no calibration token reached."""
        self._ensure_snapshot()
        masks: Masks = {}
        values: Values = {}
        unreached: dict[str, list[int]] = {}
        model, roles = self.loaded.model, self.loaded.roles

        def prune_layer(layer: int, stats: ActivationStats) -> bool:
            layer_masks, layer_values = self._layer_masks(recipe, layer, stats)
            unreached.update(stats.unreached_experts(roles.experts_in_layer(layer)))
            masks.update(layer_masks)
            values.update(layer_values)
            apply_masks(model, roles, layer_masks, layer_values)
            return bool(layer_masks)

        self._set_state(PrunedState(masks, values, recipe))  # grows: restore() knows what was touched
        kind = recipe.statistics
        try:
            sequential_pass(self.loaded, ids, self.batch_size, prune_layer, last_layer, progress, kind)
        except BaseException:
            self.restore()
            raise
        return masks, values, unreached

    # ----- reversibility ------------------------------------------------------------------------
    def _set_state(self, state: PrunedState) -> None:
        self.state = state
        if self.stream is not None:  # applied as each layer comes to the device
            self.stream.set_state(state.masks, state.values)

    def _ensure_snapshot(self) -> None:
        """A streamed model needs none: its store is dense, pruning is applied on the way in."""
        if self.dense is None and self.stream is None:
            self.dense = DenseWeights(self.loaded.model, self.loaded.roles)

    def restore(self) -> None:
        """Back to the dense model, bitwise; only the matrices the masks touched are copied."""
        if self.shrunk is not None:  # a structured state: the replaced modules go back
            self.shrunk.undo()
            self.shrunk = None
        if self.dense is not None and self.masks:
            self.dense.restore(touched_modules(self.loaded.roles, self.masks))
        self._set_state(DENSE)

    def apply(self, state: PrunedState) -> None:
        """Switch to another pruned state (e.g. another session's) without recomputing it, unless it
        is compact: then its values are solved again from its recipe. Atomic: a failure halfway (out
        of memory, say) restores every matrix it may have touched."""
        if state.is_compact:
            return self._solve(state)
        self.restore()
        if state.is_dense:
            return self._set_state(state)
        if state.structure is not None:  # nothing to snapshot: shrinking keeps the dense modules
            self.shrunk = shrink(self.loaded, state.structure)
            return self._set_state(state)
        self._ensure_snapshot()
        self._set_state(state)
        if self.stream is not None:
            return
        try:
            apply_masks(self.loaded.model, self.loaded.roles, state.masks, state.values)
        except BaseException:
            self.restore()
            raise

    def _solve(self, state: PrunedState) -> None:
        """A compact state's values, solved again from its recipe (cached statistics: no forward pass
        when they are still in memory); the masks must come out as the state has them."""
        solved = self.prune(state.recipe, key=state.key).state
        same = solved.masks.keys() == state.masks.keys() and all(
            torch.equal(solved.masks[key].cpu(), mask.cpu()) for key, mask in state.masks.items()
        )
        if not same:
            self.restore()
            raise LabError("this pruned state no longer follows from its recipe here: prune again")

    @contextmanager
    def _dense(self) -> Iterator[None]:
        """The dense model for a calibration step, then the current state again (the Lab's lock
        is held by whoever called)."""
        state = self.state
        self.restore()
        try:
            yield
        finally:
            self.apply(state)
