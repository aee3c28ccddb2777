"""Module roles: the only place that knows what each architecture calls its linear layers.

Everything above this module speaks of seven roles. A role in one decoder layer maps to one
``Target``: a parameter (a linear's ``weight``, or a mixture-of-experts module's fused 3D
``gate_up_proj`` / ``down_proj``) and how to view the role's part of it. ``Target.weight`` is an
in-place-editable view whose last dimension is the input dimension and whose leading dimensions
flatten to output rows: 2D for a plain linear, (heads, head_dim, in) for GPT-NeoX's interleaved
q/k/v, (experts, rows, in) for an MoE role. Masks are 2D: (rows, in) of that view, flattened.

A role that lives in two matrices at once (Qwen2-MoE: the routed experts and the shared expert)
is one ``Target`` with ``parts``; its mask is the parts' masks concatenated (by rows when the
parts have the same width, else as one row).

Architectures are looked up by ``model_type``; an unknown type whose decoder layers use Llama's
module names (SmolLM3, OLMo2, Granite, ...) is accepted with a note that says so.
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
# Roles whose linears read the very same input tensor, so one SparseGPT Hessian serves them: q, k and
# v read the attention's input, gate and up the MLP's (parallel attention + MLP, as in Phi and Falcon,
# read one tensor too but share nothing here). The collector (runtime.stats) and the memory plan read
# this; tests/test_memory.py checks it against the tensors each family really passes.
HESSIAN_GROUP: dict[str, str] = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "o": "o",
    "gate": "mlp",
    "up": "mlp",
    "down": "down",
}


class UnsupportedArchitecture(LabError):
    """A model whose module names this table does not know."""


View = Callable[[torch.Tensor], torch.Tensor]  # (out, in) parameter -> the role's view (..., in)


@dataclass(frozen=True)
class Target:
    """One role's block of a weight in one layer."""

    module: str  # full name inside the model
    rows: tuple[int, int] | None = None  # [start, end) of output rows; None: all
    transposed: bool = False  # weight stored as (in, out), like GPT-2's Conv1D
    param: str = "weight"  # the parameter of ``module`` (MoE experts: gate_up_proj, down_proj)
    view: View | None = None  # a view of the (out, in) parameter (interleaved heads, experts)
    experts: int = 0  # > 0: the view's first dimension is the expert; statistics are per expert
    parts: tuple[Target, ...] = ()  # a role held by several matrices (Qwen2-MoE's shared expert)

    @property
    def name(self) -> str:
        """The parameter's full name."""
        return f"{self.module}.{self.param}"

    @property
    def stats_key(self) -> str:
        """Where this target's input statistics are kept: the module for a linear, the parameter
        for fused experts (gate_up_proj and down_proj read different inputs)."""
        return self.module if self.param == "weight" else self.name

    def weight(self, model: nn.Module) -> torch.Tensor:
        """A view of the target's weight, input dimension last; in-place edits reach the model."""
        if self.parts:
            raise TypeError(f"{self.module}: this role spans {len(self.parts)} matrices; use views()")
        w = getattr(model.get_submodule(self.module), self.param).data
        if self.transposed:
            w = w.t()
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        return self.view(w) if self.view is not None else w

    def pieces(self) -> tuple[Target, ...]:
        """The single-matrix targets this role is made of (itself, unless it has parts)."""
        return self.parts or (self,)

    def views(self, model: nn.Module) -> list[torch.Tensor]:
        return [part.weight(model) for part in self.pieces()]

    def numel(self, model: nn.Module) -> int:
        return sum(v.numel() for v in self.views(model))

    def param_names(self) -> list[str]:
        return [part.name for part in self.pieces()]

    def shape(self, model: nn.Module) -> tuple[int, int]:
        """(rows, in) of the role's 2D mask: the view's leading dimensions flattened (every
        expert's rows); for parts of different widths (Qwen2-MoE's down), the first part's width
        and the rows that make up the same number of weights."""
        views = self.views(model)
        width = views[0].shape[-1]
        return sum(v.numel() for v in views) // width, width


# ----- how a role is found inside one decoder layer ------------------------------------------------
RowFn = Callable[[object], tuple[int, int] | None]
ViewFn = Callable[[object], View]  # config -> view


@dataclass(frozen=True)
class Linear:
    """A role held by a linear (or Conv1D) layer, or by some of its rows."""

    path: str
    rows: RowFn | None = None
    transposed: bool = False
    view: ViewFn | None = None

    def find(self, layer: nn.Module, prefix: str, cfg) -> Target | None:
        module = _submodule(layer, self.path)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            return None
        rows = self.rows(cfg) if self.rows else None
        view = self.view(cfg) if self.view else None
        return Target(f"{prefix}.{self.path}", rows, self.transposed, view=view)


@dataclass(frozen=True)
class Experts:
    """gate, up or down of every routed expert at once: transformers' fused 3D expert weights,
    ``gate_up_proj`` (E, 2I, H) with the gate rows first and ``down_proj`` (E, H, I)."""

    path: str
    which: str  # gate | up | down

    def find(self, layer: nn.Module, prefix: str, cfg) -> Target | None:
        module = _submodule(layer, self.path)
        if module is None or not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
            return None
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
            raise UnsupportedArchitecture(f"{prefix}.{self.path}: transposed or biased experts")
        experts = module.gate_up_proj.shape[0]
        if self.which == "down":
            return Target(f"{prefix}.{self.path}", param="down_proj", experts=experts)
        half = module.gate_up_proj.shape[1] // 2
        index = 0 if self.which == "gate" else 1
        if getattr(module, "is_concatenated", True):  # [gate; up]

            def view(w, start=index * half):
                return w[:, start : start + half]
        else:  # [gate0, up0, gate1, up1, ...]

            def view(w, index=index):
                return w[:, index::2]

        return Target(f"{prefix}.{self.path}", param="gate_up_proj", view=view, experts=experts)


@dataclass(frozen=True)
class Both:
    """A role held by several matrices at once (routed experts plus a shared expert)."""

    specs: tuple

    def find(self, layer: nn.Module, prefix: str, cfg) -> Target | None:
        parts = [spec.find(layer, prefix, cfg) for spec in self.specs]
        if any(p is None for p in parts):
            return None
        return Target(parts[0].module, parts=tuple(parts))


def _submodule(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


# A layout: where the decoder layers live, and for each role the ways it may be held in a layer,
# tried in order (Qwen MoE models mix dense and expert layers).
Layout = tuple[str, dict[str, tuple]]


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


def _per_head(index: int) -> ViewFn:
    """q, k or v of a fused matrix whose rows are (heads, 3, head_dim): GPT-NeoX, Falcon (classic)."""

    def view_for(cfg) -> View:
        heads = cfg.num_attention_heads
        return lambda w: w.view(heads, 3, -1, w.shape[-1])[:, index]

    return view_for


def _falcon_qkv(role: str) -> Linear:
    """Falcon's ``query_key_value``, as ``FalconAttention._split_heads`` reads it."""
    index = "qkv".index(role)

    def rows(cfg):
        if cfg.new_decoder_architecture or not cfg.multi_query:
            return None
        hidden, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
        return [(0, hidden), (hidden, hidden + hd), (hidden + hd, hidden + 2 * hd)][index]

    def view_for(cfg) -> View | None:
        if cfg.new_decoder_architecture:  # (kv heads, q per kv + 2, head_dim): q..., k, v per group
            group = cfg.num_attention_heads // cfg.num_kv_heads + 2
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            pick = [slice(0, group - 2), group - 2, group - 1][index]
            return lambda w: w.view(-1, group, head_dim, w.shape[-1])[:, pick]
        if cfg.multi_query:  # q rows, then one k head, then one v head: plain row slices
            return None
        return _per_head(index)(cfg)

    return Linear("self_attention.query_key_value", rows=rows, view=view_for)


def _llama_roles(mlp: str = "mlp") -> dict[str, tuple]:
    return {
        "q": (Linear("self_attn.q_proj"),),
        "k": (Linear("self_attn.k_proj"),),
        "v": (Linear("self_attn.v_proj"),),
        "o": (Linear("self_attn.o_proj"),),
        "gate": (Linear(f"{mlp}.gate_proj"),),
        "up": (Linear(f"{mlp}.up_proj"),),
        "down": (Linear(f"{mlp}.down_proj"),),
    }


def _moe_roles(shared: bool = False) -> dict[str, tuple]:
    """Llama attention; an MLP that is fused experts (plus a shared expert) or, in the layers that
    have no experts (Qwen's ``mlp_only_layers``, ``decoder_sparse_step``), a plain MLP."""
    roles = _llama_roles()
    for role in MLP_ROLES:
        experts = Experts("mlp.experts", role)
        dense = Linear(f"mlp.{role}_proj")
        if shared:
            roles[role] = (Both((experts, Linear(f"mlp.shared_expert.{role}_proj"))), experts, dense)
        else:
            roles[role] = (experts, dense)
    return roles


_LLAMA: Layout = ("model.layers", _llama_roles())
_PHI: Layout = (
    "model.layers",
    {
        "q": (Linear("self_attn.q_proj"),),
        "k": (Linear("self_attn.k_proj"),),
        "v": (Linear("self_attn.v_proj"),),
        "o": (Linear("self_attn.dense"),),
        "up": (Linear("mlp.fc1"),),
        "down": (Linear("mlp.fc2"),),
    },
)
_PHI3: Layout = (
    "model.layers",
    {
        "q": (Linear("self_attn.qkv_proj", _phi3_rows("q")),),
        "k": (Linear("self_attn.qkv_proj", _phi3_rows("k")),),
        "v": (Linear("self_attn.qkv_proj", _phi3_rows("v")),),
        "o": (Linear("self_attn.o_proj"),),
        "gate": (Linear("mlp.gate_up_proj", _halves(0)),),
        "up": (Linear("mlp.gate_up_proj", _halves(1)),),
        "down": (Linear("mlp.down_proj"),),
    },
)
_GPT2: Layout = (
    "transformer.h",
    {
        "q": (Linear("attn.c_attn", _thirds(0), True),),
        "k": (Linear("attn.c_attn", _thirds(1), True),),
        "v": (Linear("attn.c_attn", _thirds(2), True),),
        "o": (Linear("attn.c_proj", None, True),),
        "up": (Linear("mlp.c_fc", None, True),),
        "down": (Linear("mlp.c_proj", None, True),),
    },
)
_OPT: Layout = (
    "model.decoder.layers",
    {
        "q": (Linear("self_attn.q_proj"),),
        "k": (Linear("self_attn.k_proj"),),
        "v": (Linear("self_attn.v_proj"),),
        "o": (Linear("self_attn.out_proj"),),
        "up": (Linear("fc1"),),
        "down": (Linear("fc2"),),
    },
)
_GPT_NEOX: Layout = (
    "gpt_neox.layers",
    {
        "q": (Linear("attention.query_key_value", view=_per_head(0)),),
        "k": (Linear("attention.query_key_value", view=_per_head(1)),),
        "v": (Linear("attention.query_key_value", view=_per_head(2)),),
        "o": (Linear("attention.dense"),),
        "up": (Linear("mlp.dense_h_to_4h"),),
        "down": (Linear("mlp.dense_4h_to_h"),),
    },
)
_FALCON: Layout = (
    "transformer.h",
    {
        "q": (_falcon_qkv("q"),),
        "k": (_falcon_qkv("k"),),
        "v": (_falcon_qkv("v"),),
        "o": (Linear("self_attention.dense"),),
        "up": (Linear("mlp.dense_h_to_4h"),),
        "down": (Linear("mlp.dense_4h_to_h"),),
    },
)
_MOE: Layout = ("model.layers", _moe_roles())
_MOE_SHARED: Layout = ("model.layers", _moe_roles(shared=True))

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
    "gpt_neox": _GPT_NEOX,
    "falcon": _FALCON,
    "mixtral": _MOE,
    "olmoe": _MOE,
    "qwen3_moe": _MOE,
    "qwen2_moe": _MOE_SHARED,
}


@dataclass
class RoleMap:
    """Where each (layer, role) lives in one loaded model."""

    model_type: str
    layers_path: str
    num_layers: int
    roles: tuple[str, ...]  # the roles this architecture has, in canonical order
    targets: dict[tuple[int, str], Target]
    note: str | None = None  # e.g. roles found by module names for a model_type not in the table

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def _pieces(self, layer: int) -> list[Target]:
        return [p for role in self.roles for p in self.targets[(layer, role)].pieces()]

    def modules_in_layer(self, layer: int) -> list[str]:
        """Names of the distinct linear modules that hold this layer's roles (fused ones once);
        fused experts are in ``experts_in_layer``."""
        return list(dict.fromkeys(p.module for p in self._pieces(layer) if not p.experts))

    def experts_in_layer(self, layer: int) -> list[str]:
        """Names of this layer's fused-experts modules (their statistics are per expert)."""
        return list(dict.fromkeys(p.module for p in self._pieces(layer) if p.experts))

    def hessian_owners(self, layer: int) -> dict[str, str]:
        """Each linear of this layer (its ``stats_key``) -> the linear whose Hessian it shares, by
        ``HESSIAN_GROUP`` (the first of its group; itself when alone); fused experts have none."""
        first: dict[str, str] = {}
        return {
            piece.stats_key: first.setdefault(HESSIAN_GROUP[role], piece.stats_key)
            for role in self.roles
            for piece in self.targets[(layer, role)].pieces()
            if not piece.experts
        }

    def params_in_layer(self, layer: int) -> list[str]:
        """Full names of the distinct parameters that hold this layer's roles."""
        return list(dict.fromkeys(p.name for p in self._pieces(layer)))

    def items(self) -> Iterator[tuple[int, str, Target]]:
        for layer in range(self.num_layers):
            for role in self.roles:
                yield layer, role, self.targets[(layer, role)]

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Weights per role over all layers: what "pruned weights" is counted against."""
        counts = dict.fromkeys(self.roles, 0)
        for _, role, target in self.items():
            counts[role] += target.numel(model)
        return counts

    def layer_param_counts(self, model: nn.Module, layer: int = 0) -> dict[str, int]:
        """Weights per role in one layer (layer 0 unless asked: MoE models may mix dense and
        expert layers)."""
        return {role: self.targets[(layer, role)].numel(model) for role in self.roles}

    def shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """(rows, in) of each role's matrix in layer 0 (every expert's rows counted)."""
        return {role: self.targets[(0, role)].shape(model) for role in self.roles}


def role_map(model: nn.Module) -> RoleMap:
    config = model.config
    model_type = getattr(config, "model_type", "?")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    note = None
    if model_type in LAYOUTS:
        layers_path, table = LAYOUTS[model_type]
    else:
        layers_path, table = _by_module_names(model, text_config, model_type)
        note = f"roles found by module names: model_type {model_type!r} is not in the table"
    layer_list = model.get_submodule(layers_path)
    targets: dict[tuple[int, str], Target] = {}
    for layer, module in enumerate(layer_list):
        prefix = f"{layers_path}.{layer}"
        for role, specs in table.items():
            found = next((t for spec in specs if (t := spec.find(module, prefix, text_config))), None)
            if found is None:
                raise UnsupportedArchitecture(f"{model_type}: no {role} role found in {prefix}")
            targets[(layer, role)] = found
    roles = tuple(r for r in ROLES if r in table)
    return RoleMap(model_type, layers_path, len(layer_list), roles, targets, note)


def _by_module_names(model: nn.Module, cfg, model_type: str) -> Layout:
    """An unknown model_type whose decoder layers have Llama's names (self_attn.q_proj, ...,
    mlp.down_proj) in every layer: the decoder layers are the ModuleList of num_hidden_layers."""
    count = getattr(cfg, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            table = _llama_roles()
            specs = [spec for alternatives in table.values() for spec in alternatives]
            if all(spec.find(layer, name, cfg) for layer in module for spec in specs):
                return name, table
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} is not supported (and its layers do not use Llama's module "
        f"names); supported: {', '.join(sorted(LAYOUTS))}"
    )
