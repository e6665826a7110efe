"""The layers (docs/ARCHITECTURE.md): imports point down cvae -> experiments -> studies, with no
cycle among the project's modules (lazy imports inside functions count too), the work queue
does not import the tuner, and the science in ``cvae`` imports no tracking or plotting
library. Read from the source with ``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"cvae": 0, "experiments": 1, "studies": 2, "benchmarks": 3}
NOT_IN_CVAE = ("mlflow", "optuna", "pandas", "seaborn", "matplotlib")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (``from a import b`` counts
    ``a.b`` when that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for package in LAYERS for p in (ROOT / package).rglob("*.py")]
    modules = {_module(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_graph_sees_the_packages():
    graph = _graph()
    assert {"cvae.train", "experiments.runner", "studies.grid", "studies.queue"} <= set(graph)
    assert "experiments.runner" in graph["studies.grid"]


def test_imports_point_down_the_layers():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items()
             for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]]
    assert wrong == []


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_queue_does_not_import_the_tuner():
    graph = _graph()
    assert not graph["studies.queue"] & {"studies.tune", "studies.tuning"}
    assert not graph["studies.storage"] & {"studies.tune", "studies.tuning", "studies.queue"}


@pytest.mark.parametrize("path", sorted((ROOT / "cvae").rglob("*.py")), ids=lambda p: p.name)
def test_the_science_imports_no_tracking_or_plotting(path):
    assert not {m for m in _imports(path) if m.split(".")[0] in NOT_IN_CVAE}


def test_every_document_the_code_cites_is_in_the_project():
    """A docstring that names a document (``ARCHITECTURE.md``, ``README.md``: capitals, not a
    report file such as ``summary.md``) names one a fresh clone has, at the root or in docs/."""
    cited = {(path.relative_to(ROOT).as_posix(), name)
             for package in LAYERS for path in (ROOT / package).rglob("*.py")
             for name in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text())}
    missing = sorted(f"{path} cites {name}" for path, name in cited
                     if not (ROOT / name).is_file() and not (ROOT / "docs" / name).is_file())
    assert missing == []


def _functions(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT).as_posix(), node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len(names) - (names[:1] in (["self"], ["cls"]))


@pytest.mark.parametrize("package", ["experiments", "studies"])
def test_functions_stay_short_and_narrow(package):
    """The orchestration reads in small pieces: no function over 60 lines, no signature over
    8 parameters (a ``Grid`` carries a study's bundle)."""
    long = [f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path, node in _functions(package) if node.end_lineno - node.lineno + 1 > 60]
    wide = [f"{path}:{node.lineno} {node.name}: {_parameters(node)} parameters"
            for path, node in _functions(package) if _parameters(node) > 8]
    assert long == [] and wide == []
