"""Text datasets through `datasets`: the hub when online, a local data folder when offline.

The offline folder mirrors the layout of the project's shared data (``wikitext-2-raw-v1/``,
``c4/``); set it with ``--data-dir`` or ``$PRUNING_LAB_DATA``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prune.errors import LabError
from runtime.paths import data_dir


class DataError(LabError):
    """A dataset that cannot be found or read; the message says where it looked."""


@dataclass
class TextSource:
    texts: list[str]
    description: str  # what was read, for results and the UI
    note: str = ""  # a caveat, e.g. a substitute split


_LOCAL = {
    ("wikitext2", "test"): ["wikitext-2-raw-v1/test.jsonl"],
    ("wikitext2", "train"): ["wikitext-2-raw-v1/train.jsonl"],
    ("c4", "train"): ["c4/c4-train.00000-of-01024.json.gz", "c4/c4_en_train00000_first1000.jsonl"],
    ("c4", "validation"): ["c4/c4-validation.00000-of-00008.json.gz", "c4/c4_validation.jsonl"],
}


def _load_json(path: Path) -> list[str]:
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")["text"]


def _local(name: str, split: str, folder: Path) -> TextSource:
    for relative in _LOCAL[(name, split)]:
        path = folder / relative
        if path.exists():
            return TextSource(_load_json(path), f"{name} {split} ({path})")
    if (name, split) == ("c4", "validation"):
        train = _local("c4", "train", folder)
        note = (
            "no C4 validation file in the data folder: using the C4 train sample instead "
            "(numbers are not comparable to papers)"
        )
        return TextSource(train.texts, train.description, note)
    wanted = " or ".join(str(folder / r) for r in _LOCAL[(name, split)])
    raise DataError(f"{name} {split} split not found offline: looked for {wanted}")


def _hub(name: str, split: str) -> TextSource:
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        else:
            shard = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }[split]
            data = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "unreachable"
        raise DataError(
            f"could not load {name} {split} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err)[:200]}). Offline, point --data-dir (or $PRUNING_LAB_DATA) at a data folder."
        ) from None
    return TextSource(data["text"], f"{name} {split} (hub)")


def load_texts(name: str, split: str) -> TextSource:
    """Rows of text of WikiText-2 raw or C4 (English): the local folder if set, else the hub."""
    if (name, split) not in _LOCAL:
        raise DataError(f"unknown dataset {name!r} split {split!r}; known: wikitext2, c4")
    folder = data_dir()
    return _local(name, split, folder) if folder else _hub(name, split)
