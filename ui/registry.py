"""The models the app offers, and what light handlers need to know about each loaded one without
touching it (its shape, size, tokenizer and info)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evaluation.lab import Lab
from runtime.models import HUB_DEFAULT_MODEL
from ui.recipes import ModelShape

OFFLINE_CHOICES = [
    ("SmolLM2-135M-Instruct (offline)", "smollm2-135m-instruct"),
    ("Gemma-3-270M (offline)", "gemma3-270m"),
]
HUB_CHOICES = [("SmolLM2-135M-Instruct (hub, safetensors)", HUB_DEFAULT_MODEL)]
HUB_MODELS = [
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "microsoft/phi-2",
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Meta-Llama-3-8B",
    "mistralai/Mistral-7B-v0.1",
]
MODEL_CHOICES = OFFLINE_CHOICES + HUB_CHOICES + [(name, name) for name in HUB_MODELS]
KNOWN_MODELS = 16  # the allow-list bounds it on a public host; this bounds it anywhere


@dataclass(frozen=True)
class ModelFacts:
    shape: ModelShape
    parameters: int
    tokenizer: Any
    info: dict  # ``Lab.model_info`` plus per-layer role counts and memory, no server paths


def facts(lab: Lab, dtype: str, device: str) -> ModelFacts:
    lm = lab.loaded
    counts = lm.roles.layer_param_counts(lm.model)
    shape = ModelShape(
        name=lm.name,
        roles=lm.roles.roles,
        num_layers=lm.roles.num_layers,
        layer_counts=counts,
        dtype=dtype,
        device=device,
    )
    info = {**lab.model_info(), "layer_role_parameters": counts, "memory": lab.memory()}
    info.pop("source", None)  # a server path
    return ModelFacts(shape, lm.num_parameters(), lm.tokenizer, info)
