"""One declarative description of a pruning run, shared by the CLI, the app and the sweeps.

A ``Recipe`` round-trips through JSON and YAML; ``Recipe.validate`` turns bad input into a
``RecipeError`` whose message a person can act on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from prune.roles import ATTENTION_ROLES, MLP_ROLES, ROLES

METHODS = ("wanda", "magnitude", "magnitude-row")
STATS_MODES = ("sequential", "cached")
CALIBRATION_SOURCES = ("c4", "wikitext2", "generated", "file")


class RecipeError(ValueError):
    """A recipe or flag that cannot be run; the message says what to change."""


@dataclass
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    path: str | None = None  # for source="file": a .txt, .jsonl, .json or .parquet file

    def key(self) -> str:
        return f"{self.source}:{self.path or ''}:n{self.nsamples}:L{self.seqlen}:s{self.seed}"


@dataclass
class EvalSpec:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None  # None: the full protocol
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    limit: int | None = None  # lm-eval examples per task


@dataclass
class Recipe:
    model: str = "smollm2-135m-instruct"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    method: str = "wanda"
    structure: str = "unstructured"  # or "N:M", e.g. "2:4"
    use_variant: bool = False  # the Wanda reference's cumulative-sum threshold
    # role or group ("attn", "mlp", "all") -> fraction pruned; a role beats its group, a group "all"
    sparsity: dict[str, float] = field(default_factory=dict)
    layers: list[int] | None = None  # [start, end): only these decoder layers are pruned
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> role -> s
    stats_mode: str = "sequential"
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvalSpec = field(default_factory=EvalSpec)

    # ----- the sparsity one (layer, role) gets ---------------------------------------------
    def sparsity_for(self, layer: int, role: str) -> float:
        if self.layers is not None and not (self.layers[0] <= layer < self.layers[1]):
            return 0.0
        if layer in self.per_layer:
            value = lookup(self.per_layer[layer], role)
            if value is not None:
                return value
        return self.role_sparsity(role)

    def role_sparsity(self, role: str) -> float:
        """The recipe-wide sparsity of a role (before layer range and per-layer overrides)."""
        value = lookup(self.sparsity, role)
        return 0.0 if value is None else value

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.structure == "unstructured":
            return None
        return parse_nm(self.structure)

    @property
    def needs_statistics(self) -> bool:
        return self.method == "wanda"

    # ----- checks ----------------------------------------------------------------------------
    def validate(self) -> Recipe:
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.stats_mode not in STATS_MODES:
            raise RecipeError(
                f"unknown statistics mode {self.stats_mode!r}; choose one of {', '.join(STATS_MODES)}"
            )
        self.nm  # noqa: B018 - parses and checks the N:M structure
        if self.use_variant and (self.method != "wanda" or self.nm):
            raise RecipeError("use_variant applies to unstructured Wanda only")
        tables = [self.sparsity, *self.per_layer.values()]
        for table in tables:
            for key, value in table.items():
                check_key(key)
                check_fraction(f"sparsity of {key}", value)
        if self.layers is not None:
            if len(self.layers) != 2 or self.layers[0] < 0 or self.layers[1] <= self.layers[0]:
                raise RecipeError(f"layers must be [start, end) with 0 <= start < end; got {self.layers}")
        cal = self.calibration
        if cal.source not in CALIBRATION_SOURCES:
            raise RecipeError(
                f"unknown calibration source {cal.source!r}; choose one of {', '.join(CALIBRATION_SOURCES)}"
            )
        if cal.source == "file" and not cal.path:
            raise RecipeError("calibration source 'file' needs a path")
        if cal.nsamples < 1 or cal.seqlen < 2:
            raise RecipeError("calibration needs nsamples >= 1 and seqlen >= 2")
        if self.evaluation.seqlen < 2:
            raise RecipeError("evaluation seqlen must be >= 2")
        return self

    # ----- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        if "per_layer" in data:
            data["per_layer"] = {int(k): dict(v) for k, v in (data["per_layer"] or {}).items()}
        if data.get("layers") is not None:
            data["layers"] = [int(x) for x in data["layers"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
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
    return cls(**value)


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
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RecipeError(f"{what} must be a fraction in [0, 1]; got {value!r}")


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise RecipeError(f"structure must be 'unstructured' or 'N:M' like '2:4'; got {text!r}") from None
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
