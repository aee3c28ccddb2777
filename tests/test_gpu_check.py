"""The GPU check script's dry run: the same parts, on the CPU with tiny shapes, end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_part_it_has_inputs_for(smollm2, data_dir, tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    parts = {row["part"]: row for row in json.loads((out / "summary.json").read_text())["parts"]}
    assert list(parts) == ["gpu_tests", "prune_7b", "speed_24", "structured", "stream_13b", "tasks"]
    skipped = {name: row["status"] for name, row in parts.items() if row["status"] != "ok"}
    assert not skipped, skipped
    assert "masks equal to baseline: 1.000000" in (out / "prune_7b.txt").read_text()
    assert "needs an NVIDIA GPU" in (out / "speed_24.txt").read_text()
    assert "| random:tiny |" in (out / "stream_13b.txt").read_text()
    assert (out / "structured.md").read_text().count("same logits as the lab's pruned model") == 2
    wanda = json.loads((out / "tasks_wanda50.json").read_text())
    sparsegpt = json.loads((out / "tasks_sparsegpt50.json").read_text())
    tasks = {"rte", "boolq"}
    assert set(wanda["tasks"]["dense"]["tasks"]) == set(wanda["tasks"]["pruned"]["tasks"]) == tasks
    assert set(sparsegpt["tasks"]["pruned"]["tasks"]) == tasks and sparsegpt["tasks"]["dense"] is None
    assert sparsegpt["recipe"]["method"] == "sparsegpt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_skips_a_part_without_its_inputs_and_says_why(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--out",
            str(out),
            "--parts",
            "prune_7b,tasks",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((out / "summary.json").read_text())["parts"]
    assert [r["status"] for r in rows] == ["skipped: no CUDA device", "skipped: no CUDA device"]
