"""Calibration token ids, sampled as the Wanda/SparseGPT reference does.

C4: ``nsamples`` random documents longer than ``seqlen`` tokens, a random window of each.
WikiText-2 / a file: random windows of the whole text. Generated: text sampled from the
model itself, so pruning needs no dataset at all.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from prune.errors import LabError
from prune.progress import checkpoint
from prune.recipe import CalibrationSpec
from runtime.data import DataError, TextSource, load_texts
from runtime.files import load_file
from runtime.stream import input_device


class CalibrationError(LabError):
    """Calibration data that cannot be had as asked."""


def _c4_windows(texts: list[str], tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """The reference's ``get_c4``: retry random documents until one is longer than seqlen."""
    random.seed(spec.seed)
    lengths: dict[int, torch.Tensor] = {}
    samples = []
    attempts = 0
    for _ in range(spec.nsamples):
        while True:
            attempts += 1
            checkpoint()  # a cancelled job (or one past its time limit) stops here
            if attempts > 200 * spec.nsamples + len(texts):
                raise CalibrationError(
                    f"too few C4 documents longer than {spec.seqlen} tokens for "
                    f"{spec.nsamples} samples; lower seqlen or nsamples"
                )
            i = random.randint(0, len(texts) - 1)
            if i not in lengths:
                lengths[i] = tokenizer(texts[i], return_tensors="pt").input_ids[0]
            ids = lengths[i]
            if ids.shape[0] > spec.seqlen:
                break
        start = random.randint(0, ids.shape[0] - spec.seqlen - 1)
        samples.append(ids[start : start + spec.seqlen])
    return torch.stack(samples)


def _stream_windows(ids: torch.Tensor, spec: CalibrationSpec, what: str) -> torch.Tensor:
    """The reference's ``get_wikitext2``: random windows of one long token stream."""
    if ids.shape[0] < spec.nsamples * spec.seqlen + 1:
        raise CalibrationError(
            f"{what} has {ids.shape[0]} tokens, too short for {spec.nsamples} x {spec.seqlen}; "
            "lower nsamples or seqlen, or use a longer text"
        )
    random.seed(spec.seed)
    samples = []
    for _ in range(spec.nsamples):
        checkpoint()
        start = random.randint(0, ids.shape[0] - spec.seqlen - 1)
        samples.append(ids[start : start + spec.seqlen])
    return torch.stack(samples)


def _cancel_criteria():
    """A stopping criterion that raises ``Cancelled`` when the job running this thread is cancelled."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CheckCancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            checkpoint()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CheckCancel()])


@torch.no_grad()
def _generated(model, tokenizer, spec: CalibrationSpec, batch_size: int) -> torch.Tensor:
    """Sample from the model itself, starting from BOS (or EOS when it has none)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    rows = []
    try:
        for first in range(0, spec.nsamples, batch_size):
            checkpoint()
            n = min(batch_size, spec.nsamples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt,
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                max_new_tokens=spec.seqlen - 1,
                min_new_tokens=spec.seqlen - 1,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                stopping_criteria=_cancel_criteria(),
            )
            rows.append(out[:, : spec.seqlen].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(rows)


def calibration_ids(spec: CalibrationSpec, tokenizer, model=None, batch_size: int = 8) -> torch.Tensor:
    """LongTensor (nsamples, seqlen) of calibration tokens; same spec and tokenizer, same ids."""
    try:
        if spec.source == "c4":
            return _c4_windows(load_texts("c4", "train").texts, tokenizer, spec)
        if spec.source == "wikitext2":
            source: TextSource = load_texts("wikitext2", "train")
            ids = tokenizer(" ".join(source.texts), return_tensors="pt").input_ids[0]
            return _stream_windows(ids, spec, "WikiText-2 train")
        if spec.source == "file":
            source = load_file(spec.path)
            ids = tokenizer("\n\n".join(source.texts), return_tensors="pt").input_ids[0]
            return _stream_windows(ids, spec, f"calibration file {spec.path}")
        if spec.source == "generated":
            if model is None:
                raise CalibrationError("generated calibration needs the model")
            return _generated(model, tokenizer, spec, batch_size)
    except DataError as err:
        raise CalibrationError(str(err)) from None
    raise CalibrationError(f"unknown calibration source {spec.source!r}")


def save_ids(ids: torch.Tensor, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({"input_ids": ids.contiguous()}, str(path))


def load_ids(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration ids file not found: {path}")
    try:
        ids = load_file(str(path))["input_ids"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CalibrationError(f"{path} is not a calibration ids file ({err})") from None
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise CalibrationError(f"{path}: expected an int64 (nsamples, seqlen) tensor")
    return ids
