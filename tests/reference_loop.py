"""The references' way of feeding a layer, by other means than the engine: full forward passes of
the model, one calibration sequence at a time, stopped after the layer, with hooks on its linears.
The earlier layers are already pruned, so each layer sees the pruned model's activations.
Also the references' data: C4 calibration windows and the WikiText-2 test text, transcribed."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class _Stop(Exception):
    pass


def linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def feed_layer(
    model: nn.Module, layer: nn.Module, ids: torch.Tensor, hooks: dict[nn.Module, Callable]
) -> None:
    """Run every sequence of ``ids`` (batch 1) up to the end of ``layer`` with ``hooks`` (module ->
    forward hook) in place."""

    def stop(*_):
        raise _Stop

    handles = [m.register_forward_hook(hook) for m, hook in hooks.items()]
    handles.append(layer.register_forward_hook(stop))
    try:
        for j in range(ids.shape[0]):
            try:
                model(ids[j : j + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


# ----- the references' data, transcribed (Wanda lib/data.py, lib/eval.py) --------------------------
def c4_texts(data_dir: Path) -> list[str]:
    """The train documents of the offline C4 shard, read here rather than through runtime.data."""
    path = data_dir / "c4" / "c4_en_train00000_first1000.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def wikitext2_test_text(data_dir: Path) -> str:
    """``"\\n\\n".join(testdata['text'])`` of WikiText-2 raw test, as the reference's eval joins it."""
    rows = (data_dir / "wikitext-2-raw-v1" / "test.jsonl").read_text().splitlines()
    return "\n\n".join(json.loads(line)["text"] for line in rows if line.strip())


def get_c4(traindata: list[str], nsamples: int, seed: int, seqlen: int, tokenizer) -> torch.Tensor:
    """Wanda's ``get_c4`` train loader: a random document until one is longer than seqlen, then a
    random window of it. Returns the stacked inputs (the targets are the inputs, masked)."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            trainenc = tokenizer(traindata[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        trainloader.append(trainenc.input_ids[:, i:j])
    return torch.cat(trainloader)
