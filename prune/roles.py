"""Module roles: the only place that knows what each architecture calls its linear layers.

Everything above this module speaks of seven roles. A role in one decoder layer maps to one
``Target``: a module, an optional slice of its output rows (Phi-3 and GPT-2 fuse q/k/v into one
matrix) and whether the stored weight is transposed (GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from prune.errors import LabError


class ModuleRole(str, Enum):
    q = "q"
    k = "k"
    v = "v"
    o = "o"
    gate = "gate"
    up = "up"
    down = "down"


ROLES: tuple[str, ...] = tuple(r.value for r in ModuleRole)
ATTENTION_ROLES: tuple[str, ...] = ("q", "k", "v", "o")
MLP_ROLES: tuple[str, ...] = ("gate", "up", "down")


class UnsupportedArchitecture(LabError):
    """A model whose module names this table does not know."""


@dataclass(frozen=True)
class Target:
    """One (out, in) block of a weight that a role owns."""

    module: str  # full name inside the model
    rows: tuple[int, int] | None = None  # [start, end) of output rows; None: all
    transposed: bool = False  # weight stored as (in, out), like GPT-2's Conv1D

    def weight(self, model: nn.Module) -> torch.Tensor:
        """A view of the target's weight as (out, in); in-place edits reach the model."""
        w = model.get_submodule(self.module).weight.data
        if self.transposed:
            w = w.t()
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


# A layout: where the decoder layers live, and for each role (module path inside a layer,
# a function of the config that gives the row slice or None, transposed).
RowFn = Callable[[object], tuple[int, int] | None]
Layout = tuple[str, dict[str, tuple[str, RowFn | None, bool]]]


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _phi3_rows(role: str) -> RowFn:
    def rows(cfg):
        q = cfg.num_attention_heads * _head_dim(cfg)
        kv = cfg.num_key_value_heads * _head_dim(cfg)
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[role]

    return rows


def _thirds(index: int) -> RowFn:
    return lambda cfg: (index * cfg.hidden_size, (index + 1) * cfg.hidden_size)


def _halves(index: int) -> RowFn:
    return lambda cfg: (index * cfg.intermediate_size, (index + 1) * cfg.intermediate_size)


_LLAMA: Layout = (
    "model.layers",
    {
        "q": ("self_attn.q_proj", None, False),
        "k": ("self_attn.k_proj", None, False),
        "v": ("self_attn.v_proj", None, False),
        "o": ("self_attn.o_proj", None, False),
        "gate": ("mlp.gate_proj", None, False),
        "up": ("mlp.up_proj", None, False),
        "down": ("mlp.down_proj", None, False),
    },
)
_PHI: Layout = (
    "model.layers",
    {
        "q": ("self_attn.q_proj", None, False),
        "k": ("self_attn.k_proj", None, False),
        "v": ("self_attn.v_proj", None, False),
        "o": ("self_attn.dense", None, False),
        "up": ("mlp.fc1", None, False),
        "down": ("mlp.fc2", None, False),
    },
)
_PHI3: Layout = (
    "model.layers",
    {
        "q": ("self_attn.qkv_proj", _phi3_rows("q"), False),
        "k": ("self_attn.qkv_proj", _phi3_rows("k"), False),
        "v": ("self_attn.qkv_proj", _phi3_rows("v"), False),
        "o": ("self_attn.o_proj", None, False),
        "gate": ("mlp.gate_up_proj", _halves(0), False),
        "up": ("mlp.gate_up_proj", _halves(1), False),
        "down": ("mlp.down_proj", None, False),
    },
)
_GPT2: Layout = (
    "transformer.h",
    {
        "q": ("attn.c_attn", _thirds(0), True),
        "k": ("attn.c_attn", _thirds(1), True),
        "v": ("attn.c_attn", _thirds(2), True),
        "o": ("attn.c_proj", None, True),
        "up": ("mlp.c_fc", None, True),
        "down": ("mlp.c_proj", None, True),
    },
)
_OPT: Layout = (
    "model.decoder.layers",
    {
        "q": ("self_attn.q_proj", None, False),
        "k": ("self_attn.k_proj", None, False),
        "v": ("self_attn.v_proj", None, False),
        "o": ("self_attn.out_proj", None, False),
        "up": ("fc1", None, False),
        "down": ("fc2", None, False),
    },
)

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi": _PHI,
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "opt": _OPT,
}


@dataclass
class RoleMap:
    """Where each (layer, role) lives in one loaded model."""

    model_type: str
    layers_path: str
    num_layers: int
    roles: tuple[str, ...]  # the roles this architecture has, in canonical order
    targets: dict[tuple[int, str], Target]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def modules_in_layer(self, layer: int) -> list[str]:
        """Names of the distinct modules that hold this layer's roles (fused ones once)."""
        return list(dict.fromkeys(self.targets[(layer, role)].module for role in self.roles))

    def items(self) -> Iterator[tuple[int, str, Target]]:
        for layer in range(self.num_layers):
            for role in self.roles:
                yield layer, role, self.targets[(layer, role)]

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Weights per role over all layers: what "pruned weights" is counted against."""
        counts = dict.fromkeys(self.roles, 0)
        for _, role, target in self.items():
            counts[role] += target.weight(model).numel()
        return counts

    def layer_param_counts(self, model: nn.Module) -> dict[str, int]:
        """Weights per role in one layer (layers are identical in the supported families)."""
        return {role: self.targets[(0, role)].weight(model).numel() for role in self.roles}

    def shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(out, in) of each role's matrix in one layer."""
        return {role: tuple(self.targets[(0, role)].weight(model).shape) for role in self.roles}


def role_map(model: nn.Module) -> RoleMap:
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in LAYOUTS:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}"
        )
    layers_path, table = LAYOUTS[model_type]
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = len(model.get_submodule(layers_path))
    targets: dict[tuple[int, str], Target] = {}
    for layer in range(num_layers):
        for role, (path, rows_fn, transposed) in table.items():
            rows = rows_fn(text_config) if rows_fn else None
            targets[(layer, role)] = Target(f"{layers_path}.{layer}.{path}", rows, transposed)
    roles = tuple(r for r in ROLES if r in table)
    return RoleMap(model_type, layers_path, num_layers, roles, targets)
