"""Structured pruning on a loaded model: the units ``prune.structured`` chose really go.

``shrink`` puts smaller ``nn.Linear`` modules in place of q/k/v/o and gate/up/down (rows or columns
index-selected), drops whole decoder layers (renumbering ``layer_idx`` for the kv cache), and
updates the config (heads, kv heads, head_dim, intermediate size, layer count) and the role map,
so the model runs the smaller matrices and saves as a plain smaller model. It keeps every object
it replaced: ``Shrunk.undo`` puts the very same modules, lists and config values back, so the
dense model returns bitwise. Block influence (ShortGPT) is measured through the one layer loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prune.errors import RecipeError
from prune.progress import Event, Progress, silent
from prune.recipe import Recipe
from prune.roles import role_map
from prune.structured import Structure, head_scores, kept_channels, kept_heads, kept_layers, one_minus_cos
from runtime.models import LoadedModel
from runtime.stats import ActivationStats
from runtime.stream import layer_by_layer

# Families whose decoder layers are Llama's (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj),
# with heads read from the tensors' shapes and nothing else sized by the head count.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_MISSING = object()


class Shrunk:
    """Attributes a structured state replaced, with their old values, put back in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        self._saved.append((obj, name, getattr(obj, name, _MISSING)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._saved.clear()


def check_structured(lm: LoadedModel, recipe: Recipe) -> None:
    """Refuse what structured pruning cannot shrink here, before anything runs."""
    model_type = lm.roles.model_type
    if model_type not in FAMILIES:
        raise RecipeError(
            f"{recipe.structure} pruning supports the Llama family ({', '.join(FAMILIES)}); "
            f"{lm.name} is {model_type!r}"
        )
    if lm.stream is not None or len(set(getattr(lm.model, "hf_device_map", {}).values())) > 1:
        raise RecipeError(f"{recipe.structure} pruning needs the model held in memory on one device")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plan_channels(lm: LoadedModel, stats: ActivationStats, recipe: Recipe) -> Structure:
    """Per layer, the heads and MLP channels Wanda-sp keeps at the recipe's attn and mlp rates
    (scored on o_proj and down_proj with their inputs' squared column norms)."""
    model, roles, config = lm.model, lm.roles, lm.model.config
    attn, mlp = recipe.unit_rate("o"), recipe.unit_rate("down")
    q_heads, kv_heads, channels = {}, {}, {}
    for layer in range(roles.num_layers):
        o, down = roles.targets[(layer, "o")], roles.targets[(layer, "down")]
        if attn > 0:
            scores = head_scores(o.weight(model), stats.sq_norms[o.stats_key], _head_dim(config))
            q_heads[layer], kv_heads[layer] = kept_heads(
                scores, config.num_key_value_heads, attn, config.hidden_size
            )
        if mlp > 0:
            channels[layer] = kept_channels(down.weight(model), stats.sq_norms[down.stats_key], mlp)
    return Structure(q_heads, kv_heads, channels)


@torch.no_grad()
def block_influences(
    lm: LoadedModel, ids: torch.Tensor, batch_size: int, progress: Progress = silent
) -> list[float]:
    """ShortGPT's BI of every decoder layer: the mean over calibration tokens of 1 - cos between
    the layer's input and output hidden states, from one dense pass of the layer loop."""
    layers = lm.roles.layers(lm.model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)

    def visit(i: int) -> tuple[list, Callable[[], bool]]:
        def hook(_module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            distance = one_minus_cos(x, out[0] if isinstance(out, tuple) else out)
            sums[i] += float(distance.double().sum())
            counts[i] += distance.numel()

        return [layers[i].register_forward_hook(hook, with_kwargs=True)], lambda: False

    def on_layer(done: int, steps: int) -> None:
        progress(Event("statistics", done / steps, f"block influence: layer {done}/{steps}"))

    layer_by_layer(lm.model, lm.roles, ids, batch_size, lm.stream, visit, on_layer=on_layer)
    return [s / c for s, c in zip(sums, counts, strict=True)]


def plan_depth(influences: list[float], recipe: Recipe) -> Structure:
    return Structure(layers=kept_layers(influences, recipe.unit_rate("o")))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding these tensors (built on meta, so nothing is initialised)."""
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return module


def _rows(module: nn.Linear, index: torch.Tensor) -> nn.Linear:
    bias = module.bias.index_select(0, index) if module.bias is not None else None
    return _linear(module.weight.index_select(0, index), bias)


def _columns(module: nn.Linear, index: torch.Tensor) -> nn.Linear:
    bias = module.bias.detach().clone() if module.bias is not None else None
    return _linear(module.weight.index_select(1, index), bias)


def _head_rows(heads: tuple[int, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], device=device)


def _shrink_attention(undo: Shrunk, attn: nn.Module, q: tuple, kv: tuple, head_dim: int) -> None:
    device = attn.q_proj.weight.device
    q_rows, kv_rows = _head_rows(q, head_dim, device), _head_rows(kv, head_dim, device)
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        undo.set(attn, name, _rows(getattr(attn, name), rows))
    undo.set(attn, "o_proj", _columns(attn.o_proj, q_rows))
    undo.set(attn, "num_key_value_groups", len(q) // len(kv))


def _shrink_mlp(undo: Shrunk, mlp: nn.Module, channels: tuple) -> None:
    index = torch.tensor(channels, device=mlp.down_proj.weight.device)
    undo.set(mlp, "gate_proj", _rows(mlp.gate_proj, index))
    undo.set(mlp, "up_proj", _rows(mlp.up_proj, index))
    undo.set(mlp, "down_proj", _columns(mlp.down_proj, index))
    if hasattr(mlp, "intermediate_size"):
        undo.set(mlp, "intermediate_size", len(channels))


def shrink(lm: LoadedModel, structure: Structure) -> Shrunk:
    """Remove the units ``structure`` does not keep from ``lm`` in place; ``undo()`` reverses it."""
    model, config, undo = lm.model, lm.model.config, Shrunk()
    layers = lm.roles.layers(model)
    head_dim = _head_dim(config)
    try:
        for i, layer in enumerate(layers):
            if i in structure.q_heads:
                _shrink_attention(
                    undo, layer.self_attn, structure.q_heads[i], structure.kv_heads[i], head_dim
                )
            if i in structure.channels:
                _shrink_mlp(undo, layer.mlp, structure.channels[i])
        sizes = {"head_dim": head_dim}
        if structure.q_heads:
            first = next(iter(structure.q_heads))
            sizes["num_attention_heads"] = len(structure.q_heads[first])
            sizes["num_key_value_heads"] = len(structure.kv_heads[first])
        if structure.channels:
            sizes["intermediate_size"] = len(next(iter(structure.channels.values())))
        if structure.layers is not None:
            _drop_layers(undo, lm, structure.layers)
            sizes["num_hidden_layers"] = len(structure.layers)
            if getattr(config, "layer_types", None) is not None:
                sizes["layer_types"] = [config.layer_types[i] for i in structure.layers]
        for name, value in sizes.items():
            undo.set(config, name, value)
        undo.set(lm, "roles", role_map(model))
    except BaseException:
        undo.undo()
        raise
    return undo


def _drop_layers(undo: Shrunk, lm: LoadedModel, keep: tuple[int, ...]) -> None:
    """The decoder-layer list holds only ``keep``, renumbered for the kv cache."""
    parent_path, _, attr = lm.roles.layers_path.rpartition(".")
    parent = lm.model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    for new, old in enumerate(keep):
        undo.set(layers[old].self_attn, "layer_idx", new)
    undo.set(parent, attr, nn.ModuleList([layers[i] for i in keep]))
