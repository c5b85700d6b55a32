"""The test suite's own layout: shared fixtures live in conftest.py and shared helpers in helpers.py, so no file
under tests/ imports a test module (which would run its fixtures under two names and tie the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(source: str) -> set[str]:
    """The top-level names of every absolute import in `source`, at any depth (function bodies too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imported_modules_finds_imports_at_every_depth():
    source = "import os.path\nfrom helpers import ROOT\ndef f():\n    from test_chat import x\n    import test_routing\n"
    assert imported_modules(source) == {"os", "helpers", "test_chat", "test_routing"}


def test_no_file_under_tests_imports_a_test_module():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    offenders = {path.name: sorted(imported_modules(path.read_text()) & test_modules)
                 for path in sorted(TESTS.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}
