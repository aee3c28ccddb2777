"""The command line end to end on the real SmolLM2, and its answers to bad input."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

QUICK = ["--nsamples", "8", "--seqlen", "128", "--eval-seqlen", "256", "--max-windows", "2"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prune", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def zeros_of(folder) -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "model.safetensors"))
    return {k: v == 0 for k, v in weights.items() if k.endswith("proj.weight")}


@pytest.mark.model
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

    # beside the JSON, a summary for a person on stderr: per role asked, achieved, pruned weights
    summary = {line.split()[0]: line.split()[1:] for line in out.stderr.splitlines() if line.strip()}
    for role, r in report["roles"].items():
        assert summary[role] == ["50.00%", "50.00%", f"{r['pruned']:,}"]
    dense, pruned_ppl = ppl["dense"]["perplexity"], ppl["pruned"]["perplexity"]
    assert f"perplexity wikitext2: {dense:.3f} -> {pruned_ppl:.3f}" in out.stderr

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


# the run of issue 16: layers streamed (600 MB), sequential statistics, saved layer by layer
STREAMED = [
    "--model",
    "smollm2-135m-instruct",
    "--sparsity",
    "all=0.5",
    "--stats",
    "sequential",
    "--calibration",
    "c4",
    "--nsamples",
    "4",
    "--seqlen",
    "128",
    "--eval",
    "wikitext2",
    "--max-windows",
    "2",
    "--eval-seqlen",
    "256",
    "--no-dense",
    "--max-memory",
    "cpu=600MB",
]


@pytest.fixture(scope="module")
def in_memory_pruned(smollm2):
    """The same recipe and calibration as STREAMED, pruned in memory: the weights a save holds."""
    from evaluation.lab import Lab
    from prune.recipe import CalibrationSpec, Recipe, parse_sparsity

    lab = Lab(smollm2)
    calibration = CalibrationSpec(source="c4", nsamples=4, seqlen=128)
    recipe = Recipe(
        model="smollm2-135m-instruct",
        stats_mode="sequential",
        calibration=calibration,
        sparsity=parse_sparsity("all=0.5"),
    )
    with lab.using(lab.prune(recipe).state) as model:
        weights = {name: t.clone() for name, t in model.state_dict().items()}
    lab.restore()
    return weights


@pytest.mark.model
@pytest.mark.parametrize("quantize", [[], ["--quantize", "nf4"]], ids=["fp32", "nf4"])
def test_a_streamed_run_saves_what_from_pretrained_loads(quantize, in_memory_pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "out"
    out = cli(*STREAMED, *quantize, "--save", str(folder))
    result = json.loads(out.stdout)  # the JSON result, on stdout
    assert "streamed" in out.stderr.split("\n")[0]  # the memory plan, shown first
    assert result["perplexity"]["wikitext2"]["pruned"]["windows"] == 2
    assert ("quantized" in result) == bool(quantize)
    assert "meta device" not in out.stderr
    updates = [part.strip() for part in re.split(r"[\r\n]", out.stderr) if part.strip()]
    assert all(a != b for a, b in itertools.pairwise(updates)), "a progress line printed twice"
    assert f"saved the pruned model to {folder}" in out.stderr
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    saved = model.state_dict()
    assert saved.keys() == in_memory_pruned.keys()
    assert all(torch.equal(saved[k], in_memory_pruned[k]) for k in saved)  # zeros and kept weights
    zeros = sum(int((t == 0).sum()) for k, t in saved.items() if k.endswith("proj.weight"))
    assert zeros == result["prune"]["report"]["pruned"]


@pytest.mark.model
def test_a_save_that_cannot_be_written_is_one_line_and_the_result_is_still_printed(tmp_path):
    from tiny import save_tiny_chat_model

    model = save_tiny_chat_model(tmp_path / "model")
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "out"
    result = cli(
        "--model",
        str(model),
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--eval",
        "wikitext2",
        "--max-windows",
        "1",
        "--eval-seqlen",
        "32",
        "--quiet",
        "--save",
        str(target),
        check=False,
    )
    assert_user_error(result, f"cannot save the model to {target}: {tmp_path / 'file'} is a file")
    output = json.loads(result.stdout)
    assert output["perplexity"]["wikitext2"]["pruned"]["windows"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]


@pytest.mark.model
def test_info_lists_roles():
    out = json.loads(cli("info", "smollm2-135m-instruct").stdout)
    assert out["architecture"] == "llama" and out["layers"] == 30
    assert out["role_modules"]["o"] == ["model.layers.{i}.self_attn.o_proj"]
    assert sum(out["role_parameters"].values()) == 106168320


RECIPE_FILES = {
    "bad.json": '{"method": "wanda", ',
    "bad.yaml": "sparsity: {all: 0.5\nmethod: [wanda",
    "list.yaml": "- wanda\n- 0.5\n",
    "unknown.yaml": "method: wanda\nsparsty: {all: 0.5}\n",
    "unknown-calibration.json": '{"calibration": {"samples": 8}}',
    "method.json": '{"method": "obc"}',
    "fraction.yaml": "sparsity: {all: 1.5}\n",
    "nsamples.yaml": "calibration: {nsamples: many}\n",
    "layers.json": '{"layers": [5, 2]}',
}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "q=1.5"], "fraction in [0, 1]"),
        (["--sparsity", "zz=0.5"], "unknown role 'zz'"),
        (["--structure", "4:4"], "0 < N < M"),
        (["--structure", "8:4"], "0 < N < M"),
        (["--eval", "nowhere.txt"], "not wikitext2, c4 or an existing file"),
        (["--method", "obc"], "invalid choice: 'obc'"),
        (["--stats", "later"], "invalid choice: 'later'"),
        (["--nsamples", "many"], "invalid int value: 'many'"),
        (["--recipe", "missing.yaml"], "recipe file not found"),
        (["--recipe", "TMP/bad.json"], "is not valid json"),
        (["--recipe", "TMP/bad.yaml"], "is not valid YAML"),
        (["--recipe", "TMP/list.yaml"], "does not hold a recipe mapping"),
        (["--recipe", "TMP/unknown.yaml"], "unknown recipe fields: sparsty"),
        (["--recipe", "TMP/unknown-calibration.json"], "unknown calibration fields: samples"),
        (["--recipe", "TMP/method.json"], "unknown method 'obc'"),
        (["--recipe", "TMP/fraction.yaml"], "fraction in [0, 1]"),
        (["--recipe", "TMP/nsamples.yaml"], "calibration nsamples must be a whole number"),
        (["--recipe", "TMP/layers.json"], "0 <= start < end"),
        (["--calibration-ids", "missing-ids.st"], "calibration ids file not found"),
        (["study", "single", "--windows", "-1"], "--windows must be >= 0"),
        (["study", "sideways"], "invalid choice: 'sideways'"),
        (["info", "--dtype"], "expected one argument"),
    ],
)
def test_bad_input_ends_in_one_line_and_exit_2(args, message, tmp_path):
    assert_user_error(bad_run(args, tmp_path), message)


@pytest.mark.model
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-org/no-such-model-xyz"], "could not load model"),
        (["--calibration", "TMP/short.txt", "--nsamples", "4", "--seqlen", "128"], "too short for 4 x 128"),
    ],
)
def test_errors_after_loading_end_in_exit_2(args, message, tmp_path):
    """Past the model load, the libraries it uses may have written to stderr (the hub's retries,
    weight-loading bars); the error is still one line, the last, and the exit code 2."""
    assert_user_error(bad_run(args, tmp_path), message, alone=False)


def bad_run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python -m prune ARGS`` with TMP/... naming the bad inputs written here (runs: quiet,
    no evaluation unless asked)."""
    (tmp_path / "short.txt").write_text("Only a few words here.")
    for name, text in RECIPE_FILES.items():
        (tmp_path / name).write_text(text)
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    if args[0] not in ("study", "info"):
        args += ["--quiet", *([] if "--eval" in args else ["--eval", "none"])]
    return cli(*args, check=False)


def assert_user_error(result: subprocess.CompletedProcess, message: str, alone: bool = True) -> None:
    """Exit code 2 and one line ``error: ...`` on stderr (``alone``: and nothing else); no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr[-2000:]
    assert message in lines[-1]
    if alone:
        assert len(lines) == 1, result.stderr[-2000:]


def test_study_refuses_a_folder_made_with_other_settings(tmp_path):
    from evaluation.studies import StudyResult, StudySettings, save_study

    out = tmp_path / "study"
    save_study(StudyResult(StudySettings("single", windows=3), {}), out)
    before = (out / "points.json").read_text()
    result = cli("study", "single", "--windows", "4", "--out", str(out), "--quiet", "--no-plots", check=False)
    assert_user_error(result, "holds a study made with other settings")
    assert (out / "points.json").read_text() == before


def test_summary_lines():
    from cli.run import summary

    role = {"params": 1000, "pruned": 500, "requested": 0.5, "sparsity": 0.5}
    output = {
        "prune": {
            "report": {
                "roles": {"q": role, "down": {**role, "pruned": 0, "requested": 0.0, "sparsity": 0.0}},
                "pruned": 500,
                "linear_sparsity": 0.25,
                "total_sparsity": 0.125,
            }
        },
        "perplexity": {"wikitext2": {"pruned": {"perplexity": 30.5}}},
        "tasks": {"rows": [{"task": "mean", "metric": "acc", "dense": 0.6, "pruned": 0.55}]},
    }
    lines = summary(output)
    assert re.split(r"\s+", lines[1]) == ["q", "50.00%", "50.00%", "500"]
    assert re.split(r"\s+", lines[2]) == ["down", "0.00%", "0.00%", "0"]
    assert "25.00%" in lines[3] and "12.50% of all parameters" in lines[3]
    assert lines[4] == "perplexity wikitext2: 30.500 (pruned; dense not evaluated)"
    assert lines[5] == "tasks mean acc: 0.6000 -> 0.5500"


def test_importing_prune_never_imports_the_command_line():
    code = "import prune.__main__, sys; print(any(m == 'cli' or m.startswith('cli.') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "False", out.stderr
