"""What the person running the lab must ask for by name: a model's own code, and pickle weights.

A recipe file can come from anyone, so its ``trust_remote_code: true`` counts only with
``--trust-remote-code`` on the command line too; a checkpoint without safetensors (a
``pytorch_model.bin`` pickle, which can run code when read) loads only with ``--allow-pickle``,
and the app, whose visitors have no such switch, refuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, word_tokenizer

from cli import run as cli_run
from prune.errors import RecipeError
from prune.recipe import Recipe
from runtime.models import ModelLoadError
from ui.engine import Engine
from ui.hosting import Hosting


def pickle_folder(folder: Path):
    """A tiny random Llama written as config + ``pytorch_model.bin`` (no safetensors) + a
    word-level tokenizer: the kind of folder an old checkpoint comes as."""
    tiny = tiny_model("llama")
    folder.mkdir()
    tiny.model.config.save_pretrained(folder)
    torch.save(tiny.model.state_dict(), folder / "pytorch_model.bin")
    word_tokenizer().save_pretrained(folder)
    return tiny


def test_a_pickle_checkpoint_loads_only_when_asked_for(tmp_path, capsys):
    folder = tmp_path / "old-checkpoint"
    tiny = pickle_folder(folder)
    with pytest.raises(ModelLoadError, match="pickle.*--allow-pickle"):
        cli_run.info([str(folder), "--quiet", "--streaming", "off"])
    with pytest.raises(ModelLoadError, match="pickle"):  # the app has no switch for it
        Engine(device="cpu", hosting=Hosting.local()).load(str(folder))
    capsys.readouterr()

    assert cli_run.info([str(folder), "--quiet", "--streaming", "off", "--allow-pickle"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in tiny.model.parameters())


def recipe_file(folder: Path, trust: bool) -> str:
    path = folder / f"recipe-{trust}.yaml"
    Recipe(model="someone/their-model", trust_remote_code=trust).save(path)
    assert ("trust_remote_code: true" in path.read_text()) is trust  # the file really asks for it
    return str(path)


def test_a_recipe_file_alone_never_turns_on_remote_code(tmp_path):
    trusting = recipe_file(tmp_path, trust=True)
    with pytest.raises(RecipeError, match="trust_remote_code.*--trust-remote-code"):
        cli_run.build_recipe(cli_run.parser().parse_args(["--recipe", trusting]))

    asked = cli_run.build_recipe(cli_run.parser().parse_args(["--recipe", trusting, "--trust-remote-code"]))
    assert asked.trust_remote_code is True and asked.model == "someone/their-model"
    plain = cli_run.build_recipe(cli_run.parser().parse_args(["--recipe", recipe_file(tmp_path, False)]))
    assert plain.trust_remote_code is False
