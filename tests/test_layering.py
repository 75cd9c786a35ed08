"""The import graph points one way, floor by floor: errors (the ground floor) < data < models
and attacks < at < eval < bench. A module imports only from floors below its own (and from its
own package); packages on one floor do not import each other. No import runs in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

from at.config import REPO_ROOT

LAYERS = (("errors",), ("data",), ("models", "attacks"), ("at",), ("eval",), ("bench",))
FLOOR = {package: floor for floor, packages in enumerate(LAYERS) for package in packages}


def _sources(package: str) -> list[Path]:
    single = REPO_ROOT / f"{package}.py"
    return [single] if single.is_file() else sorted((REPO_ROOT / package).rglob("*.py"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str = "") -> list[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against
    `module`); `from x import y` names x.y as well, in case y is a module."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def test_no_upward_or_sideways_imports():
    bad = []
    for package, floor in FLOOR.items():
        for path in _sources(package):
            for name in _imports(path, _module(path)):
                top = name.split(".")[0]
                if top in FLOOR and top != package and FLOOR[top] >= floor:
                    bad.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = {_module(p): p for package in FLOOR for p in _sources(package)}
    graph = {m: {n for n in _imports(p, m) if n in modules and n != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (cycle := visit(m, [m])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_an_upward_import_and_a_relative_one(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from eval.common import load_target\n"
                      "from .config import load_config\n")
    assert sorted(_imports(source, "at.m")) == ["at.config", "at.config.load_config",
                                                "eval.common", "eval.common.load_target"]
