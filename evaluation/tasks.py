"""Downstream evaluation: zero-shot lm-eval tasks on the model as it is in memory (dense or pruned).

The model is wrapped in lm-eval's ``HFLM`` as is, never saved and reloaded, so a pruned model is
scored with its masks in place. With an offline data folder (``runtime.paths.data_dir()``) the
tasks come from ``evaluation/lm_eval_tasks/``: twins of lm-eval's built-in tasks (same prompts,
choices, targets, metrics and versions) that read ``<data_dir>/zeroshot/*.jsonl``. Without one,
the harness's built-in tasks read the hub datasets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prune.errors import RecipeError
from prune.progress import Event, Progress, checkpoint, scaled, silent
from prune.recipe import Recipe
from runtime.cache import LRU, cap_folder
from runtime.paths import cache_dir, data_dir
from runtime.stream import input_device

ALL7 = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
METRICS = ("acc", "acc_norm")
CHUNK_BATCHES = 4  # progress is reported every CHUNK_BATCHES model batches

# Per task: (documents in the split lm-eval scores, tokens forwarded per document). Tokens were
# counted with the SmolLM2 tokenizer over the full offline splits, after lm-eval's one-token
# logits cache (BoolQ and RTE need one forward pass per document, not one per choice).
TASK_COST: dict[str, tuple[int, float]] = {
    "boolq": (3270, 145.4),
    "rte": (277, 79.1),
    "hellaswag": (10042, 312.0),
    "winogrande": (1267, 43.0),
    "arc_easy": (2376, 104.8),
    "arc_challenge": (1172, 133.2),
    "openbookqa": (500, 44.0),
}

DENSE_TASK_ENTRIES = 256  # one task's dense metrics each (a few hundred bytes)
TASK_CACHE_BYTES = 16 << 20  # the folder of those metrics on disk
_dense_memory = LRU(entries=DENSE_TASK_ENTRIES)  # cache key -> one task's dense metrics
_task_objects: dict[tuple[str, str], object] = {}  # (data source, task) -> built lm-eval Task
_managers: dict[str, object] = {}  # data source -> TaskManager


# ----- task names and sources -----------------------------------------------------------------
def expand_tasks(names: list[str] | str) -> list[str]:
    """``"all7"`` (or a comma list containing it) becomes the seven tasks; duplicates are dropped."""
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in (name.strip() for name in items):
        for name in ALL7 if item.lower() == "all7" else [item]:
            if name and name not in out:
                out.append(name)
    if not out:
        raise RecipeError("no lm-eval tasks given; use all7 or a comma list such as boolq,rte")
    return out


def data_source() -> str:
    """``offline:<folder>`` when an offline data folder is set, else ``hub``: part of every cache key."""
    folder = data_dir()
    return f"offline:{folder.resolve()}" if folder is not None else "hub"


def _manager(source: str):
    """One TaskManager per data source (indexing the built-in task folder takes seconds)."""
    from lm_eval.tasks import TaskManager

    if source not in _managers:
        if source.startswith("offline:"):
            folder = source.removeprefix("offline:")
            _managers[source] = TaskManager(
                include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": folder}
            )
        else:
            _managers[source] = TaskManager()
    return _managers[source]


def load_task(name: str, source: str | None = None):
    """The lm-eval Task object, built once per data source: loading HellaSwag's documents alone
    takes ~15 s, and dense and pruned runs score the same documents."""
    source = source or data_source()
    key = (source, name)
    if key not in _task_objects:
        manager = _manager(source)
        if name not in manager.all_subtasks:
            where = f"the offline folder {TASKS_DIR}" if source != "hub" else "lm-eval (no groups)"
            raise RecipeError(f"unknown lm-eval task {name!r} in {where}; offline tasks: all7 = {ALL7}")
        with _quiet_lm_eval():
            _task_objects[key] = manager.load([name])["tasks"][name]
    return _task_objects[key]


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval and datasets log a warning or a progress bar per task; the lab reports its own."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = not datasets.are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ----- the model wrapper ------------------------------------------------------------------------
def _reporting_lm(model, tokenizer, batch_size: int, report: Callable[[int, int, str], None]):
    """HFLM on the in-memory model that reports ``(done, total, task)`` every few request batches."""
    from lm_eval.models.huggingface import HFLM

    class ReportingLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out: list = []
            for start, end in _chunks(requests, self.batch_size * CHUNK_BATCHES):
                out += super().loglikelihood(requests[start:end], disable_tqdm=True)
                report(end, len(requests), requests[start].task_name)
            return out

        def _model_call(self, *args, **kwargs):
            checkpoint()  # every batch of documents, whatever ``progress`` does
            return super()._model_call(*args, **kwargs)

        def get_model_info(self) -> dict:
            """No hub lookup of a model sha: the model is an in-memory object."""
            return {"model_num_parameters": sum(p.numel() for p in model.parameters())}

    return ReportingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _chunks(requests: list, size: int) -> Iterator[tuple[int, int]]:
    """Runs of at most ``size`` consecutive requests of one task: a document's choices stay
    together (so lm-eval's one-token logits cache still works) and progress names the task."""
    start = 0
    while start < len(requests):
        end = start + 1
        while (
            end < len(requests)
            and end - start < size
            and requests[end].task_name == requests[start].task_name
        ):
            end += 1
        yield start, end
        start = end


def default_batch_size(model) -> int:
    device = input_device(model)
    return 32 if device.type == "cuda" else 8


# ----- evaluation -------------------------------------------------------------------------------
def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str] | str,
    limit: int | None = None,
    progress: Progress = silent,
    batch_size: int | None = None,
) -> dict:
    """Zero-shot accuracy of ``model`` as it is now (all tasks in one lm-eval pass).

    ``tasks``: names or ``"all7"``; ``limit``: the first N documents of each task (None: the full
    split). Returns ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_split,
    version}}, "mean": {...}, "lm_eval": version, "source", "limit", "seconds", ...}``; acc_norm is
    None for tasks whose lm-eval definition has no acc_norm (BoolQ, RTE, WinoGrande).
    """
    import lm_eval

    names = expand_tasks(tasks)
    batch_size = batch_size or default_batch_size(model)
    source = data_source()
    start = time.perf_counter()
    with _quiet_lm_eval():
        loaded = []
        for index, name in enumerate(names):
            checkpoint()
            progress(Event("tasks", 0.0, f"loading {name} ({index + 1}/{len(names)})", dataset=name))
            loaded.append(load_task(name, source))
        lm = _reporting_lm(model, tokenizer, batch_size, _request_progress(progress))
        raw = _simple_evaluate(lm, loaded, limit, source)
    results = {name: task_metrics(raw, name) for name in names}
    progress(Event("tasks", 1.0, f"{len(names)} tasks done"))
    return _summary(results, limit, source, batch_size, time.perf_counter() - start, lm_eval.__version__)


def _request_progress(progress: Progress) -> Callable[[int, int, str], None]:
    def report(done: int, total: int, task: str) -> None:
        message = f"{task}: {done}/{total} requests"
        progress(Event("tasks", done / total, message, dataset=task, step=done, steps=total))

    return report


def _simple_evaluate(lm, loaded: list, limit: int | None, source: str) -> dict:
    """All tasks in one ``simple_evaluate`` (it also collects environment info, ~4 s a call).
    Global RNG seeds are left alone: zero-shot multiple choice samples nothing."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=loaded,
        task_manager=_manager(source),  # else it indexes every built-in task again (~50 s)
        num_fewshot=0,
        limit=limit,
        log_samples=False,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


def task_metrics(raw: dict, name: str) -> dict:
    """The numbers of one task from a ``simple_evaluate`` result."""
    scores = raw["results"][name]
    out: dict = {}
    for metric in METRICS:
        value = scores.get(f"{metric},none")
        stderr = scores.get(f"{metric}_stderr,none")
        out[metric] = None if value is None else float(value)
        out[f"{metric}_stderr"] = None if not isinstance(stderr, (int, float)) else float(stderr)
    counts = raw["n-samples"][name]
    out["n"] = int(counts["effective"])
    out["n_split"] = int(counts["original"])
    out["version"] = raw["versions"][name]
    return out


def mean_scores(tasks: dict[str, dict]) -> dict:
    """Unweighted mean over tasks (the papers' "average"); stderr as for independent tasks.
    acc_norm is averaged over the tasks that define it, which are listed."""
    out: dict = {"n_tasks": len(tasks)}
    for metric in METRICS:
        rows = [t for t in tasks.values() if t.get(metric) is not None]
        if not rows:
            out[metric] = out[f"{metric}_stderr"] = None
            continue
        out[metric] = sum(t[metric] for t in rows) / len(rows)
        errors = [t[f"{metric}_stderr"] for t in rows]
        known = all(e is not None for e in errors)
        out[f"{metric}_stderr"] = math.sqrt(sum(e * e for e in errors)) / len(rows) if known else None
    out["acc_norm_tasks"] = [name for name, t in tasks.items() if t.get("acc_norm") is not None]
    return out


def _summary(
    results: dict[str, dict], limit: int | None, source: str, batch_size: int, seconds: float, version: str
) -> dict:
    return {
        "lm_eval": version,
        "source": source,
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "tasks": results,
        "mean": mean_scores(results),
        "task_versions": {name: r["version"] for name, r in results.items()},
        "seconds": round(seconds, 3),
    }


# ----- a recipe: dense (cached) and pruned ------------------------------------------------------
def dense_cache_key(lab, task: str, limit: int | None, source: str) -> str:
    """Dense numbers depend on the model, its dtype, the task, the limit, the data and lm-eval."""
    import lm_eval

    lm = lab.loaded
    text = "|".join([lm.name, str(lm.source), str(lm.dtype), task, str(limit), source, lm_eval.__version__])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _cached_dense(key: str) -> tuple[dict | None, str]:
    if key in _dense_memory:
        return _dense_memory[key], "memory"
    path = cache_dir("tasks") / f"{key}.json"
    if path.exists():
        try:
            _dense_memory[key] = json.loads(path.read_text())["result"]
            return _dense_memory[key], "disk"
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged entry is recomputed
    return None, ""


def _store_dense(key: str, result: dict, meta: dict) -> None:
    _dense_memory[key] = result
    path = cache_dir("tasks") / f"{key}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"key": meta, "result": result}, indent=1))
    partial.replace(path)
    cap_folder(path.parent, TASK_CACHE_BYTES, "*.json")


def dense_tasks(lab, names: list[str], limit: int | None, progress: Progress = silent) -> dict:
    """Dense results per task, from memory, disk, or one evaluation of the dense weights."""
    source = data_source()
    keys = {name: dense_cache_key(lab, name, limit, source) for name in names}
    found: dict[str, dict] = {}
    origin: dict[str, str] = {}
    for name, key in keys.items():
        result, where = _cached_dense(key)
        if result is not None:
            found[name], origin[name] = result, where
    missing = [name for name in names if name not in found]
    seconds = 0.0
    if missing:
        lm = lab.loaded
        with lab.dense() as model:
            computed = evaluate_tasks(model, lm.tokenizer, missing, limit, progress)
        seconds = computed["seconds"]
        for name in missing:
            meta = {"model": lm.name, "source": str(lm.source), "dtype": str(lm.dtype), "task": name}
            _store_dense(keys[name], computed["tasks"][name], {**meta, "limit": limit, "data": source})
            found[name], origin[name] = computed["tasks"][name], "computed"
    ordered = {name: found[name] for name in names}
    return {"tasks": ordered, "mean": mean_scores(ordered), "origin": origin, "seconds": round(seconds, 3)}


def evaluate_recipe_tasks(lab, recipe: Recipe, dense: bool = True, progress: Progress = silent) -> dict:
    """The recipe's tasks (``recipe.evaluation.tasks``, "all7" expands; ``.limit``) on the pruned
    model as it is in memory now, and on the dense model (cached per model, task and limit, so
    comparing recipes re-evaluates only the pruned model). Returns per-task results for both and
    ``rows``: one ``{task, metric, dense, pruned, delta, n}`` per task and metric, then the mean."""
    import lm_eval

    names = expand_tasks(recipe.evaluation.tasks)
    limit = recipe.evaluation.limit
    start = time.perf_counter()
    with lab.using(lab.state) as model:  # the model as it is now, for both evaluations
        dense_part = None
        if dense:
            share = 0.0 if _all_cached(lab, names, limit) else 0.5
            dense_part = dense_tasks(lab, names, limit, scaled(progress, 0.0, share, "dense"))
            progress(Event("tasks", share, "dense done", which="dense"))
        else:
            share = 0.0
        pruned = evaluate_tasks(
            model, lab.loaded.tokenizer, names, limit, scaled(progress, share, 1.0, "pruned")
        )
    out = {
        "lm_eval": lm_eval.__version__,
        "source": pruned["source"],
        "limit": limit,
        "num_fewshot": 0,
        "tasks": names,
        "task_versions": pruned["task_versions"],
        "pruned": {"tasks": pruned["tasks"], "mean": pruned["mean"], "seconds": pruned["seconds"]},
        "dense": dense_part,
        "rows": table_rows(dense_part, pruned),
        "seconds": round(time.perf_counter() - start, 3),
    }
    progress(Event("tasks", 1.0, "tasks done"))
    return out


def _all_cached(lab, names: list[str], limit: int | None) -> bool:
    """Whether no dense evaluation will run (it then gets no share of the progress bar)."""
    source = data_source()
    keys = [dense_cache_key(lab, name, limit, source) for name in names]
    return all(key in _dense_memory or (cache_dir("tasks") / f"{key}.json").exists() for key in keys)


def table_rows(dense: dict | None, pruned: dict) -> list[dict]:
    """Rows of the comparison table: per task and metric, then the means."""
    rows = []
    entries = [*pruned["tasks"].items(), ("mean", pruned["mean"])]
    for name, result in entries:
        reference = (dense["mean"] if name == "mean" else dense["tasks"][name]) if dense else None
        for metric in METRICS:
            after = result.get(metric)
            if after is None:
                continue
            before = reference.get(metric) if reference else None
            rows.append(
                {
                    "task": name,
                    "metric": metric,
                    "dense": before,
                    "pruned": after,
                    "delta": None if before is None else after - before,
                    "n": _row_count(name, metric, result),
                }
            )
    return rows


def _row_count(name: str, metric: str, result: dict) -> int:
    """Documents behind a task's number; tasks behind a mean."""
    if name != "mean":
        return result["n"]
    return len(result["acc_norm_tasks"]) if metric == "acc_norm" else result["n_tasks"]


# ----- planning ---------------------------------------------------------------------------------
def estimate_seconds(tasks: list[str] | str, limit: int | None, tokens_per_second: float) -> float:
    """Rough time to evaluate one model (double it for dense + pruned) at a forward-pass
    throughput of ``tokens_per_second``; unknown (hub-only) tasks count as 150 tokens a document."""
    if tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    total = 0.0
    for name in expand_tasks(tasks):
        docs, tokens = TASK_COST.get(name, (limit or 1000, 150.0))
        total += min(docs, limit) * tokens if limit else docs * tokens
    return total / tokens_per_second
