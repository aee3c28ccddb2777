"""The command line end to end on the real SmolLM2, and its answers to bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.model

QUICK = ["--nsamples", "8", "--seqlen", "128", "--eval-seqlen", "256", "--max-windows", "2", "--quiet"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prune", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def zeros_of(folder) -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "model.safetensors"))
    return {k: v == 0 for k, v in weights.items() if k.endswith("proj.weight")}


def test_prune_evaluate_save_and_reproduce(tmp_path, smollm2):
    first = tmp_path / "first"
    out = cli(
        "--model",
        "smollm2-135m-instruct",
        "--sparsity",
        "all=0.5",
        "--method",
        "wanda",
        "--eval",
        "wikitext2",
        "--stats",
        "cached",
        *QUICK,
        "--save",
        str(first),
        "--save-recipe",
        str(tmp_path / "recipe.yaml"),
        "--save-calibration",
        str(tmp_path / "ids.st"),
    )
    result = json.loads(out.stdout)
    ppl = result["perplexity"]["wikitext2"]
    assert 1 < ppl["dense"]["perplexity"] < ppl["pruned"]["perplexity"]
    assert ppl["pruned"]["windows"] == 2 and ppl["pruned"]["tokens"] == 512
    report = result["prune"]["report"]
    assert report["linear_sparsity"] == pytest.approx(0.5)
    assert all(r["sparsity"] == pytest.approx(0.5) for r in report["roles"].values())
    assert result["model"]["role_parameters"]["down"] == 26542080
    saved = zeros_of(first)
    assert len(saved) == 210
    pruned = sum(int(z.sum()) for z in saved.values())
    assert pruned == report["pruned"]

    # the saved recipe and calibration ids reproduce the same zeros
    second = tmp_path / "second"
    cli(
        "--recipe",
        str(tmp_path / "recipe.yaml"),
        "--calibration-ids",
        str(tmp_path / "ids.st"),
        "--eval",
        "none",
        "--quiet",
        "--save",
        str(second),
    )
    again = zeros_of(second)
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_info_lists_roles():
    out = json.loads(cli("info", "smollm2-135m-instruct").stdout)
    assert out["architecture"] == "llama" and out["layers"] == 30
    assert out["role_modules"]["o"] == ["model.layers.{i}.self_attn.o_proj"]
    assert sum(out["role_parameters"].values()) == 106168320


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-org/no-such-model-xyz"], "could not load model"),
        (["--sparsity", "q=1.5"], "fraction in [0, 1]"),
        (["--sparsity", "zz=0.5"], "unknown role 'zz'"),
        (["--structure", "4:4"], "0 < N < M"),
        (["--structure", "8:4"], "0 < N < M"),
        (["--eval", "nowhere.txt"], "not wikitext2, c4 or an existing file"),
        (["--calibration", "TOO_SHORT", "--nsamples", "4", "--seqlen", "128"], "too short for 4 x 128"),
        (["--recipe", "missing.yaml"], "recipe file not found"),
    ],
)
def test_bad_input_gets_a_message_not_a_traceback(args, message, tmp_path):
    args = [str(tmp_path / "short.txt") if a == "TOO_SHORT" else a for a in args]
    (tmp_path / "short.txt").write_text("Only a few words here.")
    result = (
        cli(*args, "--eval", "none", "--quiet", check=False)
        if "--eval" not in args
        else cli(*args, "--quiet", check=False)
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
