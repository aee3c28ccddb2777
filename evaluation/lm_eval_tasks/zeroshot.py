"""Read the seven zero-shot tasks from local JSONL files, in the schemas of the Hugging Face
datasets that lm-eval's built-in tasks read, so the built-in prompts apply unchanged.

lm-eval calls ``load`` as the task's ``custom_dataset`` with the task metadata (which carries
``data_dir``, the offline folder given at run time) and the YAML's ``dataset_kwargs``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict

Row = dict


def load(
    data_dir: str | None = None, file: str = "", split: str = "validation", schema: str = "", **_: object
) -> DatasetDict:
    """One split of one task, converted to the hub schema its built-in task expects."""
    if not data_dir:
        raise ValueError("offline lm-eval tasks need data_dir in the task metadata")
    path = Path(data_dir).expanduser() / "zeroshot" / file
    if not path.is_file():
        raise FileNotFoundError(f"offline task data not found: {path}")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    convert = CONVERTERS.get(schema, public_fields)
    return DatasetDict({split: Dataset.from_list([convert(row) for row in rows])})


def public_fields(row: Row) -> Row:
    """Drop the conversion's bookkeeping fields (``_mosaic_*``): they are not in the hub schema."""
    return {key: value for key, value in row.items() if not key.startswith("_")}


def rte_glue(row: Row) -> Row:
    """SuperGLUE RTE (premise/hypothesis) -> GLUE RTE (sentence1/sentence2), which lm-eval's ``rte``
    reads. The 277 validation pairs and the labels (0 = entailment) are the same in both."""
    return {
        "sentence1": row["premise"],
        "sentence2": row["hypothesis"],
        "label": int(row["label"]),
        "idx": int(row["idx"]),
    }


_SENTENCE_END = re.compile(r"(?<=[.!?]) ")


def split_context(ctx: str) -> tuple[str, str]:
    """Rebuild HellaSwag's ``ctx_a``/``ctx_b`` from ``ctx`` (the local file lacks them).

    ActivityNet items end in an incomplete, lower-case noun phrase, which is ``ctx_b``
    ("A man is sitting on a roof. he"); WikiHow items have an empty ``ctx_b``. lm-eval
    capitalizes ``ctx_b``, so getting the split right is what keeps the prompt identical.
    """
    parts = _SENTENCE_END.split(ctx)
    tail = parts[-1]
    if len(parts) > 1 and tail[:1].islower():
        return ctx[: len(ctx) - len(tail) - 1], tail
    return ctx, ""


def hellaswag(row: Row) -> Row:
    ctx_a, ctx_b = split_context(row["ctx"])
    return {
        "activity_label": row["activity_label"],
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": row["ctx"],
        "endings": list(row["endings"]),
        "label": str(row["label"]),
    }


_processed: dict[str, Dataset] = {}


def hellaswag_docs(dataset: Dataset) -> Dataset:
    """lm-eval's own HellaSwag ``process_docs``, memoized by the split's content fingerprint:
    lm-eval calls it on the same 10,042 documents up to four times per run (~4 s each on a CPU)."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    key = dataset._fingerprint
    if key not in _processed:
        _processed[key] = process_docs(dataset)
    return _processed[key]


CONVERTERS: dict[str, Callable[[Row], Row]] = {"rte_glue": rte_glue, "hellaswag": hellaswag}
