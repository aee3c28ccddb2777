"""Everything that needs a GPU, in one call that fits a lent device's minutes (9 by default).

    python bench/gpu_check.py --data-dir DATA --out bench/results/gpu     # on the lent GPU
    python bench/gpu_check.py --dry-run --out /tmp/gpu-dry                # CPU, tiny shapes (CI)

Parts, most valuable first: the GPU tests, cached re-prune and sequential Wanda on the LLaMA-2-7B
shape against the reference loop, 2:4 speed, structured speed, the streamed 13B-shape row of
bench_big, and the seven tasks on their full splits for SmolLM2 dense / Wanda-50 / SparseGPT-50.
Every part's inputs are checked before anything runs; a part whose inputs are missing, or that
would not fit the time left, is skipped with the reason, and one part failing does not stop the
next. Each part's output goes to ``OUT/<part>.txt``; ``OUT/summary.json`` and ``summary.txt`` say
what ran, how long it took and how it ended. ``--dry-run`` runs the same parts on the CPU with tiny
shapes, so the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.models import DEFAULT_MODEL  # noqa: E402

PY = sys.executable
GIB = 2**30


@dataclass(frozen=True)
class Part:
    name: str
    seconds: int  # the most this part may take on the GPU
    needs: tuple[str, ...]  # input checks, see CHECKS
    commands: Callable[[argparse.Namespace], list[list[str]]]
    disk_gib: float = 0  # free disk the part writes (random weights)


def _prune_7b(a: argparse.Namespace) -> list[list[str]]:
    shape, n, L = ("tiny", "2", "64") if a.dry_run else ("llama-2-7b", "128", "2048")
    return [
        [PY, "bench/bench_prune.py", "--random", shape, "--device", a.device, "--nsamples", n, "--seqlen", L]
    ]


def _speed_24(a: argparse.Namespace) -> list[list[str]]:
    if a.dry_run:  # on the CPU the script says 2:4 is not supported and exits 0
        return [[PY, "bench/bench_24.py", "--random", "tiny", "--nsamples", "2", "--seqlen", "64"]]
    return [
        [
            PY,
            "bench/bench_24.py",
            "--random",
            "llama-2-7b",
            "--prefill",
            "8x2048",
            "--decode-batches",
            "1,16,64",
        ]
    ]


def _structured(a: argparse.Namespace) -> list[list[str]]:
    if a.dry_run:
        size = ["--models", "random:tiny", "--target", "0.02", "--nsamples", "2", "--seqlen", "64"]
        size += ["--prompt", "16", "--new-tokens", "2", "--repeats", "1", "--windows", "1"]
        size += ["--eval-seqlen", "64"]
    else:
        size = ["--models", "random:llama-1b", "--dtype", "bfloat16", "--nsamples", "32", "--seqlen", "512"]
        size += ["--prompt", "2048", "--new-tokens", "64", "--windows", "4"]
    return [
        [PY, "bench/bench_structured.py", "--device", a.device, *size, "--out", str(a.out / "structured.md")]
    ]


def _stream_13b(a: argparse.Namespace) -> list[list[str]]:
    if a.dry_run:
        shape, dtype, n, L, w = "random:tiny", "float32", "2", "64", "1"
    else:
        shape, dtype, n, L, w = "random:llama2-13b", "bfloat16", "128", "2048", "8"
    flags = ["--device", a.device, "--dtype", dtype, "--nsamples", n, "--seqlen", L, "--windows", w]
    return [[PY, "bench/bench_big.py", "--models", shape, "--placements", "off,disk", *flags]]


def _tasks(a: argparse.Namespace) -> list[list[str]]:
    if a.dry_run:  # two small tasks: building all seven reads every split (a minute on a CPU)
        size = ["--tasks", "rte,boolq", "--limit", "2", "--nsamples", "2", "--seqlen", "64"]
    else:
        size = ["--tasks", "all7", "--nsamples", "128"]
    common = [PY, "-m", "prune", "--sparsity", "all=0.5", "--eval", "none", *size]
    common += ["--device", a.device, "--output"]
    return [
        [*common, str(a.out / "tasks_wanda50.json"), "--method", "wanda"],  # dense and Wanda-50
        [*common, str(a.out / "tasks_sparsegpt50.json"), "--method", "sparsegpt", "--no-dense"],
    ]


PARTS = (
    Part(
        "gpu_tests",
        60,
        ("cuda",),
        lambda a: [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]],
    ),
    Part("prune_7b", 120, ("cuda",), _prune_7b),
    Part("speed_24", 60, ("cuda",), _speed_24),
    Part("structured", 90, ("cuda", "model", "data:c4", "data:wikitext2"), _structured, disk_gib=5),
    Part("stream_13b", 150, ("cuda", "model", "data:c4", "data:wikitext2"), _stream_13b, disk_gib=30),
    Part("tasks", 150, ("cuda", "model", "data:c4", "data:tasks"), _tasks),
)

DATA_FILES = {
    "c4": ("c4/c4_en_train00000_first1000.jsonl", "c4/c4-train.00000-of-01024.json.gz"),
    "wikitext2": ("wikitext-2-raw-v1/test.jsonl",),
    "tasks": ("zeroshot/boolq_validation.jsonl", "zeroshot/hellaswag_validation.jsonl"),
}


def offline_model_present() -> bool:
    """The default model loads with no network: converted in the cache, or its package at hand."""
    from runtime.models import OFFLINE_MODELS, converted_folder
    from runtime.paths import cache_dir

    spec = OFFLINE_MODELS[DEFAULT_MODEL]
    if converted_folder(DEFAULT_MODEL) or importlib.util.find_spec(spec.module):
        return True
    return (cache_dir("packages", spec.alias) / spec.module).is_dir()


def missing(need: str, a: argparse.Namespace) -> str | None:
    """Why an input of a part is not there (None: it is)."""
    if need == "cuda":
        if a.dry_run:
            return None
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    if need == "model":
        return None if offline_model_present() else f"{DEFAULT_MODEL} is neither converted nor installed here"
    if need.startswith("data:"):
        if a.data_dir is None:
            return "no --data-dir (and no $PRUNING_LAB_DATA)"
        files = DATA_FILES[need.split(":", 1)[1]]
        if not any((a.data_dir / f).exists() for f in files):
            return f"{' or '.join(files)} not in the data folder"
        return None
    raise ValueError(f"unknown check {need!r}")


def skip_reason(part: Part, a: argparse.Namespace, left: float) -> str | None:
    for need in part.needs:
        if why := missing(need, a):
            return why
    free = shutil.disk_usage(a.out).free / GIB
    if not a.dry_run and free < part.disk_gib:
        return f"needs {part.disk_gib:.0f} GiB free disk, {free:.0f} GiB left"
    if left < min(part.seconds, 30):
        return f"{left:.0f} s left of the budget"
    return None


def run_part(part: Part, a: argparse.Namespace, deadline: float) -> dict:
    """Run a part's commands in order, its output into OUT/<part>.txt, within its time."""
    started = time.monotonic()
    limit = min(part.seconds * (5 if a.dry_run else 1), deadline - started)
    log = a.out / f"{part.name}.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if a.data_dir is not None:
        env["PRUNING_LAB_DATA"] = str(a.data_dir)
    status = "ok"
    with log.open("w") as out:
        for command in part.commands(a):
            out.write("$ " + " ".join(command[1:]) + "\n")
            out.flush()
            left = limit - (time.monotonic() - started)
            try:
                rc = subprocess.run(
                    command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=left
                ).returncode
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
                break
            if rc != 0:
                status = f"failed (exit {rc})"
                break
    return {
        "part": part.name,
        "status": status,
        "seconds": round(time.monotonic() - started, 1),
        "output": log.name,
    }


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(f"{row['part']:<12} {row['status']:<40} {row.get('seconds', 0):>7.1f} s", flush=True)

    def write(self, out: Path, header: str) -> None:
        (out / "summary.json").write_text(
            json.dumps({"setting": header, "parts": self.rows}, indent=2) + "\n"
        )
        lines = [header] + [
            f"{r['part']:<12} {r['status']:<40} {r.get('seconds', 0):>7.1f} s" for r in self.rows
        ]
        (out / "summary.txt").write_text("\n".join(lines) + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("PRUNING_LAB_DATA") or None)
    p.add_argument("--budget-s", type=float, default=540, help="the whole call's time (9 min)")
    p.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma list, in the order above")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, no figures")
    a = p.parse_args(argv)
    a.device = "cpu" if a.dry_run else "cuda"
    a.data_dir = Path(a.data_dir).resolve() if a.data_dir else None
    unknown = set(a.parts.split(",")) - {part.name for part in PARTS}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {[part.name for part in PARTS]}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.budget_s
    chosen = a.parts.split(",")
    report = Report()
    where = "dry run (CPU, tiny shapes)" if a.dry_run else f"on {a.device}"
    header = f"gpu_check {where}; budget {a.budget_s:.0f} s"
    print(header)
    for part in (p for p in PARTS if p.name in chosen):
        why = skip_reason(part, a, deadline - time.monotonic())
        report.add({"part": part.name, "status": f"skipped: {why}"} if why else run_part(part, a, deadline))
        report.write(a.out, header)  # after every part, so a killed call still leaves what ran
    return 0 if all(not r["status"].startswith(("failed", "timed")) for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
