"""One declarative description of a pruning run, shared by the CLI, the app and the sweeps.

A ``Recipe`` is a frozen value: it validates itself when built (from flags, a dict, JSON or YAML),
turning bad input into a ``RecipeError`` whose message a person can act on, and round-trips
through JSON and YAML. Changes are ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prune.errors import RecipeError
from prune.methods import Method, method
from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES
from prune.structured import STRUCTURED

STATS_MODES = ("sequential", "cached")
CALIBRATION_SOURCES = ("c4", "wikitext2", "generated", "file")
# How the budget is spread over layers: "uniform" (every layer alike), "owl" (OWL's published mapping
# of the layers' outlier ratios, Yin et al. 2023), "owl-band" (the mean-band variant of OWL)
LAYER_SCHEDULES = ("uniform", "owl", "owl-band")
OWL_M = 5.0  # OWL: a Wanda score above M x its layer's mean score is an outlier
OWL_LAMBDA = 0.08  # OWL: layer sparsities spread over 2 lambda around the mean
REFINES = ("none", "dsnot")  # a mask refinement after the method's: DSnoT (Zhang et al. 2024)


class FrozenDict(dict):
    """A dict that cannot change, so a recipe can be shared between sessions and threads safely."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("recipes are frozen: make a changed copy with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


def _set(obj, name: str, value) -> None:
    """Normalise a field of a frozen dataclass while it is being built."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    path: str | None = None  # for source="file": a .txt, .jsonl, .json or .parquet file

    def __post_init__(self) -> None:
        if self.source not in CALIBRATION_SOURCES:
            raise RecipeError(
                f"unknown calibration source {self.source!r}; choose one of {', '.join(CALIBRATION_SOURCES)}"
            )
        if self.source == "file" and not self.path:
            raise RecipeError("calibration source 'file' needs a path")
        check_whole("calibration nsamples", self.nsamples, 1)
        check_whole("calibration seqlen", self.seqlen, 2)
        check_whole("calibration seed", self.seed, 0)

    def key(self) -> str:
        return f"{self.source}:{self.path or ''}:n{self.nsamples}:L{self.seqlen}:s{self.seed}"


@dataclass(frozen=True)
class EvalSpec:
    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    max_windows: int | None = None  # None: the full protocol
    tasks: tuple[str, ...] = ()  # lm-eval task names
    limit: int | None = None  # lm-eval examples per task

    def __post_init__(self) -> None:
        for name in ("datasets", "tasks"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(x, str) for x in value):
                raise RecipeError(f"evaluation {name} must be a list of names; got {value!r}")
            _set(self, name, tuple(value))
        check_whole("evaluation seqlen", self.seqlen, 2)
        if self.max_windows is not None:
            check_whole("evaluation max_windows", self.max_windows, 0)
        if self.limit is not None:
            check_whole("task limit", self.limit, 1)


@dataclass(frozen=True)
class Recipe:
    """A pruning run, validated when it is built; change it with ``dataclasses.replace``."""

    model: str = "smollm2-135m-instruct"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    method: str = "wanda"
    # "unstructured", "N:M" (e.g. "2:4"), or whole units (prune.structured): "channels" (MLP
    # channels at the mlp rate, attention heads / kv groups at the attn rate) or "depth" (a
    # fraction "all" of the decoder layers)
    structure: str = "unstructured"
    use_variant: bool = False  # the Wanda reference's cumulative-sum threshold
    permute: bool = False  # RIA's channel permutation before N:M (the mask stays on the original columns)
    refine: str = "none"  # "dsnot": DSnoT's prune-and-grow on the method's mask (needs input moments)
    # role or group ("attn", "mlp", "all") -> fraction pruned; a role beats its group, a group "all"
    sparsity: Mapping[str, float] = field(default_factory=FrozenDict)
    layers: tuple[int, int] | None = None  # [start, end): only these decoder layers are pruned
    per_layer: Mapping[int, Mapping[str, float]] = field(default_factory=FrozenDict)  # layer -> role -> s
    # per-layer offsets from outlier ratios (see prune.allocation.schedule_per_layer); the pruner
    # writes them out as per_layer entries for the pruned layers that per_layer does not name
    layer_schedule: str = "uniform"
    owl_m: float = OWL_M
    owl_lambda: float = OWL_LAMBDA
    stats_mode: str = "sequential"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise RecipeError("a recipe needs a model name")
        spec = method(self.method)
        nm = self.nm  # parses and checks the N:M structure
        if nm and not spec.supports_nm:
            raise RecipeError(f"method {self.method!r} has no N:M form")
        if self.use_variant and (not spec.supports_variant or nm):
            raise RecipeError("use_variant applies to unstructured Wanda only")
        if self.stats_mode not in STATS_MODES:
            raise RecipeError(
                f"unknown statistics mode {self.stats_mode!r}; choose one of {', '.join(STATS_MODES)}"
            )
        _set(self, "sparsity", _sparsity_table(self.sparsity, "sparsity"))
        if not isinstance(self.per_layer, Mapping):
            raise RecipeError("per_layer must map layer numbers to role sparsities")
        per_layer = {}
        for layer, table in self.per_layer.items():
            try:
                index = int(layer)
            except (TypeError, ValueError):
                raise RecipeError(f"per_layer keys are layer numbers; got {layer!r}") from None
            per_layer[index] = _sparsity_table(table, f"per_layer[{index}]")
        _set(self, "per_layer", FrozenDict(per_layer))
        if self.layers is not None:
            layers = tuple(self.layers)
            if (
                len(layers) != 2
                or not all(isinstance(x, int) for x in layers)
                or not 0 <= layers[0] < layers[1]
            ):
                raise RecipeError(f"layers must be [start, end) with 0 <= start < end; got {list(layers)}")
            _set(self, "layers", layers)
        self._check_schedule()
        self._check_refinements(spec)
        self._check_structured()
        if not isinstance(self.calibration, CalibrationSpec) or not isinstance(self.evaluation, EvalSpec):
            raise RecipeError("calibration and evaluation must be CalibrationSpec and EvalSpec")

    def _check_schedule(self) -> None:
        if self.layer_schedule not in LAYER_SCHEDULES:
            raise RecipeError(
                f"unknown layer schedule {self.layer_schedule!r}; choose one of {', '.join(LAYER_SCHEDULES)}"
            )
        for name, low, high in (("owl_m", 0.0, None), ("owl_lambda", 0.0, 0.5)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or value < low or (high is None and value <= low) or (high and value > high):
                bound = f"in [{low:g}, {high:g}]" if high else f"above {low:g}"
                raise RecipeError(f"{name} must be a number {bound}; got {value!r}")
            _set(self, name, float(value))
        if self.layer_schedule != "uniform" and self.nm:
            raise RecipeError(
                f"layer schedule {self.layer_schedule!r} is for unstructured sparsity; "
                f"{self.structure} prunes the same N:M pattern in every layer"
            )

    def _check_refinements(self, spec: Method) -> None:
        """RIA's permutation is for N:M; DSnoT swaps weights one for one within a row (or an M-group),
        so it needs a mask with the same count in every row: a per-row method or N:M."""
        if not isinstance(self.permute, bool) or self.refine not in REFINES:
            raise RecipeError(f"permute is true or false; refine is one of {', '.join(REFINES)}")
        if self.permute and not (self.nm and spec.supports_permute):
            raise RecipeError(
                "permute (RIA's channel permutation) applies to N:M structures with ria or ria-row"
            )
        if self.refine == "none":
            return
        if (
            spec.changes_weights
            or self.use_variant
            or self.permute
            or self.structured
            or not (spec.per_row or self.nm)
        ):
            raise RecipeError(
                "DSnoT refines a mask with the same count in every row: use wanda, magnitude-row or "
                "ria-row (or any of these and magnitude, ria with N:M), without use_variant, permute "
                "or whole-unit structures"
            )

    def _check_structured(self) -> None:
        """Structured pruning removes the same units from every layer, scored one way."""
        if not self.structured:
            return
        if self.method != "wanda" or self.use_variant:
            raise RecipeError(
                f"{self.structure} pruning is scored by Wanda-sp / block influence: use method wanda"
            )
        if self.layers is not None or self.per_layer or self.layer_schedule != "uniform":
            raise RecipeError(
                f"{self.structure} pruning removes the same units from every layer: no layer ranges"
            )
        groups = {"channels": (ATTENTION_ROLES, MLP_ROLES), "depth": (ROLES,)}[self.structure]
        for group in groups:
            if len({lookup(self.sparsity, role) or 0.0 for role in group}) > 1:
                what = "attn=... and mlp=..." if self.structure == "channels" else "all=... (layers)"
                raise RecipeError(f"{self.structure} pruning takes one rate per unit kind: set {what}")

    @property
    def structured(self) -> bool:
        """Whole units removed (the matrices shrink), not weights zeroed."""
        return self.structure in STRUCTURED

    def unit_rate(self, role: str) -> float:
        """Structured: the fraction of units removed, read from one role of their kind
        (``o``: attention units, ``down``: MLP channels, any role: layers for depth)."""
        return lookup(self.sparsity, role) or 0.0

    # ----- the sparsity one (layer, role) gets ---------------------------------------------
    def sparsity_for(self, layer: int, role: str) -> float:
        if self.layers is not None and not (self.layers[0] <= layer < self.layers[1]):
            return 0.0
        if layer in self.per_layer:
            value = lookup(self.per_layer[layer], role)
            if value is not None:
                return value
        value = lookup(self.sparsity, role)
        return 0.0 if value is None else value

    def realised_sparsity(self, layer: int, role: str) -> float:
        """What the masks will realise: N:M prunes N/M of every role it touches, whatever the slider."""
        value = self.sparsity_for(layer, role)
        nm = self.nm
        return nm[0] / nm[1] if nm and value > 0 else value

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.structure == "unstructured" or self.structured:
            return None
        return parse_nm(self.structure)

    @property
    def method_spec(self) -> Method:
        return method(self.method)

    @property
    def statistics(self) -> str | None:
        """Calibration statistics pruning reads: the method's, or "moments" (norms, column sums and
        variances) for DSnoT, whatever the method (magnitude + DSnoT calibrates)."""
        return "moments" if self.refine == "dsnot" else self.method_spec.statistics

    @property
    def needs_statistics(self) -> bool:
        return self.statistics is not None

    def schedules_layers(self, num_layers: int | None = None) -> bool:
        """Whether pruning first writes the layer schedule out, from the dense model's outlier ratios
        (one calibration pass): any schedule but uniform, unless ``per_layer`` already names each of
        the model's ``num_layers`` layers (not known: taken as not)."""
        if self.layer_schedule == "uniform":
            return False
        return num_layers is None or any(i not in self.per_layer for i in range(num_layers))

    @property
    def calibrates(self) -> bool:
        """Whether pruning reads calibration data: for the method's statistics, or for a layer
        schedule's outlier ratios (magnitude + OWL calibrates too). The one rule the pruner, the job
        size (``prune.jobs``) and the hosting limits read."""
        return self.needs_statistics or self.schedules_layers()

    # ----- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON/YAML types."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["sparsity"] = dict(self.sparsity)
        data["per_layer"] = {layer: dict(table) for layer, table in self.per_layer.items()}
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["calibration"] = dataclasses.asdict(self.calibration)
        evaluation = dataclasses.asdict(self.evaluation)
        data["evaluation"] = {
            **evaluation,
            "datasets": list(evaluation["datasets"]),
            "tasks": list(evaluation["tasks"]),
        }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        if "calibration" in data:
            data["calibration"] = _sub(CalibrationSpec, data["calibration"], "calibration")
        if "evaluation" in data:
            data["evaluation"] = _sub(EvalSpec, data["evaluation"], "evaluation")
        if data.get("per_layer") is None:
            data.pop("per_layer", None)
        if data.get("sparsity") is None:
            data.pop("sparsity", None)
        try:
            return cls(**data)
        except TypeError as err:
            raise RecipeError(f"bad recipe: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's parser errors
            raise RecipeError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from None
        except Exception as err:
            if type(err).__module__.startswith("yaml"):
                mark = getattr(err, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise RecipeError(f"{path} is not valid YAML: {problem}{where}") from None
            raise
        if not isinstance(data, dict):
            raise RecipeError(f"{path} does not hold a recipe mapping")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json())


def _sub(cls, value, name: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise RecipeError(f"{name} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise RecipeError(f"unknown {name} fields: {', '.join(sorted(unknown))}")
    try:
        return cls(**value)
    except TypeError as err:
        raise RecipeError(f"bad {name}: {err}") from None


GROUPS = {"attn": ATTENTION_ROLES, "mlp": MLP_ROLES, "all": ROLES}


def lookup(table: dict[str, float], role: str) -> float | None:
    """A role's own entry, else its group's ("attn" or "mlp"), else "all"'s, else None."""
    group = "attn" if role in ATTENTION_ROLES else "mlp"
    for key in (role, group, "all"):
        if key in table:
            return float(table[key])
    return None


def check_key(key: str) -> None:
    if key not in ROLES and key not in GROUPS:
        raise RecipeError(f"unknown role {key!r}; roles are {', '.join(ROLES)} (groups: attn, mlp, all)")


def check_fraction(what: str, value: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0.0 <= float(value) <= 1.0:
        raise RecipeError(f"{what} must be a fraction in [0, 1]; got {value!r}")


def check_whole(what: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RecipeError(f"{what} must be a whole number >= {low}; got {value!r}")


def _sparsity_table(table: Mapping, what: str) -> FrozenDict:
    if not isinstance(table, Mapping):
        raise RecipeError(f"{what} must map roles to fractions; got {table!r}")
    for key, value in table.items():
        check_key(key)
        check_fraction(f"sparsity of {key}", value)
    return FrozenDict({key: float(value) for key, value in table.items()})


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise RecipeError(
            f"structure must be 'unstructured', 'N:M' like '2:4', 'channels' or 'depth'; got {text!r}"
        ) from None
    if not 0 < n < m:
        raise RecipeError(f"N:M needs 0 < N < M; got {n}:{m}")
    return n, m


def parse_sparsity(text: str) -> dict[str, float]:
    """``"all=0.5"``, ``"attn=0.3,mlp=0.6"``, ``"all=0.5,down=0.7"``: a role beats its group.

    Groups stay groups (not expanded), so ``all=0.5`` also fits a model without a gate role."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise RecipeError(f"sparsity entries look like role=fraction; got {item!r}")
        name, value = (x.strip() for x in item.split("=", 1))
        try:
            fraction = float(value)
        except ValueError:
            raise RecipeError(f"sparsity of {name} is not a number: {value!r}") from None
        name = "attn" if name == "attention" else name
        check_key(name)
        check_fraction(f"sparsity of {name}", fraction)
        result[name] = fraction
    return result
