"""From widget values to a ``Recipe`` and back: defaults per device, presets, the live readout.

Pure functions with no Gradio import, so the mapping is unit-tested without a browser and the
same names serve as the app's API parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from prune.errors import RecipeError
from prune.methods import METHODS
from prune.recipe import OWL_LAMBDA, OWL_M, CalibrationSpec, EvalSpec, Recipe, parse_nm
from prune.report import planned_counts
from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES

METHOD_CHOICES = [(m.label, m.name) for m in METHODS.values()]
# channels / depth remove whole units (heads and MLP channels, or decoder layers): the model shrinks
STRUCTURES = ["unstructured", "2:4", "4:8", "channels", "depth"]
CALIBRATION_CHOICES = ["c4", "wikitext2", "generated", "uploaded file"]
EVAL_CHOICES = ["wikitext2", "c4", "uploaded file"]
LAYER_SCHEDULE_CHOICES = [
    ("uniform: every layer alike", "uniform"),
    ("OWL: fewer pruned where outliers are (published mapping)", "owl"),
    ("OWL band: mean-band variant", "owl-band"),
]
REFINE_CHOICES = [
    ("none: the method's mask", "none"),
    ("DSnoT: prune-and-grow against the reconstruction error (calibrates)", "dsnot"),
]
STATS_CHOICES = [
    ("cached: one dense pass, re-pruning is instant", "cached"),
    ("sequential: the paper's layer-by-layer procedure", "sequential"),
]


@dataclass
class Defaults:
    """Starting values that fit the device: a CPU classroom laptop or a GPU server."""

    nsamples: int
    seqlen: int
    eval_windows: int  # 0: the full protocol
    eval_seqlen: int
    max_new_tokens: int
    task_limit: int

    @classmethod
    def for_device(cls, device_type: str) -> Defaults:
        if device_type == "cuda":
            return cls(
                nsamples=128,
                seqlen=2048,
                eval_windows=0,
                eval_seqlen=2048,
                max_new_tokens=128,
                task_limit=500,
            )
        return cls(nsamples=16, seqlen=256, eval_windows=4, eval_seqlen=512, max_new_tokens=48, task_limit=40)


@dataclass
class Controls:
    """Every widget the Prune tab sends; field names are the ``/prune`` API's parameter names.

    Sparsities are percentages (what the sliders show); the recipe stores fractions."""

    q: float = 50.0
    k: float = 50.0
    v: float = 50.0
    o: float = 50.0
    gate: float = 50.0
    up: float = 50.0
    down: float = 50.0
    method: str = "wanda"
    structure: str = "unstructured"
    permute: bool = False  # RIA's channel permutation (N:M with ria, ria-row)
    refine: str = "none"  # "dsnot": DSnoT's prune-and-grow on the method's mask
    layer_schedule: str = "uniform"
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    layer_first: int = 0
    layer_last: int = -1  # inclusive; -1: the last layer
    calibration: str = "c4"
    calibration_file: str | None = None
    nsamples: int = 16
    seqlen: int = 256
    seed: int = 0
    stats_mode: str = "cached"
    eval_datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    eval_file: str | None = None
    eval_windows: int = 4
    eval_seqlen: int = 512

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, values: dict) -> Controls:
        unknown = set(values) - set(cls.names())
        if unknown:
            raise RecipeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass(frozen=True)
class ModelShape:
    """What the sliders need to know about the loaded model."""

    name: str
    roles: tuple[str, ...]
    num_layers: int
    layer_counts: dict[str, int]  # weights per role in one layer
    dtype: str = "auto"
    device: str = "auto"

    def group_params(self, group: tuple[str, ...]) -> int:
        return self.num_layers * sum(self.layer_counts.get(r, 0) for r in group)


def _percent(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"sparsity of {name} must be a number of percent; got {value!r}") from None
    if not 0.0 <= number <= 100.0:
        raise RecipeError(f"sparsity of {name} must be between 0 and 100 %; got {number:g}")
    return round(number / 100.0, 6)


def _whole(name: str, value, low: int) -> int:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a whole number; got {value!r}") from None
    if number < low:
        raise RecipeError(f"{name} must be at least {low}; got {number}")
    return number


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a number; got {value!r}") from None


def layer_range(controls: Controls, num_layers: int) -> tuple[int, int] | None:
    """[start, end) of the pruned layers, or None when every layer is pruned."""
    first = _whole("first layer", controls.layer_first, 0)
    last = num_layers - 1 if int(float(controls.layer_last)) < 0 else int(float(controls.layer_last))
    if last >= num_layers or first > last:
        raise RecipeError(f"layer range {first}..{last} is not inside 0..{num_layers - 1} (first <= last)")
    return None if (first, last) == (0, num_layers - 1) else (first, last + 1)


def calibration_spec(controls: Controls) -> CalibrationSpec:
    source, path = controls.calibration, None
    if source == "uploaded file":
        if not controls.calibration_file:
            raise RecipeError("calibration 'uploaded file' needs a file: upload a .txt, .jsonl or .parquet")
        source, path = "file", str(controls.calibration_file)
    return CalibrationSpec(
        source=source,
        nsamples=_whole("calibration samples", controls.nsamples, 1),
        seqlen=_whole("calibration sequence length", controls.seqlen, 2),
        seed=_whole("seed", controls.seed, 0),
        path=path,
    )


def _evaluation(controls: Controls) -> EvalSpec:
    datasets = []
    for name in controls.eval_datasets or []:
        if name == "uploaded file":
            if not controls.eval_file:
                raise RecipeError("perplexity on an 'uploaded file' needs a file: upload a text file")
            datasets.append(str(controls.eval_file))
        elif name in ("wikitext2", "c4"):
            datasets.append(name)
        else:
            raise RecipeError(f"unknown evaluation dataset {name!r}; choose from {', '.join(EVAL_CHOICES)}")
    windows = _whole("evaluation windows", controls.eval_windows, 0)
    return EvalSpec(
        datasets=tuple(datasets),
        seqlen=_whole("evaluation sequence length", controls.eval_seqlen, 2),
        max_windows=windows or None,
    )


def build_recipe(controls: Controls, shape: ModelShape) -> Recipe:
    """The recipe these widget values describe, for the model that is loaded now (it validates itself)."""
    sparsity = {role: _percent(role, getattr(controls, role)) for role in shape.roles}
    if controls.structure not in STRUCTURES:
        parse_nm(controls.structure)  # a custom N:M is fine; anything else raises a RecipeError
    return Recipe(
        model=shape.name,
        dtype=shape.dtype,
        device=shape.device,
        method=controls.method,
        structure=controls.structure,
        permute=bool(controls.permute),
        refine=controls.refine,
        sparsity=sparsity,
        layers=layer_range(controls, shape.num_layers),
        layer_schedule=controls.layer_schedule,
        owl_m=_number("OWL M", controls.owl_m),
        owl_lambda=_number("OWL lambda", controls.owl_lambda),
        stats_mode=controls.stats_mode,
        calibration=calibration_spec(controls),
        evaluation=_evaluation(controls),
    )


def millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def readout(recipe: Recipe, shape: ModelShape, total_params: int) -> str:
    """The markdown readout under the sliders: what pressing the button will remove."""
    p = planned_counts(recipe, shape.layer_counts, shape.num_layers)

    def share(part: int, whole: int) -> str:
        return f"{100 * part / whole:.1f} %" if whole else "-"

    lines = [
        f"### Will prune **{millions(p['pruned'])}** weights = **{share(p['pruned'], p['linear'])}** "
        f"of the attention + MLP matrices ({share(p['pruned'], total_params)} of all "
        f"{millions(total_params)} parameters)",
        f"Attention: {millions(p['attention'])} ({share(p['attention'], p['attention_params'])})"
        f" · MLP: {millions(p['mlp'])} ({share(p['mlp'], p['mlp_params'])})",
    ]
    if recipe.nm:
        lines.append(
            f"{recipe.structure} keeps {recipe.nm[1] - recipe.nm[0]} of every {recipe.nm[1]} weights "
            "in each role whose slider is above 0 (the slider value itself is not used)."
        )
    if recipe.layers:
        lines.append(f"Only layers {recipe.layers[0]}..{recipe.layers[1] - 1} are pruned.")
    if recipe.layer_schedule != "uniform":
        lines.append(
            f"Layer schedule {recipe.layer_schedule} (M = {recipe.owl_m:g}, λ = {recipe.owl_lambda:g}): "
            "layers with more outlier scores are pruned less, others more, at the same total "
            "(computed from the dense statistics when you press the button)."
        )
    return "\n\n".join(lines)


# ----- presets ------------------------------------------------------------------------------------
PRESETS = ("uniform", "attention", "mlp", "equal")


def preset(name: str, level: float, shape: ModelShape) -> dict[str, float]:
    """Slider percentages for a preset at ``level`` percent.

    ``equal``: attention at ``level`` and MLP at the sparsity that removes the same number of
    weights, so attention and MLP can be compared at an equal budget."""
    level = _percent("preset level", level) * 100
    attention = level if name in ("uniform", "attention", "equal") else 0.0
    if name == "equal":
        mlp_params = shape.group_params(MLP_ROLES)
        mlp = min(100.0, level * shape.group_params(ATTENTION_ROLES) / mlp_params) if mlp_params else 0.0
    elif name in ("uniform", "mlp"):
        mlp = level
    elif name == "attention":
        mlp = 0.0
    else:
        raise RecipeError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    return {role: round(attention if role in ATTENTION_ROLES else mlp, 1) for role in ROLES}


def recipe_summary(recipe: Recipe) -> str:
    """One line for the history table: method, structure, per-role sparsity, layers, calibration."""
    values = recipe.sparsity
    if len(set(values.values())) == 1 and values:
        sparsity = f"all {100 * next(iter(values.values())):.0f}%"
    else:
        sparsity = " ".join(f"{role} {100 * s:.0f}" for role, s in values.items())
    layers = f" layers {recipe.layers[0]}-{recipe.layers[1] - 1}" if recipe.layers else ""
    if recipe.layer_schedule != "uniform":
        layers += f" {recipe.layer_schedule} (M {recipe.owl_m:g}, λ {recipe.owl_lambda:g})"
    cal = recipe.calibration
    calibration = (
        f", {cal.source} {cal.nsamples}x{cal.seqlen} {recipe.stats_mode}" if recipe.needs_statistics else ""
    )
    method = recipe.method + (" + DSnoT" if recipe.refine == "dsnot" else "")
    structure = recipe.structure + (" permuted" if recipe.permute else "")
    return f"{method} {structure}: {sparsity}{layers}{calibration}"
