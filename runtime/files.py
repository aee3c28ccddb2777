"""A user's text file, read within a budget of characters and rows while it streams in.

A 1 MB parquet or gzip file can hold gigabytes of text, so the size of the file says nothing: the
readers count what they decode as they go (gzip through its streaming decompressor, parquet one
batch of rows at a time with the text column read as a dictionary, so that repeated values are
counted before they are decoded, JSON lines / CSV / plain text a bounded line or chunk at a time)
and stop at the first character over the budget. The budget is the host's (``limit_files``, the
app's ``--max-upload-chars``) or, where none is set, what this machine's free memory can tokenize.
Nothing goes through ``datasets``, so nothing of an upload is left in its cache. Every chunk is a
``checkpoint``: a cancelled job stops mid-file.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from prune.progress import checkpoint
from runtime.data import DataError, TextSource

# Tokenizing text peaks at about 150 bytes a character (SmolLM2's tokenizer on 4M characters of
# WikiText-2: 600 MB); reading it costs a few more.
BYTES_PER_CHAR = 200
ROW_CHARS = 16  # a budget of N characters allows N / 16 rows (each row costs ~60 bytes as a str)
CHUNK = 1 << 20  # characters read at a time from a plain text file
PARQUET_BATCH = 1024  # rows decoded at a time
SUFFIXES = (".txt", ".text", ".md", ".raw", ".jsonl", ".json", ".csv", ".parquet")

_host_chars: int | None = None


class TooMuchText(DataError):
    """A file with more text than the budget; the message names the limit."""


@dataclass(frozen=True)
class Budget:
    """How much of a file may be decoded, and why (for the message)."""

    chars: int
    host: bool  # the host's limit (else: this machine's free memory)

    @property
    def rows(self) -> int:
        return max(1, self.chars // ROW_CHARS)

    def refuse(self, name: str, amount: int, unit: str) -> TooMuchText:
        """``unit``: "characters" or "rows"."""
        if self.host:
            why = f"this server reads at most {amount:,} {unit} of an uploaded file"
        else:
            why = "tokenizing more would need more memory than this machine has free; use a smaller file"
        return TooMuchText(f"{name}: more than {amount:,} {unit}; {why}")


def limit_files(chars: int | None) -> None:
    """The host's budget for every file this process reads for a user (None: free memory's)."""
    global _host_chars
    _host_chars = chars


def budget(chars: int | None = None) -> Budget:
    """``chars`` if given, else the host's limit, else what free memory can tokenize."""
    chars = chars or _host_chars
    if chars:
        return Budget(chars, host=True)
    import psutil

    return Budget(max(1, psutil.virtual_memory().available // BYTES_PER_CHAR), host=False)


class _Tally:
    """What has been decoded so far; raises at the first character or row over the budget."""

    def __init__(self, name: str, limit: Budget):
        self.name, self.limit, self.chars, self.rows = name, limit, 0, 0

    @property
    def left(self) -> int:
        return self.limit.chars - self.chars

    def read(self, count: int) -> None:
        checkpoint()  # a cancelled job (or one past its time limit) stops mid-file
        self.chars += count
        if self.chars > self.limit.chars:
            raise self.limit.refuse(self.name, self.limit.chars, "characters")

    def row(self, count: int = 1) -> None:
        self.rows += count
        if self.rows > self.limit.rows:
            raise self.limit.refuse(self.name, self.limit.rows, "rows")


def _open(path: Path, gz: bool, newline: str | None = None) -> TextIO:
    if gz:
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline=newline)
    return path.open(encoding="utf-8", errors="replace", newline=newline)


def _lines(stream: TextIO, tally: _Tally) -> Iterator[str]:
    """Lines, none read past the budget: a line longer than what is left is refused, not read."""
    while line := stream.readline(tally.left + 1):
        tally.read(len(line))
        yield line


def _whole(stream: TextIO, tally: _Tally) -> str:
    parts = []
    while chunk := stream.read(min(CHUNK, tally.left + 1)):
        tally.read(len(chunk))
        parts.append(chunk)
    return "".join(parts)


def _text_of(record, where: str, name: str) -> str:
    if not isinstance(record, dict) or "text" not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{name} has no 'text' field ({where}: {fields})")
    text = record["text"]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f"{name}: 'text' is {type(text).__name__}, not text ({where})")
    return text


def _json_lines(lines, tally: _Tally) -> list[str]:
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{tally.name} line {number} is not JSON ({err.msg})") from None
        tally.row()
        texts.append(_text_of(record, f"line {number}", tally.name))
    return texts


def _json(stream: TextIO, tally: _Tally) -> list[str]:
    """A .json file: one JSON list of records, or JSON lines (what ``datasets`` reads)."""
    text = _whole(stream, tally)
    if not text.lstrip().startswith("["):
        return _json_lines(text.splitlines(), tally)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{tally.name} is not JSON ({err.msg})") from None
    tally.row(len(records))
    return [_text_of(record, f"record {i}", tally.name) for i, record in enumerate(records)]


def _csv(stream: TextIO, tally: _Tally) -> list[str]:
    csv.field_size_limit(max(csv.field_size_limit(), tally.left + 1))  # lines are bounded by the tally
    reader = csv.DictReader(_lines(stream, tally))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise DataError(f"{tally.name} has no 'text' column (columns: {', '.join(reader.fieldnames or [])})")
    texts = []
    for row in reader:
        tally.row()
        texts.append(row["text"] or "")
    return texts


def _parquet(path: Path, tally: _Tally) -> list[str]:
    """Batches of rows; the text column as a dictionary, so repeated values (a few bytes on disk
    each, however long) are counted from the dictionary's lengths before any is decoded."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, read_dictionary=["text"])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{tally.name} is not a parquet file ({str(err)[:200]})") from None
    meta = file.metadata
    columns = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if "text" not in columns:
        raise DataError(f"{tally.name} has no 'text' column (columns: {', '.join(columns)})")
    kind = file.schema_arrow.field("text").type
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{tally.name}: the 'text' column holds {kind}, not text")
    tally.row(meta.num_rows)  # known before anything is read
    column = columns.index("text")
    stored = sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))
    if stored > 4 * tally.limit.chars + 4 * meta.num_rows:  # a character is at most 4 bytes
        raise tally.limit.refuse(tally.name, tally.limit.chars, "characters")
    texts: list[str] = []
    lengths: tuple[int, pa.Array] | None = None  # (dictionary address, its values' lengths)
    for batch in file.iter_batches(batch_size=PARQUET_BATCH, columns=["text"]):
        values = batch.column(0)
        offsets = values.dictionary.buffers()[1]
        address = offsets.address if offsets is not None else 0
        if lengths is None or lengths[0] != address:
            lengths = address, pc.utf8_length(values.dictionary)
        tally.read(pc.sum(pc.take(lengths[1], values.indices)).as_py() or 0)
        texts.extend(text or "" for text in values.to_pylist())
    return texts


def _suffix(path: Path) -> tuple[str, bool]:
    gz = path.suffix == ".gz"
    return (Path(path.stem).suffix if gz else path.suffix).lower(), gz


def load_file(path: str | Path, chars: int | None = None) -> TextSource:
    """A user's text: .txt/.md (whole file), .jsonl/.json (a "text" field), .csv (a "text" column),
    each optionally gzipped, or .parquet (a "text" column); at most ``chars`` characters
    (``budget``) decoded, read without ``datasets``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    suffix, gz = _suffix(path)
    if suffix not in SUFFIXES or (gz and suffix == ".parquet"):
        raise DataError(
            f"unsupported file type {''.join(path.suffixes[-2:])!r}; use .txt, .jsonl, .json, .csv "
            "(each may be gzipped) or .parquet"
        )
    tally = _Tally(path.name, budget(chars))
    try:
        if suffix == ".parquet":
            texts = _parquet(path, tally)
        else:
            with _open(path, gz, newline="" if suffix == ".csv" else None) as stream:
                if suffix == ".jsonl":
                    texts = _json_lines(_lines(stream, tally), tally)
                elif suffix == ".json":
                    texts = _json(stream, tally)
                elif suffix == ".csv":
                    texts = _csv(stream, tally)
                else:
                    texts = [_whole(stream, tally)]
    except (OSError, EOFError, zlib.error, csv.Error) as err:
        raise DataError(f"{path.name} could not be read ({type(err).__name__}: {str(err)[:200]})") from None
    return TextSource(texts, str(path))
