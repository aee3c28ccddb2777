"""What may leave the server: a recipe or result as a visitor downloads it or a hub repo stores it,
with the model named by its display name and no server folder anywhere (issue 19: a public page,
zip or plot must never name one of the host's paths).

Every download (the Export tab's recipe and model, a study zip and its plots, a hub push) goes
through ``shareable_recipe`` / ``shareable``; messages through ``scrub_paths``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from prune.recipe import Recipe
from runtime.paths import CACHE_ENV, DATA_ENV

# an absolute path of two or more parts (its last part kept), or a bare top-level server folder
_PATH = re.compile(
    r"""(?<![\w.~-])(?:~|[A-Za-z]:)?[/\\](?:[^\s'"`,;:()\[\]{}<>]+[/\\])+([^\s'"`,;:()\[\]{}<>]*)"""
)
_ROOTS = re.compile(r"(?<![\w.~/-])/(?:data|root|home|tmp|srv|mnt|opt|var|usr|app|workspace)(?![/\w-]|\.\w)")
HIDDEN = "(server folder)"


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "~", ".", "\\")) or "\\" in name or name.count("/") > 1


def display(name: str) -> str:
    """A model as a visitor may see it: a folder by its last part, a hub id or alias as it is."""
    return Path(name).name if looks_like_path(name) else name


def host_folders() -> list[str]:
    """The host's cache and data folders as set (relative too) and resolved, longest first."""
    found = set()
    for variable in (CACHE_ENV, DATA_ENV):
        value = os.environ.get(variable)
        if value:
            found |= {value.rstrip("/\\"), str(Path(value).expanduser().resolve())}
    return sorted((f for f in found if len(f) > 1), key=len, reverse=True)


def scrub_paths(text: str) -> str:
    """Server paths in ``text`` -> their last part (``/srv/data/x.txt`` -> ``x.txt``); the host's
    cache and data folders and a bare ``/data`` or ``/root`` -> "(server folder)"."""
    for folder in host_folders():
        text = text.replace(folder, HIDDEN)
    text = _PATH.sub(lambda m: m.group(1) or HIDDEN, text)
    return _ROOTS.sub(HIDDEN, text)


def scrub(value):
    """``scrub_paths`` over every string (and dict key) of a JSON-like value."""
    return shareable(value, None, "")


def shareable(value, model: str | None, shown: str):
    """A JSON-like value (a run's result, a study's points) as it may leave the server: strings equal
    to the model's loaded name become ``shown``, every other string is ``scrub_paths``-ed."""
    if isinstance(value, str):
        return shown if model is not None and value == model else scrub_paths(value)
    if isinstance(value, dict):
        return {shareable(k, model, shown): shareable(v, model, shown) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shareable(v, model, shown) for v in value]
    return value


def shareable_recipe(recipe: Recipe, shown: str | None = None) -> Recipe:
    """The recipe with its model named ``shown`` (None: as it is) and uploaded files by their file
    name, not their path on this server (the CLI reads them from beside the recipe)."""

    def name(path: str | None) -> str | None:
        return Path(path).name if path and Path(path).is_absolute() else path

    calibration = dataclasses.replace(recipe.calibration, path=name(recipe.calibration.path))
    evaluation = dataclasses.replace(
        recipe.evaluation, datasets=tuple(name(d) for d in recipe.evaluation.datasets)
    )
    model = recipe.model if shown is None else shown
    return dataclasses.replace(recipe, model=model, calibration=calibration, evaluation=evaluation)
