"""Text datasets through `datasets`: the hub when online, a local data folder when offline.

The offline folder mirrors the layout of the project's shared data (``wikitext-2-raw-v1/``,
``c4/``); set it with ``--data-dir`` or ``$PRUNING_LAB_DATA``. From the hub, exactly one file per
split is fetched (``HUB_FILES``), into huggingface_hub's cache, where a later offline start finds it.
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


def _local(name: str, split: str, folder: Path) -> TextSource:
    for relative in _LOCAL[(name, split)]:
        path = folder / relative
        if path.exists():
            return TextSource(_rows(path), f"{name} {split} ({path})")
    if (name, split) == ("c4", "validation"):
        train = _local("c4", "train", folder)
        note = (
            "no C4 validation file in the data folder: using the C4 train sample instead "
            "(numbers are not comparable to papers)"
        )
        return TextSource(train.texts, train.description, note)
    wanted = " or ".join(str(folder / r) for r in _LOCAL[(name, split)])
    raise DataError(f"{name} {split} split not found offline: looked for {wanted}")


@dataclass(frozen=True)
class HubFile:
    """One data file of a dataset repository on the hub: what is downloaded, nothing more."""

    repo_id: str
    config: str  # the dataset's config the file belongs to (its folder in the repo)
    filename: str  # the path inside the repo


# The files the Wanda / SparseGPT reference code reads: WikiText-2 raw from its current home
# (the bare ``wikitext`` id is legacy), C4 English as ONE shard of each split (the whole of C4 is
# hundreds of GB; the shard names are the reference's ``get_c4``).
HUB_FILES = {
    ("wikitext2", "test"): HubFile(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext-2-raw-v1/test-00000-of-00001.parquet"
    ),
    ("wikitext2", "train"): HubFile(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext-2-raw-v1/train-00000-of-00001.parquet"
    ),
    ("c4", "train"): HubFile("allenai/c4", "en", "en/c4-train.00000-of-01024.json.gz"),
    ("c4", "validation"): HubFile("allenai/c4", "en", "en/c4-validation.00000-of-00008.json.gz"),
}


def _hub(name: str, split: str) -> TextSource:
    """The one file through huggingface_hub's cache (``hf_hub_download``): downloaded once online;
    with ``HF_HUB_OFFLINE`` (set when the hub does not answer) the cached copy, if there is one."""
    from huggingface_hub import hf_hub_download

    spec = HUB_FILES[(name, split)]
    try:
        path = hf_hub_download(spec.repo_id, spec.filename, repo_type="dataset")
    except Exception as err:  # noqa: BLE001 - offline, not found, refused: all one message here
        reason = (str(err).splitlines() or [""])[0][:200]
        raise DataError(
            f"could not load {name} {split} ({spec.repo_id}, {spec.filename}) from the Hugging Face "
            f"Hub or its cache ({type(err).__name__}: {reason}). Offline, point --data-dir "
            "(or $PRUNING_LAB_DATA) at a data folder."
        ) from None
    return TextSource(_rows(Path(path)), f"{name} {split} ({spec.repo_id} {spec.config}, hub)")


def load_texts(name: str, split: str) -> TextSource:
    """Rows of text of WikiText-2 raw or C4 (English): the local folder if set, else the hub."""
    if (name, split) not in _LOCAL:
        raise DataError(f"unknown dataset {name!r} split {split!r}; known: wikitext2, c4")
    folder = data_dir()
    return _local(name, split, folder) if folder else _hub(name, split)


_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def _rows(path: Path) -> list[str]:
    """The "text" of every row of a json lines (plain or gzip) or parquet file, read by `datasets`."""
    from datasets import load_dataset

    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise DataError(f"unsupported file type {_suffix(path)!r}; use .txt, .jsonl, .json or .parquet")
    data = load_dataset(builder, data_files=str(path), split="train")
    if "text" not in data.column_names:
        raise DataError(f"{path.name} has no 'text' field (fields: {', '.join(data.column_names)})")
    return list(data["text"])
