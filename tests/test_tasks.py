"""Downstream evaluation: the offline task twins render exactly what lm-eval's built-in tasks
render, the real model gets sane numbers, and dense results are computed once per setting."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import evaluation.tasks as tasks
from evaluation.lm_eval_tasks import zeroshot
from prune.progress import Event
from prune.recipe import EvalSpec, Recipe, RecipeError, parse_sparsity

# lm-eval's own definition of each task, inside the installed package
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
LOCAL_FILE = {
    "boolq": "boolq_validation.jsonl",
    "rte": "rte_validation.jsonl",
    "hellaswag": "hellaswag_validation.jsonl",
    "winogrande": "winogrande_xl_validation.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "arc_challenge": "arc_challenge_test.jsonl",
    "openbookqa": "openbookqa_main_test.jsonl",
}
DOCS_COMPARED = 200  # the first documents of each split (rendering all 20k takes minutes here)


def local_rows(data_dir: Path, name: str) -> list[dict]:
    with (data_dir / "zeroshot" / LOCAL_FILE[name]).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def hub_schema(name: str, row: dict) -> dict:
    """A local row in the schema of the hub dataset the built-in task reads (written out here,
    independently of the loader, except HellaSwag's documented ctx_a/ctx_b rebuild)."""
    if name == "rte":
        return {
            "sentence1": row["premise"],
            "sentence2": row["hypothesis"],
            "label": row["label"],
            "idx": row["idx"],
        }
    if name == "hellaswag":
        ctx_a, ctx_b = zeroshot.split_context(row["ctx"])
        return {**row, "ctx_a": ctx_a, "ctx_b": ctx_b, "label": str(row["label"])}
    return {key: value for key, value in row.items() if not key.startswith("_mosaic")}


def builtin_task(name: str, rows: list[dict]):
    """lm-eval's built-in task, unchanged except that its documents are ``rows``, not the hub's."""
    import lm_eval.tasks
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / BUILTIN_YAML[name]
    config = load_yaml(path, resolve_func=True)
    for key in ("tag", "group", "dataset_path", "dataset_name", "training_split"):
        config.pop(key, None)
    splits = [config.get(key) for key in ("validation_split", "test_split") if config.get(key)]
    docs = Dataset.from_list(rows)
    config["custom_dataset"] = lambda **_: DatasetDict({split: docs for split in splits})
    config["num_fewshot"] = 0
    return ConfigurableTask(config=config)


def requests(task, limit: int) -> list[tuple]:
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(r.doc_id, r.idx, r.request_type, r.arguments) for r in task.instances]


def definition(task) -> dict:
    """Everything besides the prompts that decides what a score means."""
    return {
        "output_type": task.OUTPUT_TYPE,
        "version": task.VERSION,
        "aggregation": {k: v.__name__ for k, v in task.aggregation().items()},
        "higher_is_better": task.higher_is_better(),
        "target_delimiter": task.config.target_delimiter,
        "fewshot_delimiter": task.config.fewshot_delimiter,
    }


@pytest.mark.parametrize("name", tasks.ALL7)
def test_offline_task_renders_like_the_builtin_task(name, data_dir):
    rows = local_rows(data_dir, name)
    offline = tasks.load_task(name, f"offline:{data_dir.resolve()}")
    builtin = builtin_task(name, [hub_schema(name, row) for row in rows[:DOCS_COMPARED]])
    assert offline.config.task == builtin.config.task == name  # the built-in registry name
    assert definition(offline) == definition(builtin)
    assert len(offline.eval_docs) == len(rows) == tasks.TASK_COST[name][0]  # the full split
    ours, theirs = requests(offline, DOCS_COMPARED), requests(builtin, DOCS_COMPARED)
    assert len(ours) >= min(DOCS_COMPARED, len(rows)) * 2
    assert ours == theirs
    docs = list(offline.eval_docs)[:DOCS_COMPARED]
    assert [offline.doc_to_target(d) for d in docs] == [builtin.doc_to_target(d) for d in docs]


def test_hellaswag_context_rebuild_matches_the_hub_record(data_dir):
    """The first local item against its hub record (ctx_a/ctx_b as published in rowanz/hellaswag):
    lm-eval's prompt capitalizes ctx_b, so the rebuilt split must find it."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    hub = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he"}
    expected = preprocess(hub["activity_label"] + ": " + hub["ctx_a"] + " " + hub["ctx_b"].capitalize())
    offline = tasks.load_task("hellaswag", f"offline:{data_dir.resolve()}")
    first = offline.eval_docs[0]
    assert offline.doc_to_text(first) == expected == "Roof shingle removal: A man is sitting on a roof. He"
    assert zeroshot.split_context("A man climbs. he") == ("A man climbs.", "he")
    assert zeroshot.split_context("Set up. Unroll your mat.") == ("Set up. Unroll your mat.", "")


def test_winogrande_rebuild_agrees_with_the_untouched_source_fields(data_dir):
    """The local sentences were rebuilt around a blank; lm-eval's functions on them must give back
    the source's own per-option contexts, continuation and gold for every item."""
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    rows = local_rows(data_dir, "winogrande")
    assert len(rows) == 1267
    for row in rows:
        assert wg.doc_to_choice(row) == row["_mosaic_context_options"]
        assert wg.doc_to_target(row) == row["_mosaic_continuation"].strip()
        assert wg.doc_to_text(row) == row["_mosaic_gold"]


def test_task_names_and_errors(data_dir):
    assert tasks.expand_tasks(["all7"]) == tasks.ALL7
    assert tasks.expand_tasks("rte, all7") == ["rte"] + [t for t in tasks.ALL7 if t != "rte"]
    with pytest.raises(RecipeError, match="unknown lm-eval task .mmlu."):
        tasks.load_task("mmlu", f"offline:{data_dir.resolve()}")
    with pytest.raises(RecipeError):
        tasks.expand_tasks([" "])


def test_estimate_seconds_follows_documents_and_tokens():
    docs, tokens = tasks.TASK_COST["rte"]
    assert tasks.estimate_seconds(["rte"], 10, tokens) == pytest.approx(10.0)
    assert tasks.estimate_seconds(["rte"], None, tokens) == pytest.approx(docs)
    assert tasks.estimate_seconds(["rte"], 10_000, tokens) == pytest.approx(docs)  # limit > split
    full = tasks.estimate_seconds("all7", None, 1.0)
    assert full == pytest.approx(sum(d * t for d, t in tasks.TASK_COST.values()))
    assert tasks.estimate_seconds("all7", 20, 1.0) < full
    with pytest.raises(ValueError):
        tasks.estimate_seconds("all7", 20, 0)


# ----- the real model -----------------------------------------------------------------------------
@pytest.mark.model
def test_all_seven_tasks_on_smollm2(smollm2, data_dir):
    import lm_eval

    limit = 8
    weight = smollm2.model.model.layers[0].mlp.down_proj.weight
    before = weight.detach().clone()
    seen: list[Event] = []
    out = tasks.evaluate_tasks(smollm2.model, smollm2.tokenizer, ["all7"], limit=limit, progress=seen.append)
    assert out["lm_eval"] == lm_eval.__version__
    assert out["source"] == f"offline:{data_dir.resolve()}"
    assert list(out["tasks"]) == tasks.ALL7
    for name, result in out["tasks"].items():
        assert result["n"] == limit and result["n_split"] == tasks.TASK_COST[name][0]
        assert 0.0 <= result["acc"] <= 1.0
        assert result["acc"] * limit == pytest.approx(round(result["acc"] * limit))  # k of 8 documents
        assert result["acc_stderr"] is not None and 0.0 <= result["acc_stderr"] <= 0.5
        assert out["task_versions"][name] == result["version"]
        has_norm = name in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa")
        assert (result["acc_norm"] is not None) == has_norm
        if has_norm:
            assert 0.0 <= result["acc_norm"] <= 1.0 and result["acc_norm_stderr"] is not None
    mean = out["mean"]
    assert mean["acc"] == pytest.approx(sum(r["acc"] for r in out["tasks"].values()) / 7)
    norms = [r["acc_norm"] for r in out["tasks"].values() if r["acc_norm"] is not None]
    assert mean["acc_norm"] == pytest.approx(sum(norms) / 4)
    assert mean["acc_stderr"] > 0
    assert out["task_versions"]["boolq"] == 2.0
    # progress: per task and per batch of requests, monotone, ending at 1
    fractions = [e.fraction for e in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(e.stage == "tasks" for e in seen)
    for name in tasks.ALL7:
        assert any(e.message.startswith(f"{name}: ") and "requests" in e.message for e in seen)
    assert torch_equal(weight, before)  # evaluation leaves the weights alone


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


@pytest.mark.model
def test_recipe_tasks_evaluate_dense_once(smollm2_lab, tmp_path, monkeypatch):
    lab = smollm2_lab
    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path))  # a fresh disk cache (model already loaded)
    monkeypatch.setattr(tasks, "_dense_memory", {})
    calls: list[list[str]] = []
    real = tasks.evaluate_tasks

    def counting(model, tokenizer, names, *args, **kwargs):
        calls.append(list(names))
        return real(model, tokenizer, names, *args, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_tasks", counting)
    recipe = Recipe(
        method="magnitude", sparsity=parse_sparsity("all=0.5"), evaluation=EvalSpec(tasks=("rte",), limit=4)
    )
    lab.prune(recipe)
    try:
        masks = lab.masks
        first = tasks.evaluate_recipe_tasks(lab, recipe)
        assert len(calls) == 2 and first["dense"]["origin"] == {"rte": "computed"}
        assert lab.masks is masks  # still pruned after the dense pass
        zeros = (lab.loaded.model.model.layers[3].mlp.up_proj.weight == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=0.01)

        second = tasks.evaluate_recipe_tasks(lab, recipe)
        assert len(calls) == 3 and second["dense"]["origin"] == {"rte": "memory"}
        assert second["dense"]["tasks"] == first["dense"]["tasks"]
        assert second["pruned"]["tasks"] == first["pruned"]["tasks"]  # deterministic

        tasks._dense_memory.clear()  # a new process: the disk cache answers
        third = tasks.evaluate_recipe_tasks(lab, recipe)
        assert len(calls) == 4 and third["dense"]["origin"] == {"rte": "disk"}
        assert third["dense"]["tasks"] == first["dense"]["tasks"]
        assert len(list(Path(os.environ["PRUNING_LAB_CACHE"], "tasks").glob("*.json"))) == 1

        rows = {(r["task"], r["metric"]): r for r in first["rows"]}
        assert set(rows) == {("rte", "acc"), ("mean", "acc")}  # RTE defines no acc_norm
        row = rows[("rte", "acc")]
        assert row["dense"] == first["dense"]["tasks"]["rte"]["acc"]
        assert row["pruned"] == first["pruned"]["tasks"]["rte"]["acc"]
        assert math.isclose(row["delta"], row["pruned"] - row["dense"]) and row["n"] == 4

        lab.restore()  # the cached dense numbers are those of the dense model
        dense_now = real(lab.loaded.model, lab.loaded.tokenizer, ["rte"], limit=4)
        assert dense_now["tasks"]["rte"] == first["dense"]["tasks"]["rte"]
    finally:
        lab.restore()


@pytest.mark.model
def test_lab_accuracy_on_a_pruned_model_equals_stock_lm_eval_on_its_saved_folder(
    smollm2_lab, data_dir, tmp_path
):
    """The lab wraps the pruned model in memory; stock ``simple_evaluate(model="hf")`` loads the
    saved folder itself with ``from_pretrained``. Same documents (the offline task folder), same
    batch size: every accuracy must be equal."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lab, names, limit = smollm2_lab, ["rte", "arc_easy"], 8
    lab.prune(Recipe(method="magnitude", sparsity=parse_sparsity("all=0.5")))
    folder = lab.save(tmp_path / "pruned")
    ours = tasks.evaluate_tasks(lab.loaded.model, lab.loaded.tokenizer, names, limit=limit, batch_size=8)
    manager = TaskManager(
        include_path=str(tasks.TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)}
    )
    stock = simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32,device=cpu",
        tasks=names,
        task_manager=manager,
        num_fewshot=0,
        limit=limit,
        batch_size=8,
    )
    for name in names:
        scores = stock["results"][name]
        assert stock["n-samples"][name]["effective"] == ours["tasks"][name]["n"] == limit
        assert ours["tasks"][name]["acc"] == scores["acc,none"], name
        assert ours["tasks"][name]["acc_norm"] == scores.get("acc_norm,none"), name
