"""Perplexity with the Wanda/SparseGPT protocol.

WikiText-2: the test rows joined with "\\n\\n"; C4: the first 1100 validation documents joined
with " ", cut to 256 x seqlen tokens. Non-overlapping windows of seqlen tokens; each window's
mean loss is weighted by seqlen; perplexity is exp of the mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prune.errors import LabError
from prune.progress import Event, Progress, checkpoint, silent
from runtime.cache import LRU
from runtime.data import TextSource, load_texts
from runtime.files import load_file
from runtime.models import LoadedModel
from runtime.stream import model_logits


class EvaluationError(LabError):
    """An evaluation that cannot run as asked (too little text, an empty file)."""


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    windows: int
    seqlen: int
    tokens: int
    seconds: float
    tokens_per_s: float
    description: str
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_label(dataset: str) -> str:
    """What people see for a dataset: its alias, or a file's name (never a server path)."""
    return dataset if dataset in ("wikitext2", "c4") else Path(dataset).name


def _text_for(dataset: str) -> tuple[str, TextSource]:
    if dataset == "wikitext2":
        source = load_texts("wikitext2", "test")
        return "\n\n".join(source.texts), source
    if dataset == "c4":
        source = load_texts("c4", "validation")
        return " ".join(source.texts[:1100]), source
    source = load_file(dataset)
    return "\n\n".join(source.texts), source


_ENCODED = LRU(entries=8)  # (dataset, tokenizer) -> (token ids, source)


def encoded(tokenizer, dataset: str) -> tuple[torch.Tensor, TextSource]:
    """Token ids of a dataset (memoized per tokenizer: WikiText-2 takes seconds to tokenize)."""
    key = (dataset, tokenizer)
    hit = _ENCODED.get(key)
    if hit is None:
        text, source = _text_for(dataset)
        if not text.strip():
            raise EvaluationError(f"{dataset_label(dataset)}: the text is empty")
        hit = _ENCODED[key] = (tokenizer(text, return_tensors="pt").input_ids, source)
    return hit


def forget(dataset: str) -> None:
    """Drop what is memoized of ``dataset`` (an expired session's upload)."""
    for key in _ENCODED:
        if key[0] == dataset:
            _ENCODED.pop(key)


def _logits(
    model: LoadedModel | nn.Module, windows: torch.Tensor, batch_size: int, progress: Progress
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``logits_of(k, inputs)`` for the k-th batch of windows, wherever the model lives."""
    if not isinstance(model, LoadedModel):
        return model_logits(model)

    def on_layer(done: int, steps: int) -> None:
        progress(Event("perplexity", 0.0, f"streamed pass: layer {done}/{steps}", step=done, steps=steps))

    return model.window_logits(windows, batch_size, on_layer)


@torch.no_grad()
def perplexity(
    model: LoadedModel | nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: Progress = silent,
    which: str | None = None,
) -> PerplexityResult:
    """``dataset``: "wikitext2", "c4", or a path to a .txt/.jsonl/.parquet file. Every window
    reports an Event with the running perplexity; ``which`` ("dense"/"pruned") labels them.
    ``model``: a loaded model on any placement (a streamed one runs layer by layer over all windows
    first, same floats), or a plain module (a quantized copy)."""
    ids, source = encoded(tokenizer, dataset)
    if dataset == "c4":
        ids = ids[:, : 256 * seqlen]
    total = ids.numel() // seqlen
    if total == 0:
        raise EvaluationError(f"{dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = min(total, max_windows) if max_windows else total
    label = dataset_label(dataset)
    nll_sum, start = 0.0, time.perf_counter()
    logits_of = _logits(model, ids[:, : windows * seqlen].reshape(windows, seqlen), batch_size, progress)
    for k, first in enumerate(range(0, windows, batch_size)):
        checkpoint()  # cancel and the time limit hold whatever ``progress`` does
        last = min(first + batch_size, windows)
        inputs = ids[:, first * seqlen : last * seqlen].reshape(last - first, seqlen)
        logits = logits_of(k, inputs)
        loss = F.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
            inputs[:, 1:].reshape(-1).to(logits.device),
        )
        nll_sum += loss.float().item() * seqlen * (last - first)
        running = math.exp(nll_sum / (last * seqlen))
        message = f"{label}{' ' + which if which else ''}: window {last}/{windows}, perplexity {running:.2f}"
        progress(Event("perplexity", last / windows, message, label, which, last, windows, running))
    seconds = time.perf_counter() - start
    name = dataset if dataset in ("wikitext2", "c4") else "file"
    return PerplexityResult(
        name,
        math.exp(nll_sum / (windows * seqlen)),
        windows,
        seqlen,
        windows * seqlen,
        seconds,
        windows * seqlen / seconds if seconds else 0.0,
        source.description,
        source.note,
    )
