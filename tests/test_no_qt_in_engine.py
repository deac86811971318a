"""``engine/`` and ``scenarios/`` never import Qt (ARCHITECTURE.md; the napari rule).

Two checks: a static scan of every import statement, and a fresh interpreter that imports every module of both
packages and then looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QT = ("PySide6", "PySide2", "PyQt5", "PyQt6", "pyqtgraph", "qtpy", "shiboken6", "pytestqt")
PACKAGES = ("engine", "scenarios")


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _qt_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in QT]
    return bad


def test_there_are_modules_to_scan():
    mods = _modules()
    assert len(mods) >= 10
    assert any(p.name == "interventions.py" for p in mods)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_qt_import_statement(path):
    assert _qt_imports(path) == []


def test_scanner_catches_a_qt_import(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import os\nfrom PySide6.QtCore import QObject\nimportlib.import_module('pyqtgraph')\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert len(_qt_imports(p)) == 2
    finally:
        ROOT = old


def test_importing_every_engine_module_loads_no_qt():
    names = []
    for p in _modules():
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    code = (
        "import importlib, json, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module(n)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {QT!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
