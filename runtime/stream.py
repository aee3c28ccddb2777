"""Running a model one decoder layer at a time, over every calibration or evaluation window.

This is how the Wanda and SparseGPT references prune models far bigger than the GPU: the inputs of
the first layer are caught once, then each layer runs over all windows and its outputs become the
next layer's inputs. ``layer_by_layer`` is the one loop that does it: sequential pruning
(runtime/stats.py) uses it on any model; a *streamed* model (``LayerStream``) uses it for every
pass (statistics, perplexity), because only one decoder layer's weights are on the compute device
at a time. Code that reads weights goes through ``LoadedModel.layer`` (runtime/models.py), never
through the stream.

A streamed model's decoder-layer weights wait in a store (CPU memory, or read lazily from the
checkpoint's safetensors on disk) and stay dense there: the store is the dense snapshot, so pruning
is reversible for free. A layer comes to the compute device for its turn with the current pruned
state (masks, and the weights a method rewrote) applied, and goes back to "meta" after. Everything
outside the layers (embeddings, final norm, head) stays on the compute device. A plain call of the
model works too (generation, lm-eval): each layer is brought in for its own forward, which is slow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prune.progress import checkpoint
from prune.roles import RoleMap
from runtime.apply import Masks, Values, apply_masks

Call = tuple[tuple, dict]  # one batch's (args, kwargs) of a decoder layer call


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embeddings' device (the layers of a streamed model are meta)."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def layer_calls(model: nn.Module, roles: RoleMap, ids: torch.Tensor, batch_size: int) -> list[list[Call]]:
    """Per decoder layer, per batch: the arguments the model calls it with (the references'
    ``Catcher``, for every layer: masks and position embeddings can differ by layer, as in
    Gemma-3's sliding-window and global layers). One pass in which every layer only records its
    call; hidden states past the first layer are placeholders, replaced as the layers run."""
    layers = roles.layers(model)
    calls: list[list[Call]] = [[] for _ in layers]

    def recorder(i: int) -> Callable:
        def forward(*args, **kwargs):
            calls[i].append((args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return hidden_of((args, kwargs))

        return forward

    with swapped_forwards(layers, [recorder(i) for i in range(len(layers))]):
        for chunk in ids.split(batch_size):
            checkpoint()
            try:
                model(chunk.to(input_device(model)), use_cache=False)
            except _Stop:
                pass
    return calls


@contextmanager
def swapped_forwards(layers: nn.ModuleList, forwards: list[Callable]) -> Iterator[None]:
    """Each layer's ``forward`` replaced for the block (its attributes, e.g. ``attention_type``,
    stay what the model's own forward reads), then put back as it was."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer, forward in zip(layers, forwards, strict=True):
        layer.forward = forward
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def run_layer(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    """The layer's hidden-state output, and what else it returned (kept to replay its output)."""
    checkpoint()  # a cancelled job (or one past its time limit) stops between batches
    out = layer(*args, **kwargs)
    return (out[0], tuple(out[1:])) if isinstance(out, tuple) else (out, None)


def with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(call: Call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


class LayerStream:
    """The decoder layers of ``model`` live in ``store`` (full parameter name -> dense tensor, read
    on demand) and come to ``device`` one at a time with the pruned state applied.

    ``hidden_device`` is where every window's hidden states wait between layers in layer-by-layer
    passes: the compute device when they fit, the CPU when not (the memory plan decides)."""

    def __init__(
        self,
        model: nn.Module,
        roles: RoleMap,
        device: torch.device,
        store: Mapping[str, torch.Tensor],
        store_kind: str,
        hidden_device: torch.device,
    ):
        self.model, self.roles, self.device = model, roles, device
        self.store, self.store_kind, self.hidden_device = store, store_kind, hidden_device
        self.masks: Masks = {}
        self.values: Values = {}
        self._resident: set[int] = set()
        self._slots: dict[int, list[tuple[nn.Module, str, str, bool]]] = {}
        for i, layer in enumerate(roles.layers(model)):
            prefix = f"{roles.layers_path}.{i}."
            slots = [
                (m, n, prefix + f"{name}.{n}".lstrip("."), True)
                for name, m in layer.named_modules()
                for n, p in m.named_parameters(recurse=False)
                if p.is_meta
            ]
            slots += [
                (m, n, prefix + f"{name}.{n}".lstrip("."), False)
                for name, m in layer.named_modules()
                for n, b in m.named_buffers(recurse=False)
                if b.is_meta
            ]
            self._slots[i] = slots
            layer.forward = functools.partial(self._streamed_forward, i, layer.forward)

    def set_state(self, masks: Masks, values: Values) -> None:
        """What the next uploads apply (the Pruner's current masks and rewritten weights)."""
        self.masks, self.values = masks, values

    def _streamed_forward(self, layer: int, forward: Callable, *args, **kwargs):
        with self.resident(layer):
            return forward(*args, **kwargs)

    @contextmanager
    def resident(self, layer: int) -> Iterator[None]:
        """Layer ``layer``'s weights on the compute device, pruned as the current state says."""
        if layer in self._resident:
            yield
            return
        self._upload(layer)
        try:
            yield
        finally:
            self._offload(layer)

    def _upload(self, layer: int) -> None:
        for module, attr, name, is_param in self._slots[layer]:
            tensor = self.store[name].to(self.device, copy=True)  # the store stays dense
            if is_param:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        self._resident.add(layer)
        keys = [key for key in self.masks if key[0] == layer]
        if keys:
            values = {key: self.values[key] for key in keys if key in self.values}
            apply_masks(self.model, self.roles, {key: self.masks[key] for key in keys}, values)

    def _offload(self, layer: int) -> None:
        for module, attr, _name, is_param in self._slots[layer]:
            current = module._parameters[attr] if is_param else module._buffers[attr]
            empty = torch.empty_like(current, device="meta")
            if is_param:
                module._parameters[attr] = nn.Parameter(empty, requires_grad=False)
            else:
                module._buffers[attr] = empty
        self._resident.discard(layer)

    def layer_bytes(self) -> int:
        """The largest decoder layer's weights, what the compute device holds at a time."""
        return max(
            sum(m.get_parameter(a).nbytes if p else m.get_buffer(a).nbytes for m, a, _n, p in slots)
            for slots in self._slots.values()
        )


def on_device(stream: LayerStream | None, layer: int) -> AbstractContextManager:
    """A block in which layer ``layer``'s weights are real on the compute device, with the current
    pruned state applied (a model held in memory: always, so the block does nothing)."""
    return stream.resident(layer) if stream is not None else nullcontext()


Visit = Callable[[int], tuple[list[RemovableHandle], Callable[[], bool]]]


@torch.no_grad()
def layer_by_layer(
    model: nn.Module,
    roles: RoleMap,
    ids: torch.Tensor,
    batch_size: int,
    stream: LayerStream | None,
    visit: Visit | None = None,
    last_layer: int | None = None,
    on_layer: Callable[[int, int], None] = lambda done, steps: None,
) -> tuple[list[Call], list]:
    """THE layer-by-layer loop: every batch of ``ids`` through decoder layer 0, then all through
    layer 1, and so on (the Wanda and SparseGPT references' procedure; a streamed model's every
    pass). Same float operations, per batch, as calling the whole model.

    ``visit(i)`` puts hooks on layer i (statistics) and returns them with what to do once the layer
    has run over every batch and the hooks are gone (prune it); when that returns True the layer
    runs again, so the next layer gets the pruned layer's outputs. Layers after ``last_layer`` are
    not visited. Returns the last visited layer's calls, with its outputs as hidden states, and what
    else it returned per batch."""
    calls = layer_calls(model, roles, ids, batch_size)
    hidden = [hidden_of(call) for call in calls[0]]
    layers = roles.layers(model)
    last = len(layers) - 1 if last_layer is None else last_layer
    hidden_device = stream.hidden_device if stream is not None else None
    extras: list = []
    for i, layer in enumerate(layers[: last + 1]):
        with on_device(stream, i):
            inputs = []
            for call, states in zip(calls[i], hidden, strict=True):
                device = next((p.device for p in layer.parameters()), states.device)
                inputs.append(with_hidden(call, states.to(device)))
            handles, after = visit(i) if visit is not None else ([], lambda: False)
            try:
                outs = [run_layer(layer, *call) for call in inputs]
            finally:
                for handle in handles:
                    handle.remove()
            if after():
                outs = [run_layer(layer, *call) for call in inputs]
        hidden = [out.to(hidden_device or out.device) for out, _ in outs]
        extras = [extra for _, extra in outs]
        on_layer(i + 1, last + 1)
    return [with_hidden(call, states) for call, states in zip(calls[last], hidden, strict=True)], extras


def window_logits(
    model: nn.Module,
    roles: RoleMap,
    windows: torch.Tensor,
    batch_size: int,
    stream: LayerStream | None,
    on_layer: Callable[[int, int], None],
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``logits_of(k, inputs)`` for the k-th batch of ``windows``: one model call, or, streamed, the
    head over the k-th batch's last hidden states after one layer-by-layer pass of every batch."""
    if stream is None:
        return model_logits(model)
    device = input_device(model)
    calls, extras = layer_by_layer(model, roles, windows, batch_size, stream, on_layer=on_layer)

    def logits_of(k: int, inputs: torch.Tensor) -> torch.Tensor:
        with replayed(model, roles, hidden_of(calls[k]).to(device), extras[k]):
            return model(inputs.to(device), use_cache=False).logits

    return logits_of


def model_logits(model: nn.Module) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``logits_of(k, inputs)`` of a model held in memory: one plain call per batch."""
    device = input_device(model)
    return lambda _k, inputs: model(inputs.to(device), use_cache=False).logits


def replayed(model: nn.Module, roles: RoleMap, hidden: torch.Tensor, extra):
    """Every decoder layer returns ``hidden`` (the last layer's output, computed layer by layer)
    for the block, so a plain model call runs only what lies around the layers (embeddings, final
    norm, head, logit soft-capping) exactly as the whole model would."""
    layers = roles.layers(model)

    def replay(*_args, **_kwargs):
        return hidden if extra is None else (hidden, *extra)

    return swapped_forwards(layers, [replay] * len(layers))
