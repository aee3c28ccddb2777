"""The layout is the architecture: front ends -> evaluation -> runtime -> prune, no cycles, one door.

These tests read the source (and import prune.* in a fresh interpreter); they load no model.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prune", "runtime", "evaluation", "ui", "cli")
LAYER = {
    "prune": 0,
    "runtime": 1,
    "evaluation": 2,
    "ui": 3,
    "cli": 3,
    "app": 4,
}  # a module imports lower layers only


def project_files() -> dict[str, Path]:
    """Module name -> file, for every project module (tests and benchmarks are not the project)."""
    files = {"app": ROOT / "app.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (function-level imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
                break
    return found


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_importing_prune_pulls_in_no_front_end_or_evaluation():
    modules = [n for n in project_files() if n == "prune" or n.startswith("prune.")]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('runtime', 'evaluation', 'ui', 'cli', 'app', 'gradio', 'lm_eval', 'matplotlib'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(modules) > 10
    assert json.loads(out.stdout) == []


def test_dependencies_point_one_way():
    graph = import_graph()
    # `python -m prune` runs the command line; prune/__main__.py imports it only when run as a
    # program, which the fresh-interpreter test above checks by importing prune.__main__ too.
    graph["prune.__main__"].discard("cli")

    def layer(module: str) -> tuple[str, int]:
        top = module.split(".")[0]
        return top, LAYER[top]

    wrong = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if layer(target)[0] != layer(name)[0] and layer(target)[1] >= layer(name)[1]
    ]
    assert wrong == []


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_only_the_lab_prunes_or_takes_the_lock():
    prune_call = re.compile(r"\bpruner\.prune\(|\bPruner\([^)]*\)\.prune\(")
    lock = re.compile(r"\.lock\b")
    offenders = []
    for name, path in project_files().items():
        if name in ("evaluation.lab", "runtime.pruner"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if prune_call.search(code) or ".pruner." in code or lock.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_front_ends_catch_one_error_class():
    from prune.errors import LabError

    names = []
    for name, path in project_files().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                names.append((name, node.name))
    assert names, "no error classes found"
    for module, cls in names:
        obj = getattr(__import__(module, fromlist=[cls]), cls)
        assert issubclass(obj, LabError), f"{module}.{cls} does not derive from LabError"


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _names(target: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(target) if isinstance(node, ast.Name)}


def test_one_layer_by_layer_loop():
    """Only ``runtime.stream.layer_by_layer`` runs decoder layers over windows: it is the one caller
    of ``run_layer``, and no other loop over the layers calls a layer, its forward or the model."""
    runners, loops = [], []
    for name, path in project_files().items():
        source = path.read_text()
        for function in _functions(ast.parse(source)):
            calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
            if any(isinstance(c.func, ast.Name) and c.func.id == "run_layer" for c in calls):
                runners.append(f"{name}.{function.name}")
            for loop in (n for n in ast.walk(function) if isinstance(n, ast.For)):
                if "layers" not in (ast.get_source_segment(source, loop.iter) or ""):
                    continue
                called = _names(loop.target) | {"model", "run_layer"}
                for call in (n for n in ast.walk(loop) if isinstance(n, ast.Call)):
                    func = call.func
                    if (isinstance(func, ast.Name) and func.id in called) or (
                        isinstance(func, ast.Attribute) and func.attr == "forward"
                    ):
                        loops.append(f"{name}.{function.name}:{call.lineno}")
    assert runners == ["runtime.stream.layer_by_layer"]
    assert [loop for loop in loops if not loop.startswith("runtime.stream.layer_by_layer:")] == []
    assert loops, "the loop itself was not found: the check would see nothing"


PLACEMENT = {"resident", "resident_fn", "stream", "hidden_device"}


def test_no_placement_arguments_outside_the_runtime():
    """Where a model lives is the runtime's business: outside it no signature takes, and no call
    passes, a placement (``resident``, ``resident_fn``, ``stream=``, a model's ``.stream``); weights
    are read through ``LoadedModel.layer`` / ``layer_weights`` and the runtime's functions."""
    offenders = []
    for name, path in project_files().items():
        if name.split(".")[0] == "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                found = [a.arg for a in args if a.arg in PLACEMENT]
            elif isinstance(node, ast.Call):
                found = [k.arg for k in node.keywords if k.arg in PLACEMENT]
                values = [*node.args, *(k.value for k in node.keywords)]
                found += [v.attr for v in values if isinstance(v, ast.Attribute) and v.attr in PLACEMENT]
            elif isinstance(node, ast.Name) and node.id in ("resident", "resident_fn"):
                found = [node.id]
            elif isinstance(node, ast.Attribute) and node.attr in ("resident", "resident_fn"):
                found = [node.attr]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {what}" for what in found]
    assert offenders == []
