"""A loaded model, its pruner and memoized dense evaluations: what the CLI, the app and the
studies share, so a recipe runs the same way from every front end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evaluation.perplexity import PerplexityResult, WindowProgress, perplexity
from prune.models import LoadedModel, load
from prune.pruner import Progress, Pruner, PruneResult
from prune.recipe import Recipe

LAB_VERSION = "0.1.0"


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"pruning_lab": LAB_VERSION, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class RunResult:
    recipe: Recipe
    prune: PruneResult
    perplexity: dict[str, dict[str, PerplexityResult]] = field(default_factory=dict)  # ds -> dense/pruned
    seconds: float = 0.0

    def to_dict(self, model_info: dict) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "versions": versions(),
            "model": model_info,
            "prune": self.prune.summary(),
            "perplexity": {
                ds: {which: r.to_dict() for which, r in pair.items()} for ds, pair in self.perplexity.items()
            },
            "seconds": round(self.seconds, 3),
        }


class Lab:
    def __init__(self, loaded: LoadedModel, batch_size: int | None = None):
        self.loaded = loaded
        self.pruner = Pruner(loaded, batch_size)
        self._dense_ppl: dict[tuple, PerplexityResult] = {}

    @classmethod
    def open(cls, recipe: Recipe, progress: Callable[[str], None] = lambda m: None) -> Lab:
        return cls(
            load(
                recipe.model,
                revision=recipe.revision,
                dtype=recipe.dtype,
                device=recipe.device,
                trust_remote_code=recipe.trust_remote_code,
                progress=progress,
            )
        )

    def model_info(self) -> dict:
        lm = self.loaded
        return {
            "name": lm.name,
            "source": lm.source,
            "architecture": lm.roles.model_type,
            "layers": lm.roles.num_layers,
            "parameters": lm.num_parameters(),
            "role_parameters": lm.roles.param_counts(lm.model),
            "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""),
        }

    def perplexity(
        self, dataset: str, seqlen: int, max_windows: int | None, progress: WindowProgress | None = None
    ) -> PerplexityResult:
        """Perplexity of the model as it is now (dense or pruned)."""
        lm = self.loaded
        return perplexity(
            lm.model, lm.tokenizer, dataset, min(seqlen, lm.max_length), max_windows, progress=progress
        )

    def dense_perplexity(
        self, dataset: str, seqlen: int, max_windows: int | None, progress: WindowProgress | None = None
    ) -> PerplexityResult:
        """Memoized: comparing many recipes evaluates the dense model once."""
        key = (dataset, min(seqlen, self.loaded.max_length), max_windows)
        if key not in self._dense_ppl:
            with self.pruner.dense_weights():
                self._dense_ppl[key] = self.perplexity(dataset, seqlen, max_windows, progress)
        return self._dense_ppl[key]

    def run(
        self, recipe: Recipe, progress: Progress = lambda f, m: None, dense: bool = True, ids=None
    ) -> RunResult:
        """Prune as the recipe says, then evaluate dense (memoized) and pruned perplexity."""
        start = time.perf_counter()
        ev = recipe.evaluation
        with self.pruner.lock:
            result = self.pruner.prune(recipe, lambda f, m: progress(0.5 * f, m), ids=ids)
            out = RunResult(recipe, result)
            for i, dataset in enumerate(ev.datasets):
                pair = {}
                if dense:
                    pair["dense"] = self.dense_perplexity(
                        dataset,
                        ev.seqlen,
                        ev.max_windows,
                        _window_progress(progress, i, len(ev.datasets), dataset, "dense"),
                    )
                pair["pruned"] = self.perplexity(
                    dataset,
                    ev.seqlen,
                    ev.max_windows,
                    _window_progress(progress, i, len(ev.datasets), dataset, "pruned"),
                )
                out.perplexity[dataset] = pair
        out.seconds = time.perf_counter() - start
        return out


def _window_progress(progress: Progress, index: int, count: int, dataset: str, which: str) -> WindowProgress:
    """Map window-by-window progress of dataset ``index`` of ``count`` onto the second half of a run."""

    def report(done: int, total: int, ppl: float) -> None:
        fraction = 0.5 + 0.5 * (index + done / total) / count
        progress(fraction, f"{dataset} {which}: window {done}/{total}, perplexity {ppl:.2f}")

    return report
