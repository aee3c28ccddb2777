"""bitsandbytes copies of a model, int8 (LLM.int8()) or 4-bit NF4, to evaluate and generate in less
memory than full precision takes (a 7B model on a small GPU).

Pruning happens in full precision; a quantized copy is made afterwards from the weights as they are
then (dense or pruned), so one pruned state can be measured at every precision. The copy is a
separate model object: the decoder layers' linear layers become bitsandbytes modules on the compute
device, everything else inside the layers (norms, biases) is cloned, and what lies outside them
(embeddings, final norm, head) is shared with the original, not copied, and stays full precision.

Pruned weights must stay pruned: both formats scale blocks of weights and map each to the nearest
code, and both codes hold an exact 0, so a zero should come back as 0. ``quantized_copy`` checks
it anyway: it dequantizes every matrix and counts, per role, the weights that were exactly 0 before
and are not after (``QuantReport``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass, field
from functools import cache

import torch
from torch import nn

from prune.errors import LabError
from prune.progress import checkpoint
from prune.roles import Target
from runtime.models import LoadedModel

QUANT_KINDS: tuple[str, ...] = ("int8", "nf4")
# NF4 weights are dequantized to this for each matmul on a GPU. On a CPU the model's own dtype:
# bf16 matmuls measured 5.7x slower than fp32 on this AVX2 CPU (SmolLM2, same perplexity to 0.4%).
NF4_COMPUTE_DTYPE = torch.bfloat16
BNB_VERSION = "0.50.2"  # the version requirements.txt pins

# Hooks a copied module must not carry: the original's may upload weights (a streamed model's
# layers) or hold references to whatever installed them.
_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class QuantizationError(LabError):
    """A quantized copy that cannot be made here (bitsandbytes missing, no kernels for the device)."""


def check_kind(kind: str) -> None:
    if kind not in QUANT_KINDS:
        raise QuantizationError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANT_KINDS)}")


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizationError(
            f"quantized copies need bitsandbytes: pip install bitsandbytes=={BNB_VERSION}"
        ) from None
    return bitsandbytes


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, kind: str, device: torch.device
) -> nn.Module:
    """A bitsandbytes linear on ``device`` computing ``x @ weight.T + bias`` (``weight``: (out, in)).

    int8: ``Linear8bitLt`` with ``has_fp16_weights=False`` (int8 weights and one fp32 scale per
    row; bitsandbytes' default threshold, i.e. no fp16 outlier columns). The weights are quantized
    with ``int8_vectorwise_quant`` as ``Int8Params`` does, because ``Int8Params.to`` quantizes only
    weights that start on the CPU. nf4: ``Linear4bit`` (blocks of 64, double-quantized scales),
    computing in bf16 (on a CPU in the weight's dtype)."""
    check_kind(kind)
    bnb = _bnb()
    rows, columns = weight.shape
    weight = weight.detach()
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(
            columns, rows, bias=bias is not None, has_fp16_weights=False, device="meta"
        )
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(device, torch.float16))
        module.weight = bnb.nn.Int8Params(
            codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales
        )
    else:
        module = bnb.nn.Linear4bit(
            columns,
            rows,
            bias=bias is not None,
            compute_dtype=weight.dtype if device.type == "cpu" else NF4_COMPUTE_DTYPE,
            quant_type="nf4",
            device="meta",
        )
        packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=module)
        module.weight = packed.to(device)  # quantized by the move
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to(device, copy=True), requires_grad=False)
    return module


def dequantized(module: nn.Module) -> torch.Tensor:
    """The (out, in) weights a bitsandbytes linear computes with."""
    bnb = _bnb()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a bitsandbytes linear's weight takes as stored: codes plus scales (and NF4's code book
    and second-level scales)."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        state = weight.quant_state.as_dict(packed=True)
        return weight.data.nbytes + sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))
    return weight.data.nbytes + weight.SCB.nbytes


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of ``model`` as stored (tied weights once; bitsandbytes scales
    included). A pruned model in dense storage takes as many bytes as the dense one."""
    total = sum(p.nbytes for p in model.parameters())
    return total + sum(quantized_bytes(m) - m.weight.data.nbytes for m in model.modules() if _is_bnb(m))


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


@cache
def check_backend(kind: str, device: torch.device) -> None:
    """Quantize and run a small linear on ``device``: bitsandbytes' kernels depend on its build, the
    device and the CPU (0.50's CPU backend has quantize/dequantize and 4-bit kernels, and falls back
    to plain torch ops for the rest), so a probe tells what works where a version table would guess."""
    check_kind(kind)
    _bnb()
    try:
        probe = quantize_linear(torch.ones(64, 64), None, kind, device)
        probe(torch.ones(1, 64, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means no usable kernels here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise QuantizationError(f"bitsandbytes cannot run {kind} on {device}: {first}") from None


@dataclass
class RoleZeros:
    zeros: int  # weights exactly 0 before quantization
    moved: int  # of those, weights that are not 0 after dequantizing (must be 0)


@dataclass
class QuantReport:
    kind: str
    roles: dict[str, RoleZeros]
    layer_bytes: int  # the decoder layers' linear weights as bitsandbytes stores them (with scales)
    full_layer_bytes: int  # the same weights in the model's dtype
    model_bytes: int  # every parameter of the copy as stored (shared embeddings and head once)
    kept: tuple[str, ...] = field(default_factory=tuple)  # role modules left in full precision

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.roles.values())

    @property
    def moved(self) -> int:
        return sum(r.moved for r in self.roles.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "zeros": self.zeros, "moved": self.moved, "kept": list(self.kept)}


def _linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Name inside the layer -> every linear, GPT-2's Conv1D (weights stored (in, out)) included."""
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


def _out_in(module: nn.Module) -> torch.Tensor:
    """A linear's weight as (out, in)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _role_part(piece: Target, weight: torch.Tensor) -> torch.Tensor:
    """The role's view of a full (out, in) weight, as ``Target.weight`` takes it from the model."""
    if piece.rows is not None:
        weight = weight[piece.rows[0] : piece.rows[1]]
    return piece.view(weight) if piece.view is not None else weight


def _drop_forward(modules) -> None:
    """Remove the ``forward = None`` that ``_without_hooks`` left: the class's forward runs again."""
    for module in modules:
        if "forward" in module.__dict__ and module.__dict__["forward"] is None:
            del module.__dict__["forward"]


def _without_hooks(modules, memo: dict) -> None:
    """Make ``copy.deepcopy(..., memo)`` give the copies empty hook tables and no per-instance
    ``forward`` (a streamed layer's uploading wrapper), never copying what those refer to."""
    for module in modules:
        for name in _HOOKS:
            table = module.__dict__.get(name)
            if table is not None:
                memo[id(table)] = type(table)()
        if "forward" in module.__dict__:
            memo[id(module.__dict__["forward"])] = None


def quantized_copy(
    lm: LoadedModel, kind: str, device: torch.device | None = None
) -> tuple[nn.Module, QuantReport]:
    """A copy of ``lm``'s model as it is now whose decoder-layer linears are bitsandbytes ``kind``
    modules on ``device`` (default: the model's), and what the copy keeps of the zeros.

    Each layer is copied inside ``lm.layer(i)``, one at a time, so a streamed model never has more
    than one layer real at once. The original is not changed; the copy shares its tensors outside
    the layers."""
    model, roles, device = lm.model, lm.roles, device or lm.device
    check_kind(kind)
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        raise QuantizationError("quantized copies need a model on one device; this one is spread out")
    check_backend(kind, device)
    layers = roles.layers(model)
    inside = {id(t) for t in itertools.chain(layers.parameters(), layers.buffers())}
    outside = itertools.chain(model.parameters(), model.buffers())
    memo: dict = {id(t): t for t in outside if id(t) not in inside}  # shared, not copied
    _without_hooks(model.modules(), memo)
    memo[id(layers)] = nn.ModuleList()  # filled below, layer by layer
    quantized = copy.deepcopy(model, memo)
    _drop_forward(quantized.modules())
    copied_layers = roles.layers(quantized)
    zeros = {role: RoleZeros(0, 0) for role in roles.roles}
    layer_bytes = full_bytes = 0
    kept: set[str] = set()
    for i, layer in enumerate(layers):
        checkpoint()
        prefix = f"{roles.layers_path}.{i}."
        with lm.layer(i), torch.no_grad():
            linears = _linears(layer)
            layer_memo = dict(memo)  # hooks emptied and outside tensors shared, as for the model
            for module in linears.values():  # replaced below, never copied
                layer_memo.update({id(p): None for p in module.parameters(recurse=False)})
            new = copy.deepcopy(layer, layer_memo).to(device)
            _drop_forward(new.modules())
            modules = {}
            for name, module in linears.items():
                modules[name] = quantize_linear(_out_in(module), module.bias, kind, device)
                new.set_submodule(name, modules[name])
                layer_bytes += quantized_bytes(modules[name])
                full_bytes += module.weight.nbytes
            copied_layers.append(new)
            for role in roles.roles:
                for piece in roles.targets[(i, role)].pieces():
                    before = piece.weight(model) == 0
                    zeros[role].zeros += int(before.sum())
                    local = piece.module.removeprefix(prefix)
                    if local not in modules:
                        kept.add(local)
                        continue
                    after = _role_part(piece, dequantized(modules[local])) != 0
                    zeros[role].moved += int((before.to(after.device) & after).sum())
    report = QuantReport(kind, zeros, layer_bytes, full_bytes, stored_bytes(quantized), tuple(sorted(kept)))
    return quantized, report
