"""The import structure the layout promises (docs/design.md): no import circles, layers that import only downwards,
and serving that never imports the training stack. Read from the code's own imports (function-level ones too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "preprocessing")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (lazy imports in functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # a package's __init__ is imported with each of its modules: leave it out of the edges into the package
        graph[name] = {m for m in _imports(path, name, known) if not name.startswith(m + ".")}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_circles():
    graph = _graph()
    circles = sorted({tuple(sorted([a, b])) for a in graph for b in graph[a] if a in _reach(graph, b)})
    assert circles == [], f"modules that import each other (directly or through others): {circles}"


LAYERS = {  # a module may import its own layer and those below it (higher number = higher layer)
    "pipeline.errors": 0, "pipeline.paths": 0, "pipeline.devices": 0, "pipeline.arguments": 0,
    "pipeline.nn": 1, "pipeline.data": 1,
    "pipeline.trained": 2,
    "pipeline.evaluation": 3,
    "pipeline.training": 4, "pipeline.serving": 4,
    "preprocessing": 5,
    "pipeline.demo": 6, "pipeline.benchmarks": 6, "pipeline.cli": 6, "pipeline.__main__": 6, "pipeline": 6,
}


def _layer(module: str) -> tuple[str, int]:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return best, LAYERS[best]


def test_every_import_runs_downwards():
    graph = _graph()
    upward = []
    for module, targets in graph.items():
        group, level = _layer(module)
        for target in targets:
            other, other_level = _layer(target)
            if other_level > level or (other_level == level and group != other and level in (1, 4)):
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports against the layering of docs/design.md:\n" + "\n".join(sorted(upward))


def test_nn_and_data_do_not_import_each_other():
    graph = _graph()
    crossing = [f"{a} -> {b}" for a, bs in graph.items() for b in bs
                if (a.startswith("pipeline.nn") and b.startswith("pipeline.data"))
                or (a.startswith("pipeline.data") and b.startswith("pipeline.nn"))]
    assert crossing == []


@pytest.mark.parametrize("module", ["pipeline.serving.classify", "pipeline.serving.streaming",
                                    "pipeline.serving.export", "pipeline.serving.visualize", "pipeline.trained.load"])
def test_serving_never_reaches_the_training_stack(module):
    reached = _reach(_graph(), module)
    assert not any(m.startswith("pipeline.training") for m in reached), sorted(reached)
    lightning = []
    for m in reached | {module}:
        tree = ast.parse(_modules()[m].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            lightning += [f"{m}: {n}" for n in names if n.split(".")[0] in ("pytorch_lightning", "lightning", "torchmetrics")]
    assert lightning == []
