"""No server path reaches a visitor (issue 19, item 4): a public app whose model folder, cache folder
and data folder each carry a sentinel name is driven through every endpoint a visitor can call,
and no byte it answers (messages, results, plots, downloads, every file inside every zip, the page
and its config) contains the sentinel. Plus the scrubber and the export disk reservation alone."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.request
import zipfile
from pathlib import Path

import pytest
from public_tiny import SENTINEL

from evaluation.share import HIDDEN, scrub_paths
from runtime.paths import CACHE_ENV, DATA_ENV
from ui.hosting import DiskReservations, LimitExceeded


# ----- the scrubber and the reservation (no model) --------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["/data/pruning-lab/stats/x.pt", "/root/.cache/pruning-lab/models/m", "/home/ada/m/c.txt", "/tmp/a/b"],
)
def test_the_scrubber_keeps_only_the_last_part_of_any_absolute_path(path):
    text = scrub_paths(f"could not read {path}: gone")
    assert text == f"could not read {Path(path).name}: gone"


def test_the_scrubber_hides_bare_server_folders_and_the_hosts_cache_and_data_folders(monkeypatch, tmp_path):
    for bare in ("/data", "/root", "/home", "/tmp"):
        assert scrub_paths(f"no room in {bare}.") == f"no room in {HIDDEN}."
    cache = tmp_path / f"{SENTINEL}-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setenv(DATA_ENV, f"{SENTINEL}-data")  # as a host may give it: relative
    text = scrub_paths(f"cache {cache} full; data {SENTINEL}-data/c4, ids {cache}/ids")
    assert SENTINEL not in text and "cache" in text and HIDDEN in text
    assert scrub_paths("4 x 128 tokens, 1/2 of q/k/v, org/name") == "4 x 128 tokens, 1/2 of q/k/v, org/name"


def test_two_exports_cannot_both_pass_the_free_disk_check(tmp_path):
    disk = DiskReservations()
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    need = 0.6 * free_mb  # one fits, two do not
    with disk.reserve(tmp_path, need, 0.0):
        assert disk.reserved_mb == need
        with pytest.raises(LimitExceeded, match="not enough free disk"):
            with disk.reserve(tmp_path, need, 0.0):
                pass
    assert disk.reserved_mb == 0.0
    results = []

    def export():
        try:
            with disk.reserve(tmp_path, need, 0.0):
                results.append("wrote")
                threading.Event().wait(0.3)  # writing, reservation held
        except LimitExceeded:
            results.append("refused")

    threads = [threading.Thread(target=export) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "wrote"] and disk.reserved_mb == 0.0


# ----- a public app with the sentinel in every host folder (tests/public_tiny.py) -------------------
def every_byte(value, found: list[bytes]) -> None:
    """Everything a value a visitor got holds: its text, and each file it names (a downloaded
    output) with every member of a zip."""
    if isinstance(value, dict):
        for k, v in value.items():
            every_byte(k, found)
            every_byte(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            every_byte(v, found)
    elif isinstance(value, str):
        found.append(value.encode())
        path = Path(value)
        if len(value) < 4096 and path.is_absolute() and path.is_file():
            data = path.read_bytes()
            found.append(data)
            if zipfile.is_zipfile(io.BytesIO(data)):
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    found.extend(archive.read(name) for name in archive.namelist())
                    found.extend(name.encode() for name in archive.namelist())
    elif value is not None:
        found.append(str(value).encode())


SMALL = dict(nsamples=4, seqlen=64, eval_windows=1, eval_seqlen=64, calibration_file=None, eval_file=None)
STUDY = dict(calibration="c4", seed=0, nsamples=4, seqlen=64, calibration_file=None, api_name="/study")


@pytest.mark.model
def test_no_byte_a_visitor_gets_names_a_server_folder(public_tiny, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(public_tiny.url, verbose=False, download_files=str(tmp_path / "downloads"))
    calls = {
        "load_model": lambda: client.predict("tiny-chat", "", api_name="/load_model"),
        "readout": lambda: client.predict(api_name="/readout", calibration_file=None, eval_file=None),
        "prune": lambda: client.predict(api_name="/prune", **SMALL),
        "measure": lambda: client.predict(api_name="/measure"),
        "generate": lambda: client.predict(prompt="Hi", max_new_tokens=4, api_name="/generate"),
        "tasks_estimate": lambda: client.predict(["rte"], 4, True, api_name="/tasks_estimate"),
        "tasks": lambda: client.predict(["rte"], 4, True, api_name="/tasks"),
        "single": lambda: client.predict("single", "50", [], 1, 64, "wikitext2", [], 0, **STUDY),
        "combined": lambda: client.predict("combined", "50", [], 1, 64, "c4", [], 0, **STUDY),
        "downstream": lambda: client.predict("downstream", "10", [], 1, 64, "wikitext2", [], 0, **STUDY),
        "allocate": lambda: client.predict(50, False, api_name="/allocate"),
        "export_recipe": lambda: client.predict(api_name="/export_recipe"),
        "export_model": lambda: client.predict(api_name="/export_model"),
        "push_to_hub": lambda: client.predict("ada/tiny-pruned", True, api_name="/push_to_hub"),
        "bad upload name": lambda: client.predict(
            api_name="/prune", **dict(SMALL, eval_datasets=["uploaded file"])
        ),
        "clear_history": lambda: client.predict(api_name="/clear_history"),
        "cancel": lambda: client.predict(api_name="/cancel"),
    }
    found: list[bytes] = []
    answers: dict[str, object] = {}
    for name, call in calls.items():
        try:
            answers[name] = call()
        except AppError as err:
            answers[name] = f"error: {err}"
        every_byte(answers[name], found)
    assert "log in with Hugging Face first" in str(answers["push_to_hub"])
    recipe = json.loads(answers["export_recipe"][1])
    assert recipe["model"] == "tiny-chat"
    errors = {
        k: v
        for k, v in answers.items()
        if str(v).startswith("error:") and k not in ("push_to_hub", "bad upload name")
    }
    assert not errors, errors  # every endpoint really ran
    for page in ("", "config", "gradio_api/info"):
        with urllib.request.urlopen(public_tiny.url + page, timeout=30) as response:
            found.append(response.read())
    leaks = [
        blob[max(0, blob.find(SENTINEL.encode()) - 120) :][:240]
        for blob in found
        if SENTINEL.encode() in blob
    ]
    assert not leaks, leaks
    assert sum(len(b) for b in found) > 1_000_000  # the model zip and the plots were read
