"""Saving a model of any placement (in memory, spread over GPUs, streamed from a CPU store or from
disk) as a folder that plain ``AutoModelForCausalLM.from_pretrained`` loads.

The folder is what ``save_pretrained`` would write: the same tensor names (tied weights left out,
fused weights written back in the checkpoint's own format), the same shards and index, the
config, the generation config, and the tokenizer. The weights are the model as it is now, pruned
state applied; a streamed decoder layer is brought to the device with the state applied for its
turn (``LoadedModel.layer``), so the whole model is never real at once. ``save_pretrained`` itself
cannot do that: it needs every tensor real, and one shard's tensors all in memory to write it, so
each shard is written here as a stream (a safetensors header from the shapes, then the tensors'
bytes group by group).

Everything is written into a temporary sibling folder that is renamed into place at the end: a
failure leaves no half-written folder, and an existing folder is replaced only once the new one
is complete.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import torch

from prune.errors import LabError
from prune.progress import Event, Progress, checkpoint, silent
from runtime.models import LoadedModel

WEIGHTS_NAME = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME; shards: model-00001-of-00002...
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SaveError(LabError):
    """A model that could not be written where asked (a folder that cannot be written, a full disk)."""


def save_model(lm: LoadedModel, folder: str | os.PathLike, progress: Progress = silent) -> Path:
    """Write ``lm``'s model as it is now, and its tokenizer, to ``folder``; its absolute path."""
    folder = Path(folder).expanduser().absolute()
    _check_target(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        partial.mkdir()  # the usual permissions (a tempfile.mkdtemp folder is private)
    except OSError as err:
        raise SaveError(_message(folder, err)) from None
    try:
        _write(lm, partial, progress)
        _move_into_place(partial, folder)
    except OSError as err:
        raise SaveError(_message(folder, err)) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # already renamed away when all went well
    progress(Event("save", 1.0, "model saved"))
    return folder


def _check_target(folder: Path) -> None:
    """The folder, or the nearest of its parents that exists, must be a folder (not a file)."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise SaveError(f"cannot save the model to {folder}: {path} is a file, not a folder")
            return


def _message(folder: Path, err: OSError) -> str:
    return f"cannot save the model to {folder}: {err.strerror or err}"


def _move_into_place(partial: Path, folder: Path) -> None:
    """``partial`` becomes ``folder``; a folder already there is moved aside first and deleted only
    once the new one is in place (put back if the rename fails)."""
    if not folder.exists():
        partial.rename(folder)
        return
    aside = partial.with_name(partial.name + ".old")
    folder.rename(aside)
    try:
        partial.rename(folder)
    except OSError:
        aside.rename(folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _write(lm: LoadedModel, folder: Path, progress: Progress) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = lm.model
    state = model.state_dict()  # a streamed model's decoder layers are meta here: shapes only
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    groups = _groups(lm, state)
    shapes = _saved_format(model, {name: t.to("meta") for name, t in state.items()})
    owner = {}  # saved name -> the group whose tensors make it
    for group, names in groups.items():
        for name in _saved_format(model, {n: state[n].to("meta") for n in names}):
            owner[name] = group
    if owner.keys() != shapes.keys():
        raise RuntimeError("the checkpoint format of this model cannot be written one layer at a time")
    split = split_torch_state_dict_into_shards(
        shapes, filename_pattern="model{suffix}.safetensors", max_shard_size=_max_shard_size()
    )
    order = {group: position for position, group in enumerate(groups)}
    done, total = 0, sum(len(names) for names in split.filename_to_tensors.values())
    for filename, names in split.filename_to_tensors.items():
        names = sorted(names, key=lambda name: (order[owner[name]], name))
        with open(folder / filename, "wb") as file:
            _write_header(file, names, shapes)
            for group in dict.fromkeys(owner[name] for name in names):
                tensors = _realized(lm, group, groups[group], state)
                for name in (n for n in names if owner[n] == group):
                    _write_tensor(file, tensors[name], shapes[name], name)
                    done += 1
                progress(Event("save", done / total, f"writing {filename}: {done}/{total} tensors"))
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(model, folder)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(folder)


def _groups(lm: LoadedModel, state: dict) -> dict[int | None, list[str]]:
    """The state's names per decoder layer (None: everything outside the layers), in layer order."""
    groups: dict[int | None, list[str]] = {None: []}
    groups.update({layer: [] for layer in range(lm.roles.num_layers)})
    prefix = lm.roles.layers_path + "."
    for name in state:
        inside = name.startswith(prefix)
        groups[int(name[len(prefix) :].split(".")[0]) if inside else None].append(name)
    return groups


def _realized(lm: LoadedModel, group: int | None, names: list[str], state: dict) -> dict:
    """The saved tensors of one group, real: outside the layers as the model holds them; a decoder
    layer as it is on the device now (a streamed one uploaded with the state applied, and kept
    alive by these tensors until they are written)."""
    checkpoint()  # a cancelled job stops between layers
    if group is None:
        return _saved_format(lm.model, {name: state[name] for name in names})
    with lm.layer(group):
        prefix = f"{lm.roles.layers_path}.{group}"
        layer = lm.model.get_submodule(prefix).state_dict(prefix=prefix + ".")
        return _saved_format(lm.model, {name: layer[name] for name in names})


def _saved_format(model, tensors: dict) -> dict:
    """Names and tensors as the checkpoint stores them: transformers' load-time conversions (fused
    MoE experts, say) reverted, as ``save_pretrained`` does. Works on meta tensors too (shapes)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def _write_header(file, names: list[str], shapes: dict) -> None:
    """The safetensors header: 8 bytes of length, then JSON (padded to 8 bytes) giving each tensor's
    dtype, shape and byte range, in the order the bytes follow."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        meta = shapes[name]
        if meta.dtype not in SAFETENSORS_DTYPES:
            raise SaveError(f"cannot save {name}: dtype {meta.dtype} has no safetensors code here")
        size = meta.numel() * meta.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write(struct.pack("<Q", len(text)))
    file.write(text)


def _write_tensor(file, tensor: torch.Tensor, meta: torch.Tensor, name: str) -> None:
    if tensor.shape != meta.shape or tensor.dtype != meta.dtype:
        raise RuntimeError(f"{name}: {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(meta.shape)}")
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    file.write(data.data)


def _write_configs(model, folder: Path) -> None:
    """The config as ``save_pretrained`` writes it (dtype and architecture set), on a copy so the
    loaded model's config stays as it is; the generation config; custom code if the model has any."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def _max_shard_size() -> int | str:
    """``save_pretrained``'s default shard size, so the shards are the ones it would write."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
