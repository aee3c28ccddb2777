"""The online path for real, offline: the hub libraries in offline mode read a model and the
evaluation datasets by their hub ids from local mirrors in huggingface_hub's own cache layout,
made here from the converted offline model and ../shared/data. The ids, configs and file names
the loaders ask for are the hub's: a mirror holds exactly those, and anything else fails.

This is also what a Space meets when the hub is down at runtime: ``preload_from_hub`` put the
model in this cache at build time, and ``go_offline_if_no_hub`` set ``HF_HUB_OFFLINE``."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from runtime.paths import DATA_ENV

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet")
C4_TRAIN = ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")
C4_VALIDATION = ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A fresh, empty HF_HOME (hub cache, datasets cache) with the hub libraries offline. The
    variables are set, and so are the values the libraries took from them when an earlier test
    imported them, as a fresh import under these variables would take them."""
    import datasets.config
    import huggingface_hub.constants

    home = tmp_path / "hf"
    hub, cache = home / "hub", home / "datasets"
    for name, value in {
        "HF_HOME": home,
        "HF_HUB_CACHE": hub,
        "HF_DATASETS_CACHE": cache,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    downloads = cache / datasets.config.DOWNLOADED_DATASETS_DIR
    for name, value in {
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": cache,
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": downloads,
        "EXTRACTED_DATASETS_PATH": downloads / datasets.config.EXTRACTED_DATASETS_DIR,
        "HF_HUB_OFFLINE": True,
        "HF_DATASETS_OFFLINE": True,
    }.items():
        monkeypatch.setattr(datasets.config, name, value)
    return hub


def mirror(hub: Path, kind: str, repo_id: str, files: dict[str, Path]) -> Path:
    """``repo_id`` as huggingface_hub caches it: ``<kind>s--org--name/`` with each file's content
    in ``blobs/<sha256>``, a snapshot of relative links to the blobs under a 40-hex commit, and
    ``refs/main`` naming that commit. Returns the snapshot folder."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        blob = repo / "blobs" / digest.hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.symlink_to(source.resolve())  # the content, not copied (the model is 0.5 GB)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def preloaded(repo_id: str) -> list[str]:
    """The files of ``repo_id`` the README's front matter has a Space preload (``preload_from_hub``
    items are ``repo_id file,file,...``)."""
    front_matter = yaml.safe_load((ROOT / "README.md").read_text(encoding="utf-8").split("---")[1])
    items = [item.split() for item in front_matter["preload_from_hub"]]
    return next(item[1].split(",") for item in items if item[0] == repo_id)


@pytest.fixture(scope="module")
def converted() -> Path:
    """The offline default's converted folder (safetensors, config, tokenizer), made before the
    hub libraries go offline."""
    from runtime.models import DEFAULT_MODEL, OFFLINE_MODELS, _converted_dir

    return _converted_dir(OFFLINE_MODELS[DEFAULT_MODEL], lambda message: None)


def test_the_hub_model_id_loads_from_a_hub_cache_snapshot_with_the_hub_offline(offline_hub, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.models import HUB_DEFAULT_MODEL, ModelLoadError, load

    assert HUB_DEFAULT_MODEL == HUB_MODEL
    with pytest.raises(ModelLoadError, match=HUB_MODEL):  # offline and not cached: no download
        load(HUB_MODEL)
    files = preloaded(HUB_MODEL)  # what a Space's cache holds, as far as the conversion has it
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    mirror(
        offline_hub,
        "model",
        HUB_MODEL,
        {name: converted / name for name in files if (converted / name).exists()},
    )
    lm = load(HUB_MODEL)
    assert lm.source == HUB_MODEL and lm.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(lm.tokenizer(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_the_default_model_is_the_hub_one_on_a_space_or_online_and_the_gguf_offline(monkeypatch):
    import app
    from runtime.models import DEFAULT_MODEL, OFFLINE_MODELS, default_model

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert default_model(offline=True) == DEFAULT_MODEL == "smollm2-135m-instruct"
    assert default_model(offline=False) == HUB_MODEL
    monkeypatch.setenv("SPACE_ID", "someone/pruning-lab")
    assert default_model(offline=True) == HUB_MODEL  # preloaded: the cache serves it offline
    args = app.parse_args([], {})
    args.model = default_model(offline=True)  # as app.main sets it once the hub has been asked
    hosting = app.hosting_from(args, "cpu")  # a Space: public, visitors offered the start model first
    assert hosting.public and hosting.allowed() == (HUB_MODEL, *OFFLINE_MODELS)


def _jsonl_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def test_wikitext2_and_c4_by_their_hub_ids_load_from_a_hub_cache_mirror_offline(
    offline_hub, data_dir, tmp_path, monkeypatch
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.data import DataError, load_texts

    keys = [("wikitext2", "test"), ("c4", "train"), ("c4", "validation")]
    local = {key: load_texts(*key).texts for key in keys}  # the data-folder loader
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(DataError, match="Salesforce/wikitext.*test-00000-of-00001.parquet"):
        load_texts("wikitext2", "test")  # offline, nothing cached yet: the hub is not asked

    wikitext = _jsonl_texts(data_dir / "wikitext-2-raw-v1" / "test.jsonl")
    parquet = tmp_path / "wikitext-test.parquet"
    pq.write_table(pa.table({"text": wikitext}), parquet)
    c4 = data_dir / "c4" / "c4_en_train00000_first1000.jsonl"
    shard = tmp_path / "c4-shard.json.gz"
    with open(c4, "rb") as src, gzip.open(shard, "wb") as dst:
        shutil.copyfileobj(src, dst)
    mirror(offline_hub, "dataset", WIKITEXT[0], {WIKITEXT[1]: parquet})
    mirror(offline_hub, "dataset", C4_TRAIN[0], {C4_TRAIN[1]: shard, C4_VALIDATION[1]: shard})

    wiki = load_texts("wikitext2", "test")
    assert wiki.texts == wikitext == local[("wikitext2", "test")] and len(wiki.texts) == 4358
    assert "Salesforce/wikitext wikitext-2-raw-v1" in wiki.description
    c4_texts = _jsonl_texts(c4)
    for split in ("train", "validation"):
        source = load_texts("c4", split)
        assert source.texts == c4_texts == local[("c4", split)] and "allenai/c4" in source.description
        assert str(tmp_path) not in source.description  # no server path for a visitor
    assert any((offline_hub.parent / "datasets").iterdir())  # datasets used the fresh cache
