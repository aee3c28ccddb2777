"""The model card of a pruned model: what was pruned, how, and what it cost, in the metadata the
hub reads (``base_model``, tags, ``model-index`` eval results) and in a few lines a person reads.

Built from a run's result (``RunResult.to_dict`` plus the lm-eval tasks the CLI adds), with
huggingface_hub's own card classes, so the card parses where the hub parses it.
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from evaluation.perplexity import dataset_label

# what the lab measures -> (hub dataset id, its config, the split measured)
PERPLEXITY_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "en", "validation"),
}
TASK_DATASETS = {  # the datasets of lm-eval 0.4's tasks of these names
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "rte": ("nyu-mll/glue", "rte", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
}


def _perplexity_results(output: dict) -> list[EvalResult]:
    results = []
    for dataset, pair in output.get("perplexity", {}).items():
        pruned = pair.get("pruned")
        if pruned is None:
            continue
        hub_id, config, split = PERPLEXITY_DATASETS.get(dataset, (dataset_label(dataset), None, None))
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=hub_id,
                dataset_name=dataset_label(dataset),
                dataset_config=config,
                dataset_split=split,
                metric_type="perplexity",
                metric_value=round(pruned["perplexity"], 4),
                metric_name=f"perplexity ({pruned['windows']} windows x {pruned['seqlen']} tokens)",
            )
        )
    return results


def _task_results(output: dict) -> list[EvalResult]:
    results = []
    pruned = ((output.get("tasks") or {}).get("pruned") or {}).get("tasks", {})
    for task, metrics in pruned.items():
        hub_id, config, split = TASK_DATASETS.get(task, (task, None, None))
        for metric in ("acc", "acc_norm"):
            if metrics.get(metric) is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"{task} (lm-eval, zero-shot)",
                    dataset_type=hub_id,
                    dataset_name=task,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(metrics[metric], 4),
                    metric_name=f"{metric} ({metrics['n']} of {metrics['n_split']} documents)",
                )
            )
    return results


def _body(output: dict, base_model: str) -> str:
    recipe, report = output["recipe"], output["prune"]["report"]
    calibration = output["prune"].get("calibration") or {}
    lines = [
        f"# {base_model}, pruned with {recipe['method']} ({recipe['structure']})",
        "",
        f"Pruned from [{base_model}](https://huggingface.co/{base_model}) by the Pruning Lab, without "
        "retraining. The weights are stored dense with zeros (serving engines no longer run sparse "
        "weights); only structured pruning makes the matrices smaller.",
        "",
        "| role | asked | achieved | pruned weights |",
        "| --- | --- | --- | --- |",
    ]
    for role, r in report["roles"].items():
        lines.append(f"| {role} | {r['requested']:.2%} | {r['sparsity']:.2%} | {r['pruned']:,} |")
    if calibration:
        lines += [
            "",
            f"Calibration: {calibration['nsamples']} x {calibration['seqlen']} tokens of "
            f"{calibration['source']} ({recipe['stats_mode']} statistics).",
        ]
    for dataset, pair in output.get("perplexity", {}).items():
        dense, pruned = pair.get("dense"), pair["pruned"]
        before = f"dense {dense['perplexity']:.3f} -> " if dense else ""
        lines.append(f"- {dataset_label(dataset)} perplexity: {before}pruned {pruned['perplexity']:.3f}")
    lines += [
        "",
        "The recipe that made it is `recipe.json` (replay: `python -m prune --recipe recipe.json`).",
    ]
    return "\n".join(lines) + "\n"


def model_card(output: dict, base_model: str, model_name: str) -> ModelCard:
    """The card of the model a run made; ``base_model``: the hub id it was pruned from."""
    recipe = output["recipe"]
    data = ModelCardData(
        base_model=base_model,
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pruned", "pruning-lab", recipe["method"], recipe["structure"]],
        eval_results=_perplexity_results(output) + _task_results(output) or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(output, base_model)}")
