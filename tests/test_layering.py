"""The package graph points one way: eval/ and bench/ build on at/, which builds on data/, models/
and attacks/. A module importing upwards (at/ loading runs through eval/) is refused here."""
from __future__ import annotations

import ast
from pathlib import Path

from at.config import REPO_ROOT

# package -> packages it must not import. at.errors is a leaf every layer may raise from.
FORBIDDEN = {
    "at": {"eval", "bench"},
    "data": {"at", "eval", "bench"},
    "models": {"at", "eval", "bench"},
    "attacks": {"at", "eval", "bench"},
}
ALLOWED = {"at.errors"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_upward_imports():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for name in _imports(path):
                if name.split(".")[0] in forbidden and name not in ALLOWED:
                    bad.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from eval.common import load_target\n")
    assert _imports(source) == ["eval.common"]
