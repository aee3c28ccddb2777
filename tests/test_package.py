"""The package: ``pip install .`` into a fresh venv, then the one console command, ``pruning-lab``,
answers --help, starts the app on loopback (one HTTP request answered) and runs a CLI prune.

The venv sees this machine's packages (``--system-site-packages``, so torch and the rest are not
fetched again; ``--no-index`` makes sure of it) and is made without pip and setuptools of its own,
so the system's pip builds with the system's setuptools (``--no-build-isolation``). A copy of the
project is installed, so the build's ``build/`` and ``*.egg-info`` never land in the checkout; every
command runs outside the checkout, so what it imports is the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pyproject.toml", "requirements.txt", "README.md", "LICENSE", "app.py")
PACKAGES = ("prune", "runtime", "evaluation", "ui", "cli")


def environment() -> dict[str, str]:
    """This test's environment (its cache, the offline data) without a path into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the project installed from a copy of it; its folder holds the copy."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in PROJECT:
        shutil.copy2(ROOT / name, source / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root / "venv")],
        check=True,
    )
    # Run from a venv, --system-site-packages reaches the base interpreter's packages, not the venv's
    # (the lowest-torch run does that): a .pth line adds the running interpreter's own.
    (site_packages,) = (root / "venv" / "lib").glob("python3*/site-packages")
    (site_packages / "running.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = root / "venv" / "bin" / "python"
    install = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-build-isolation",
        "--quiet",
        str(source),
    ]
    result = subprocess.run(install, capture_output=True, text=True, cwd=root, env=environment())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return root / "venv"


def command(venv: Path, *args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "pruning-lab"), *args],
        capture_output=True,
        text=True,
        cwd=venv.parent,
        env=environment(),
        timeout=300,
        **options,
    )


def test_the_install_puts_the_project_in_the_venv_and_the_command_answers_help(venv):
    site = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import app, cli, prune, ui; print(app.__file__, prune.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=venv.parent,
        env=environment(),
        check=True,
    )
    assert all(Path(path).is_relative_to(venv) for path in site.stdout.split())
    (dist_info,) = (venv / "lib").glob("python3*/site-packages/pruning_lab-*.dist-info")
    top_level = set((dist_info / "top_level.txt").read_text().split())
    assert top_level == {"app", *PACKAGES}  # the generic names a later rename would nest (README)
    assert "License-Expression: Apache-2.0" in (dist_info / "METADATA").read_text()
    tasks = dist_info.parent / "evaluation" / "lm_eval_tasks"
    assert len(list(tasks.glob("*.yaml"))) == 7  # package data: the offline task definitions

    overview = command(venv, "--help")
    assert overview.returncode == 0
    assert [line.split()[0] for line in overview.stdout.splitlines()[3:]] == ["app", "run", "study", "info"]
    app_help = command(venv, "app", "--help")
    assert app_help.returncode == 0 and app_help.stdout.startswith("usage: pruning-lab app")
    assert "--public" in app_help.stdout and "$PRUNING_LAB_PUBLIC" in app_help.stdout
    assert command(venv, "run", "--help").stdout.startswith("usage:")
    assert command(venv, "nonsense").returncode == 2
    module = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "prune", "--help"],
        capture_output=True,
        text=True,
        cwd=venv.parent,
    )
    assert module.returncode == 0 and "--sparsity" in module.stdout  # python -m prune still works


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from tiny import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_command_starts_the_app_on_loopback(venv, tiny_folder, tmp_path):
    port = free_port()
    args = ["app", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--model", str(tiny_folder)]
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen(
        [str(venv / "bin" / "pruning-lab"), *args],
        cwd=venv.parent,
        env=environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        page = None
        deadline = time.monotonic() + 300
        while page is None and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = (response.status, response.read().decode(errors="replace"))
            except OSError:
                time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert page is not None, (tmp_path / "app.log").read_text()[-3000:]
    assert page[0] == 200 and "Pruning lab" in page[1]


def test_the_command_runs_a_cli_prune(venv, tiny_folder, tmp_path, data_dir):
    saved = tmp_path / "pruned"
    quick = [
        "--nsamples",
        "2",
        "--seqlen",
        "64",
        "--eval",
        "wikitext2",
        "--eval-seqlen",
        "64",
        "--max-windows",
        "1",
    ]
    run = ["run", "--model", str(tiny_folder), "--device", "cpu", "--sparsity", "all=0.5", *quick]
    result = command(venv, *run, "--quiet", "--save", str(saved))
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    assert output["prune"]["report"]["linear_sparsity"] == pytest.approx(0.5)
    assert output["perplexity"]["wikitext2"]["pruned"]["windows"] == 1
    weights = load_file(str(saved / "model.safetensors"))
    pruned = {name: w for name, w in weights.items() if name.endswith("proj.weight")}
    assert len(pruned) == 2 * 7  # two layers, seven roles
    for name, weight in pruned.items():  # Wanda: half of every output row is zero
        zeros = (weight == 0).sum(dim=1)
        assert torch.equal(zeros, torch.full_like(zeros, weight.shape[1] // 2)), name
