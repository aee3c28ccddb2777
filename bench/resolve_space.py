"""Does a Hugging Face Space resolve ``requirements.txt``? pip's resolver, dry run, as a Space sees it.

    python bench/resolve_space.py --out bench/results/space_resolve.txt

For each Python a Space offers (3.10, ZeroGPU's; 3.12) on manylinux x86_64, binary wheels only,
pip resolves the Space list once freely (what a CUDA Space installs) and once with torch held to
each given version (what ZeroGPU does: it installs a torch of its own list and fails the build when
the requirements admit none of it). This machine's pip settings (config files, ``PIP_*`` variables:
the local wheel folder, the local indexes, the torch cap) are left out and PyPI is the only index,
so the answer is PyPI's. A few of lm-eval's dependencies (sqlitedict, rouge-score, word2number) are
sdists only: a Space builds them, a resolver restricted to another Python and platform cannot, so
they are built here first into pure-Python wheels (refused if any is not ``py3-none-any``) that the
dry runs take as local files; everything else is PyPI's binary wheels. pip reads wheel metadata
alone where PyPI serves it apart (PEP 658), else it downloads the wheel: it needs PyPI and takes
minutes, so it is not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.12")
# None: free. 2.6.0: the range's floor. 2.8.0 / 2.11.0: the newest of ZeroGPU's list in the hub
# docs and in its later releases.
TORCH_PINS = (None, "2.6.0", "2.8.0", "2.11.0")
GLIBC = 28  # torch's wheels are manylinux_2_28; resolving under it holds on any newer Space image


@dataclass(frozen=True)
class Resolution:
    python: str
    torch_pin: str | None
    ok: bool
    packages: dict[str, str]  # name -> version, as pip would install them
    error: str
    seconds: float

    def lines(self) -> list[str]:
        pin = f"torch=={self.torch_pin}" if self.torch_pin else "none"
        head = f"## Python {self.python}, constraint {pin}: {'OK' if self.ok else 'FAIL'}"
        if not self.ok:
            return [head, f"  {self.error}", ""]
        body = [f"  {name}=={version}" for name, version in sorted(self.packages.items())]
        torch = self.packages.get("torch", "-")
        return [f"{head}, torch {torch}, {len(self.packages)} packages, {self.seconds:.0f} s", *body, ""]


def platforms(glibc: int) -> list[str]:
    """Every manylinux tag a glibc-2.<glibc> x86_64 host takes (pip does not expand the new names)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def pip_environment() -> dict[str, str]:
    """This process's environment without pip's local settings (config files, PIP_* variables)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no config file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if os.environ.get("PIP_CERT"):  # the machine's CA bundle, if it needs one to reach PyPI
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    return env


PIP = [sys.executable, "-m", "pip"]
DRY_RUN = [
    *PIP,
    "install",
    "--dry-run",
    "--ignore-installed",
    "--quiet",
    "--index-url",
    "https://pypi.org/simple",
]


def pure_wheels(requirements: Path, work: Path) -> list[str]:
    """Build the sdist-only packages the list pulls in (this Python, sdists allowed) into work/wheels."""
    report = work / "report-sdists.json"
    done = subprocess.run(
        [*DRY_RUN, "--report", str(report), "-r", str(requirements)],
        capture_output=True,
        text=True,
        env=pip_environment(),
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"resolving on this Python failed: {done.stderr[-1500:]}")
    install = json.loads(report.read_text())["install"]
    urls = [item["download_info"]["url"] for item in install]
    sdists = [url for url in urls if not url.endswith(".whl")]
    wheels = work / "wheels"
    for url in sdists:
        build = [*PIP, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), url]
        subprocess.run(build, check=True, env=pip_environment(), cwd=work)
    built = sorted(path.name for path in wheels.glob("*.whl")) if sdists else []
    impure = [name for name in built if not name.endswith("-py3-none-any.whl")]
    if impure:
        raise SystemExit(f"sdists that build platform wheels cannot be checked this way: {impure}")
    return built


def resolve(requirements: Path, python: str, torch_pin: str | None, glibc: int, work: Path) -> Resolution:
    report = work / f"report-{python}-{torch_pin or 'free'}.json"
    command = [*DRY_RUN, "--find-links", str(work / "wheels"), "--target", str(work / "target")]
    command += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for tag in platforms(glibc):
        command += ["--platform", tag]
    command += ["--report", str(report), "-r", str(requirements)]
    if torch_pin:
        constraint = work / f"torch-{torch_pin}.txt"
        constraint.write_text(f"torch=={torch_pin}\n")
        command += ["-c", str(constraint)]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=pip_environment(), cwd=ROOT)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or [done.stderr]
        return Resolution(python, torch_pin, False, {}, " | ".join(errors)[-1500:], seconds)
    install = json.loads(report.read_text())["install"]
    packages = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in install}
    return Resolution(python, torch_pin, True, packages, "", seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    parser.add_argument("--python", nargs="+", default=list(PYTHONS))
    parser.add_argument(
        "--torch", nargs="+", default=[pin or "free" for pin in TORCH_PINS], help="versions, or 'free'"
    )
    parser.add_argument("--glibc", type=int, default=GLIBC, help="the image's glibc minor (2.<N>)")
    parser.add_argument("--out", type=Path, help="write the summary here too")
    args = parser.parse_args()
    pins = [None if pin == "free" else pin for pin in args.torch]
    pip = subprocess.run([*PIP, "--version"], capture_output=True, text=True)
    lines = [
        f"# pip's resolver, dry run, for {args.requirements.name} as a Space sees it",
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {pip.stdout.split(' from ')[0]}; "
        f"index https://pypi.org/simple only; --only-binary=:all:; cp; manylinux_2_{args.glibc}_x86_64 "
        "and older tags",
        "# command: python bench/resolve_space.py --out bench/results/space_resolve.txt",
        "",
    ]
    results = []
    with tempfile.TemporaryDirectory() as work:
        built = pure_wheels(args.requirements, Path(work))
        lines[3:3] = [f"# built here from sdists (pure Python, as a Space builds them): {', '.join(built)}"]
        for python in args.python:
            for pin in pins:
                result = resolve(args.requirements, python, pin, args.glibc, Path(work))
                results.append(result)
                print(*result.lines()[:1], flush=True)
                lines += result.lines()
    summary = [
        f"{'OK  ' if r.ok else 'FAIL'} python {r.python} torch {r.packages.get('torch', '-')}"
        f" (constraint {'torch==' + r.torch_pin if r.torch_pin else 'none'})"
        for r in results
    ]
    lines[5:5] = ["# summary", *summary, ""]
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
    print("\n".join(summary))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
