"""The two requirement lists agree with each other and with what a Space offers (docs/hosting.md).

What PyPI resolves is checked by bench/resolve_space.py (it needs PyPI); here, without a network:
the local list is the Space list plus pins inside its ranges, the Space's torch range admits
ZeroGPU's torch versions and the lowest torch the suite was run on, and the front matter's
Python is one ZeroGPU offers and the package accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
ZERO_GPU_TORCH = ("2.8.0", "2.9.0", "2.10.0", "2.11.0")  # the newest of its list (hub docs, later)
ZERO_GPU_PYTHON = ("3.10", "3.12")


def requirements(name: str) -> tuple[list[str], dict[str, Requirement]]:
    """The file's -r includes and its requirements by name (comments and blank lines dropped)."""
    includes, found = [], {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            includes.append(line[3:].strip())
        elif line:
            requirement = Requirement(line)
            found[requirement.name] = requirement
    return includes, found


def test_the_local_list_is_the_space_list_with_pins_inside_its_ranges():
    includes, local = requirements("requirements-local.txt")
    _, space = requirements("requirements.txt")
    assert includes == ["requirements.txt"]
    assert requirements("requirements-dev.txt")[0] == ["requirements-local.txt"]
    assert local, "the local list pins nothing"
    for name, pin in local.items():
        (exact,) = pin.specifier
        assert exact.operator == "=="
        assert space[name].specifier.contains(exact.version), (name, str(space[name].specifier))


def test_the_space_torch_range_admits_zero_gpu_and_the_recorded_lowest_torch():
    torch = requirements("requirements.txt")[1]["torch"].specifier
    assert [v for v in ZERO_GPU_TORCH if torch.contains(v)], str(torch)
    recorded = (ROOT / "bench/results/lowest_torch.txt").read_text()
    lowest = re.search(r"^torch (\S+)", recorded, re.MULTILINE).group(1)
    floor = min(Version(s.version) for s in torch if s.operator == ">=")
    assert Version(lowest) == floor  # the suite ran on the range's floor


def test_the_front_matter_python_is_one_zero_gpu_offers_and_the_package_accepts():
    front = (ROOT / "README.md").read_text().split("---")[1]
    python = re.search(r'^python_version: "([\d.]+)"$', front, re.MULTILINE).group(1)
    assert python in ZERO_GPU_PYTHON
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib: the suite runs on Python 3.10 too
    accepted = re.search(r'^requires-python = "([^"]+)"$', pyproject, re.MULTILINE).group(1)
    assert SpecifierSet(accepted).contains(python + ".0")
