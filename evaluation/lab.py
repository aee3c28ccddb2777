"""The one door to the model: every front end (CLI, app, studies, allocator) prunes, measures and
switches masks through a ``Lab``, so a recipe runs the same way from everywhere.

A Lab holds one loaded model, its ``Pruner`` (the only caller of ``Pruner.prune``) and the lock
that serialises jobs on that model; memoized dense evaluations make comparing recipes cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from evaluation.perplexity import PerplexityResult, perplexity
from evaluation.share import display, shareable, shareable_recipe
from prune.progress import Event, Progress, scaled, silent
from prune.recipe import CalibrationSpec, Recipe, RecipeError
from prune.state import DENSE, Masks, PrunedState
from runtime.apply import snapshot_place
from runtime.cache import LRU
from runtime.memory import Workload, default_batch_size
from runtime.models import OFFLINE_MODELS, LoadedModel, load, resolve_device
from runtime.pruner import Pruner, PruneResult
from runtime.quantize import QuantReport, check_kind, quantized_copy
from runtime.save import save_model
from runtime.stats import ActivationStats

LAB_VERSION = "0.1.0"


def versions() -> dict[str, str]:
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


@dataclass
class Measurement:
    """One recipe measured on one dataset: what pruning did and what it cost."""

    prune: PruneResult
    perplexity: PerplexityResult  # of the pruned model
    dense: PerplexityResult  # of the dense model, same windows (memoized)
    prune_s: float
    eval_s: float


DENSE_MEMO_ENTRIES = 32  # dense perplexities kept: a visitor varying windows cannot grow it


class Lab:
    def __init__(self, loaded: LoadedModel, batch_size: int | None = None):
        self.loaded = loaded
        self.pruner = Pruner(loaded, batch_size)
        self.lock = threading.RLock()  # one job on the model at a time
        self._dense_ppl: LRU = LRU(entries=DENSE_MEMO_ENTRIES)  # (dataset, seqlen, windows) -> result
        # "dense" / "pruned" -> (kind, the state it started from, copy, report): one copy of each
        self._quantized: dict[str, tuple] = {}

    @classmethod
    def open(
        cls,
        recipe: Recipe,
        progress: Progress = silent,
        token: bool | str | None = None,
        *,
        streaming: str = "auto",
        max_memory: str | dict[str, int] | None = None,
        batch_size: int | None = None,
        sessions: int = 1,
        allow_pickle: bool = False,
    ) -> Lab:
        """Load the recipe's model (its revision, dtype, device and trust setting) as the memory plan
        for running the recipe says (in memory or streamed; ``streaming``, ``max_memory`` as in
        ``runtime.models.load``); ``token=False`` never sends the host's Hugging Face token.
        ``allow_pickle`` is not part of the recipe: only the person running the lab can allow a
        pickle checkpoint (a recipe file can come from anyone)."""
        batch = batch_size or default_batch_size(resolve_device(recipe.device))
        loaded = load(
            recipe.model,
            revision=recipe.revision,
            dtype=recipe.dtype,
            device=recipe.device,
            trust_remote_code=recipe.trust_remote_code,
            progress=lambda message: progress(Event("load", 0.0, message)),
            token=token,
            streaming=streaming,
            max_memory=max_memory,
            workload=Workload.for_recipe(recipe, batch, sessions),
            allow_pickle=allow_pickle,
        )
        return cls(loaded, batch_size)

    # ----- what is loaded ------------------------------------------------------------------------
    def model_info(self) -> dict:
        lm = self.loaded
        return {
            "name": lm.name,
            "source": lm.source,
            "architecture": lm.roles.model_type,
            "roles_note": lm.roles.note,  # e.g. roles found by module names (model_type not in the table)
            "layers": lm.roles.num_layers,
            "parameters": lm.num_parameters(),
            "role_parameters": lm.roles.param_counts(lm.model),
            "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "dtype_reason": lm.dtype_reason,  # e.g. "auto: float16, this GPU has no native bfloat16"
        }

    def memory(self) -> dict:
        """Bytes the model, its dense copy and one session's bit-packed masks take, and where. A
        streamed model keeps no copy: its layer store (CPU memory or disk) is dense."""
        lm = self.loaded
        element = torch.finfo(lm.dtype).bits // 8
        linear = sum(lm.roles.param_counts(lm.model).values())
        streamed = lm.stream is not None
        return {
            "weights_bytes": lm.num_parameters() * element,
            "dense_copy_bytes": 0 if streamed else linear * element,  # what makes pruning reversible
            "session_masks_bytes": (linear + 7) // 8,
            "dense_copy_on": (
                f"none: streamed, layers wait on {lm.stream.store_kind}"
                if streamed
                else snapshot_place(self.pruner.dense, lm.device)
            ),
        }

    @property
    def state(self) -> PrunedState:
        """The pruned state the model is in now (``DENSE`` when it is dense)."""
        return self.pruner.state

    @property
    def masks(self) -> Masks:
        """The masks applied to the model now ({} when it is dense)."""
        return self.pruner.masks

    @property
    def calibration_passes(self) -> int:
        return self.pruner.calibration_passes

    @property
    def batch_size(self) -> int:
        return self.pruner.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.pruner.batch_size = value

    # ----- pruning -------------------------------------------------------------------------------
    def _check_model(self, recipe: Recipe) -> None:
        if recipe.model != self.loaded.name:
            raise RecipeError(
                f"this recipe is for {recipe.model!r}, but the lab has {self.loaded.name!r} loaded"
            )

    def prune(
        self,
        recipe: Recipe,
        progress: Progress = silent,
        ids: torch.Tensor | None = None,
        key: Hashable | None = None,
    ) -> PruneResult:
        """Prune the dense model in place as the recipe says; it stays pruned until the next job.
        ``key`` names the pruned state (``result.state``; a session's, say), so that a later
        ``using`` of it copies nothing while the model still holds it."""
        self._check_model(recipe)
        with self.lock:
            self._quantized.pop("pruned", None)
            return self.pruner.prune(recipe, progress, ids=ids, key=key)

    def restore(self) -> None:
        """Back to the dense model, bitwise."""
        with self.lock:
            self.pruner.restore()

    def holds(self, key: Hashable) -> bool:
        """Whether the model is in the state named ``key`` now (so a switch to it copies nothing)."""
        return key is not None and self.pruner.state.key == key

    def _is_current(self, state: PrunedState) -> bool:
        now = self.pruner.state
        return state is now or self.holds(state.key) or (state.is_dense and now.is_dense)

    @contextmanager
    def using(self, state: PrunedState) -> Iterator[nn.Module]:
        """Hold the model in ``state`` (masks and values; ``DENSE``) for the block. A compact state
        (values left out) gets them solved again from its recipe, so it is the same weights.

        A state without a key is temporary: the previous state comes back after the block. A state
        with one (a session's) stays until a job needs another, and a later switch to the same key
        copies nothing."""
        with self.lock:
            previous = self.pruner.state
            same = self._is_current(state)
            if not same:
                self.pruner.apply(state)
            try:
                yield self.loaded.model
            finally:
                if not same and state.key is None:
                    self.pruner.apply(previous)

    def dense(self):
        """``with lab.dense() as model:`` runs on the dense weights, then the state comes back."""
        return self.using(DENSE)

    def quantized(self, kind: str, state: PrunedState | None = None) -> tuple[nn.Module, QuantReport]:
        """A bitsandbytes ``kind`` copy (``runtime.quantize``) of the model in ``state`` (None: as
        it is now; ``DENSE``), and its report. One dense and one pruned copy are kept (the pruned
        one until the next prune), so side-by-side generation builds each once."""
        check_kind(kind)
        with self.lock, self.using(state) if state is not None else nullcontext():
            now = self.pruner.state
            slot = "dense" if now.is_dense else "pruned"
            held = self._quantized.get(slot)
            same = held is not None and held[0] == kind and (slot == "dense" or self._is_current(held[1]))
            if not same:
                self._quantized.pop(slot, None)  # freed before the new copy is built
                lm = self.loaded
                built = quantized_copy(lm, kind)
                self._quantized[slot] = (kind, now, *built)
            return self._quantized[slot][2:]

    def drop_quantized(self) -> None:
        """Free the quantized copies (a later ``quantized`` builds them again)."""
        with self.lock:
            self._quantized.clear()

    def drop_caches(self) -> None:
        """Free what this model memoized (calibration ids, statistics, ranks, dense perplexities,
        quantized copies; the statistics on disk stay): before another model loads, so the
        server holds one model's caches, not two. Everything is computed again when needed."""
        with self.lock:
            self.pruner.drop_caches()
            self._dense_ppl.clear()
            self._quantized.clear()

    def save(
        self, folder: str | os.PathLike, state: PrunedState | None = None, progress: Progress = silent
    ) -> Path:
        """Write the model in ``state`` (None: as it is now) to ``folder`` as full-precision
        safetensors that ``from_pretrained`` loads, whatever the placement (``runtime.save``; a
        quantized copy is a separate model: its full-precision original is what is written)."""
        with self.lock, self.using(state) if state is not None else nullcontext():
            return save_model(self.loaded, folder, progress)

    def export(
        self,
        folder: str | os.PathLike,
        state: PrunedState,
        output: dict,
        progress: Progress = silent,
        shown: str | None = None,
    ) -> Path:
        """The folder a hub push uploads and the app's model zip holds: the model in ``state``
        (``save``), ``recipe.json`` and ``pruning_result.json`` (``output``: the run's result, as
        the CLI prints it) as they may leave the server (``evaluation.share``: the model named
        ``shown``, default its display name; no server folder) and the model card (``README.md``)."""
        from evaluation.card import model_card

        shown = shown or display(self.loaded.name)
        output = shareable(output, self.loaded.name, shown)
        path = self.save(folder, state, progress)
        shareable_recipe(state.recipe, shown).save(path / "recipe.json")
        (path / "pruning_result.json").write_text(json.dumps(output, indent=2, default=str))
        model_card(output, self.base_model_id(), path.name).save(path / "README.md")
        return path

    def push(
        self,
        repo_id: str,
        state: PrunedState,
        output: dict,
        *,
        token: str | None = None,
        private: bool = False,
        folder: str | os.PathLike | None = None,
        shown: str | None = None,
        progress: Progress = silent,
    ) -> str:
        """``export`` into ``folder`` (None: a temporary one, removed after) and upload it as the
        model repo ``repo_id`` with ``token`` (None: the usual login); the repo's URL. The CLI's
        ``--push-to-hub`` and the app's Push button both push through here."""
        from runtime.hub import publish

        with tempfile.TemporaryDirectory(prefix="pruning-lab-push-") as scratch:
            path = self.export(folder or Path(scratch) / "model", state, output, progress, shown)
            return publish(path, repo_id, private=private, token=token)

    def base_model_id(self) -> str | None:
        """The hub id the model came from: an offline alias's origin, a hub id itself, else None."""
        name = self.loaded.name
        if name in OFFLINE_MODELS:
            return OFFLINE_MODELS[name].hub_id
        return None if Path(name).expanduser().exists() else name

    def calibration_ids(self, calibration: CalibrationSpec) -> torch.Tensor:
        with self.lock:
            return self.pruner.calibration_ids(calibration)

    def statistics(self, calibration: CalibrationSpec, progress: Progress = silent) -> ActivationStats:
        """Dense activation statistics of a calibration set (one cached pass, shared with pruning)."""
        with self.lock:
            ids = self.pruner.calibration_ids(calibration)
            return self.pruner.cached_statistics(ids, progress)[0]

    # ----- measuring -----------------------------------------------------------------------------
    def perplexity(
        self,
        dataset: str,
        seqlen: int,
        windows: int | None,
        progress: Progress = silent,
        which: str = "pruned",
    ) -> PerplexityResult:
        """Perplexity of the model as it is now (``which`` only labels the progress events)."""
        lm = self.loaded
        with self.lock:
            return perplexity(
                lm,
                lm.tokenizer,
                dataset,
                min(seqlen, lm.max_length),
                windows,
                progress=progress,
                which=which,
            )

    def dense_perplexity(
        self, dataset: str, seqlen: int, windows: int | None, progress: Progress = silent
    ) -> PerplexityResult:
        """Memoized: comparing many recipes evaluates the dense model once."""
        key = (dataset, min(seqlen, self.loaded.max_length), windows)
        with self.lock:
            if key not in self._dense_ppl:
                with self.dense():
                    self._dense_ppl[key] = self.perplexity(dataset, seqlen, windows, progress, which="dense")
            return self._dense_ppl[key]

    def measure(
        self,
        recipe: Recipe,
        dataset: str,
        windows: int | None,
        seqlen: int,
        progress: Progress = silent,
        prune_share: float = 0.3,
    ) -> Measurement:
        """Prune as the recipe says, then the pruned and (memoized) dense perplexity on ``dataset``.
        A recipe that prunes nothing reuses the dense evaluation. The model stays pruned."""
        with self.lock:
            dense = self.dense_perplexity(dataset, seqlen, windows)
            start = time.perf_counter()
            result = self.prune(recipe, scaled(progress, 0.0, prune_share))
            prune_s = time.perf_counter() - start
            start = time.perf_counter()
            if result.report.pruned == 0:
                ppl = dense
            else:
                ppl = self.perplexity(dataset, seqlen, windows, scaled(progress, prune_share, 1.0))
            return Measurement(result, ppl, dense, prune_s, time.perf_counter() - start)

    def run(
        self,
        recipe: Recipe,
        progress: Progress = silent,
        dense: bool = True,
        ids: torch.Tensor | None = None,
        key: Hashable | None = None,
    ) -> RunResult:
        """Prune as the recipe says, then evaluate dense (memoized) and pruned perplexity on every
        dataset of ``recipe.evaluation``. The model stays pruned (the state named ``key``)."""
        start = time.perf_counter()
        ev = recipe.evaluation
        with self.lock:
            result = self.prune(recipe, scaled(progress, 0.0, 0.5), ids=ids, key=key)
            out = RunResult(recipe, result)
            count = len(ev.datasets)
            for i, dataset in enumerate(ev.datasets):
                pair = {}
                low, high = 0.5 + 0.5 * i / count, 0.5 + 0.5 * (i + 1) / count
                if dense:
                    pair["dense"] = self.dense_perplexity(
                        dataset, ev.seqlen, ev.max_windows, scaled(progress, low, high)
                    )
                pair["pruned"] = self.perplexity(
                    dataset, ev.seqlen, ev.max_windows, scaled(progress, low, high)
                )
                out.perplexity[dataset] = pair
        out.seconds = time.perf_counter() - start
        return out
