"""Visitors' files: counted while they are read (a compressed bomb is refused with memory rising
little), never fetched from a URL on a public server, stopped by a cancel mid-file, and deleted
with what is memoized of them when their session expires."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from public_tiny import Recorder

from prune.errors import Cancelled
from prune.progress import CancelToken, cancellable
from runtime.files import TooMuchText, load_file
from ui.hosting import Limits

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["first row", "", "zweite Zeile, ümlaut", "a row\nwith a newline", 'quotes " and , commas']
CPU_CHARS = Limits.for_device("cpu").upload_chars


def write(folder: Path, name: str, rows: list[str]) -> Path:
    """``rows`` as the file ``name`` (its suffixes say the format), written with the standard
    library and pyarrow, not with the reader under test."""
    path = folder / name
    gz = name.endswith(".gz")
    kind = Path(name[:-3] if gz else name).suffix
    if kind == ".parquet":
        pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), path, row_group_size=2)
        return path
    opener = (lambda: gzip.open(path, "wt", encoding="utf-8", newline="")) if gz else (
        lambda: path.open("w", encoding="utf-8", newline="")
    )  # fmt: skip
    with opener() as out:
        if kind == ".jsonl":
            out.writelines(json.dumps({"text": r, "n": i}) + "\n" for i, r in enumerate(rows))
        elif kind == ".json":
            json.dump([{"text": r} for r in rows], out)
        elif kind == ".csv":
            writer = csv.writer(out)
            writer.writerow(["n", "text"])
            writer.writerows([i, r] for i, r in enumerate(rows))
        else:
            out.write("\n\n".join(rows))
    return path


@pytest.mark.parametrize(
    "name", ["a.txt", "a.txt.gz", "a.jsonl", "a.jsonl.gz", "a.json", "a.csv", "a.csv.gz", "a.parquet"]
)
def test_every_format_reads_the_rows_it_was_written_with(tmp_path, name):
    path = write(tmp_path, name, ROWS)
    texts = load_file(path, chars=10_000).texts
    assert texts == (["\n\n".join(ROWS)] if ".txt" in name else ROWS)


def test_parquet_without_dictionary_pages_and_with_nulls(tmp_path):
    path = tmp_path / "plain.parquet"
    table = pa.table({"text": pa.array(["x", None, "yz"], pa.large_string())})
    pq.write_table(table, path, use_dictionary=False)
    assert load_file(path, chars=100).texts == ["x", "", "yz"]
    assert pq.read_table(path).column("text").to_pylist() == ["x", None, "yz"]


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl.gz", "a.json", "a.csv", "a.parquet"])
def test_over_the_character_limit_is_refused_naming_the_limit(tmp_path, name):
    rows = [f"row {i} " + "x" * 50 for i in range(40)]  # 40 rows, 2,000+ characters
    path = write(tmp_path, name, rows)
    with pytest.raises(TooMuchText) as refused:
        load_file(path, chars=1_000)
    assert str(refused.value) == (
        f"{name}: more than 1,000 characters; this server reads at most 1,000 characters of an uploaded file"
    )
    assert str(tmp_path) not in str(refused.value)
    assert len(load_file(path, chars=5_000).texts) == (1 if name == "a.txt" else 40)


@pytest.mark.parametrize("name", ["a.csv", "a.parquet"])  # rows of a few characters each
def test_over_the_row_limit_is_refused_naming_the_limit(tmp_path, name):
    path = write(tmp_path, name, ["r"] * 200)  # 200 rows of one character: few characters, many rows
    with pytest.raises(TooMuchText, match=r"more than 100 rows; this server reads at most 100 rows"):
        load_file(path, chars=1_600)  # 1,600 characters allow 100 rows
    assert len(load_file(path, chars=3_200).texts) == 200


def test_without_a_host_limit_the_budget_is_free_memory_and_says_so(tmp_path, monkeypatch):
    import runtime.files as files

    monkeypatch.setattr(files, "_host_chars", None)
    limit = files.budget()
    assert not limit.host
    assert limit.chars == pytest.approx(psutil.virtual_memory().available / files.BYTES_PER_CHAR, rel=0.2)
    monkeypatch.setattr(files, "BYTES_PER_CHAR", psutil.virtual_memory().available // 100)  # ~100 chars
    with pytest.raises(TooMuchText, match="more memory than this machine has free; use a smaller file"):
        load_file(write(tmp_path, "a.txt", ["y" * 1000]))


def test_the_upload_limit_is_a_hosting_setting_shown_with_the_others(monkeypatch):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    public = app.hosting_from(app.parse_args(["--public"], {}), "cpu").limits
    assert public.upload_chars == 2_000_000 and Limits.for_device("cuda").upload_chars == 16_000_000
    assert "≤ 2,000,000 characters of text per upload" in public.describe()
    local = app.hosting_from(app.parse_args([], {"PRUNING_LAB_MAX_UPLOAD_CHARS": "1234"}), "cpu").limits
    assert local.upload_chars == 1234 and local.calibration_tokens is None
    assert app.parse_args(["--max-upload-chars", "99"], {}).max_upload_chars == 99


def _peak_rss_rise(call) -> tuple[float, BaseException | None]:
    """MB the process's resident memory rose above its level before ``call`` at its highest
    (sampled every 2 ms), and what ``call`` raised."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    raised = None
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - returned to the test
        raised = err
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], process.memory_info().rss) - before) / 2**20, raised


def test_compressed_files_that_inflate_to_gigabytes_are_refused_with_memory_rising_little(tmp_path):
    value = "a" * 2**20  # one MiB of text, 1,000 times or more: over 1 GB decoded
    bomb = tmp_path / "bomb.parquet"
    repeated = pa.DictionaryArray.from_arrays(pa.array([0] * 1100, pa.int32()), pa.array([value]))
    pq.write_table(pa.table({"text": repeated}), bomb, compression="zstd")
    member = gzip.compress(value.encode(), compresslevel=9)  # gzip members concatenate
    gz = tmp_path / "bomb.jsonl.gz"
    with gz.open("wb") as out:
        out.write(gzip.compress(b'{"text": "'))
        out.writelines([member] * 1000)  # deflate packs at most ~1,000:1
    txt = tmp_path / "bomb.txt.gz"
    txt.write_bytes(gz.read_bytes())
    with gzip.open(gz) as stream:  # what it holds, counted independently (the first 8 MiB of it)
        assert len(stream.read(8 * 2**20)) == 8 * 2**20
    for path in (bomb, gz, txt):
        assert path.stat().st_size < 1.1 * 2**20  # about 1 MB
        start = time.monotonic()
        rise, raised = _peak_rss_rise(lambda path=path: load_file(path, chars=CPU_CHARS))
        assert isinstance(raised, TooMuchText), raised
        assert f"at most {CPU_CHARS:,} characters" in str(raised)
        assert rise < 100, f"{path.name}: resident memory rose {rise:.0f} MB"
        assert time.monotonic() - start < 2.0
    assert pq.ParquetFile(bomb).metadata.num_rows == 1100


class CancelAfter(CancelToken):
    """A job's token that the job's owner cancels after it has been checked ``checks`` times."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks, self.seen = checks, 0

    def check(self) -> None:
        self.seen += 1
        if self.seen >= self.checks:
            self.cancel("cancelled by you")
        super().check()


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.csv", "a.parquet", "a.txt"])
def test_a_cancelled_job_stops_reading_mid_file(tmp_path, name):
    rows = [f"row {i} " + "z" * 2000 for i in range(3000)]  # 6 MB: several parquet batches, txt chunks
    path = write(tmp_path, name, rows)
    whole = CancelAfter(10**9)
    with cancellable(whole):
        load_file(path, chars=10**8)
    assert whole.seen > 3  # a whole read checks the token many times
    token = CancelAfter(3)
    with cancellable(token), pytest.raises(Cancelled, match="cancelled by you"):
        load_file(path, chars=10**8)
    assert token.seen == 3  # stopped at the first check after the cancel


def test_reading_an_upload_leaves_nothing_in_the_datasets_cache(tmp_path):
    """A fresh interpreter reads a jsonl, a csv and a parquet file: ``datasets`` is never
    imported and its cache folder stays empty."""
    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    paths = [str(write(tmp_path, name, ROWS)) for name in ("a.jsonl", "a.csv.gz", "a.parquet")]
    code = (
        "import sys; from runtime.files import load_file\n"
        f"for p in {paths!r}: assert load_file(p, chars=10_000).texts\n"
        "print('datasets' in sys.modules)"
    )
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert not list(cache.iterdir())


def test_an_expired_session_leaves_none_of_its_uploads(tmp_path):
    from gradio.utils import get_upload_folder
    from tiny import word_tokenizer

    from evaluation import perplexity
    from ui.hosting import Hosting
    from ui.sessions import EXPORT_ROOT, Session, SessionBook

    def upload(text: str) -> Path:  # where Gradio puts an upload: <upload folder>/<hash>/<name>
        folder = Path(get_upload_folder()) / uuid.uuid4().hex
        folder.mkdir(parents=True)
        path = folder / "mine.jsonl"
        path.write_text(json.dumps({"text": text}) + "\n")
        return path

    tokenizer = word_tokenizer()
    own, shared = upload("w1 w2 w3"), upload("w4 w5")
    export = EXPORT_ROOT / "session-other" / "exports" / "model.zip"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"zip")
    book = SessionBook(Hosting())
    alice, bob = Session(), Session()
    alice.note_uploads(str(own), str(shared), str(export), None)
    bob.note_uploads(str(shared))
    book.touch(alice)
    book.touch(bob)
    for path in (own, shared):
        ids, _ = perplexity.encoded(tokenizer, str(path))
        assert ids.numel() > 0
    memoized = lambda path: any(key[0] == str(path) for key in perplexity._ENCODED)  # noqa: E731
    assert memoized(own) and memoized(shared)

    book.expire(alice)
    assert not own.exists() and not own.parent.exists()  # the file and Gradio's folder for it
    assert not memoized(own)
    assert shared.exists() and memoized(shared)  # bob still names it (Gradio keeps one per content)
    assert export.exists()  # another session's export is not an upload to delete
    assert not alice.uploads

    book.expire(bob)
    assert not shared.exists() and not memoized(shared)
    export.unlink()


# ----- through a real public server (tests/public_tiny.py: 5,000 characters per upload) ---------
SMALL = dict(nsamples=4, seqlen=16, eval_windows=2, eval_seqlen=16, layer_last=1)


@pytest.mark.model
def test_a_public_server_refuses_a_url_file_and_an_upload_over_its_limit(public_tiny, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(public_tiny.url, verbose=False)
    url = "http://datasets.hf.co/visitor/calibration.jsonl"
    meta = {"_type": "gradio.FileData"}
    for payload in (handle_file(url), {"path": url, "meta": meta}):  # what gradio_client sends; raw
        start = time.monotonic()
        with pytest.raises(AppError, match="This server does not fetch files from a URL"):
            client.predict(api_name="/prune", calibration="uploaded file", calibration_file=payload, **SMALL)
        assert time.monotonic() - start < 2.0
    # Gradio's own fetch of such a URL goes through the proxy and would be recorded here (checked by
    # hand: processing_utils.async_ssrf_protected_download with HTTP_PROXY set to this recorder).
    assert not [path for path in Recorder.seen if "datasets.hf.co" in path]

    big = write(tmp_path, "big.jsonl", ["w1 w2 w3 " * 100] * 10)  # 9,000+ characters, far below 1 MB
    with pytest.raises(AppError) as refused:
        client.predict(
            api_name="/prune", calibration="uploaded file", calibration_file=handle_file(str(big)), **SMALL
        )
    assert "big.jsonl: more than 5,000 characters; this server reads at most 5,000 characters" in str(
        refused.value
    )
    assert str(tmp_path) not in str(refused.value)
    with urllib.request.urlopen(public_tiny.url + "config", timeout=10) as page:
        assert "5,000 characters of text per upload" in page.read().decode()  # the limits line
    assert public_tiny.alive()
