"""Test code stays in tests/: nothing outside tests/ imports it, and the product (the node pack, the core, the
training CLIs) does not import the development helpers of tools/devkit either."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("__init__.py", "nodes", "instantfamily_core", "training")


def _imports(path: Path):
    """Every module name ``path`` imports (absolute imports only; relative ones stay inside their package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def _python_files(*tops):
    for top in tops:
        p = REPO / top
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def _offenders(files, banned):
    return [f"{f.relative_to(REPO)}: imports {name}" for f in files for name in _imports(f)
            if name.split(".")[0] in banned]


def test_nothing_outside_tests_imports_test_code():
    outside = [f for f in _python_files(".") if "tests" not in f.relative_to(REPO).parts
               and not any(part.startswith(".") for part in f.relative_to(REPO).parts)]
    assert outside, "no Python files found outside tests/"
    assert _offenders(outside, {"tests", "support", "conftest"}) == []


def test_the_product_does_not_import_the_development_helpers():
    files = list(_python_files(*PRODUCT))
    assert any(f.name == "model.py" for f in files)
    assert _offenders(files, {"tools", "devkit", "tests", "support"}) == []
