"""The tests mirror the code: tests/<package>/test_<module>.py, helpers only in tests/support/.

A test module sits in a package directory of tests/ (never at its top, never in the
support package), and imports nothing from another test module: what two test modules
share lives in ``tests.support``, under a public name.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SUPPORT = "tests.support"


def module_name(path: Path) -> str:
    """The dotted name of a file under tests/ (``tests.runtime.test_device``)."""
    parts = path.relative_to(TESTS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_test_modules() -> list[Path]:
    """Every test module under tests/."""
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_module_sits_in_a_package_directory() -> None:
    misplaced = []
    for path in all_test_modules():
        where = path.parent
        if where == TESTS or where.name == "support" or not (where / "__init__.py").is_file():
            misplaced.append(str(path.relative_to(TESTS)))
    assert not misplaced, f"test modules outside a tests/<package>/ directory: {misplaced}"


def imported_test_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import from the tests package in `path`'s code."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tests" or node.module.startswith("tests."):
                out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out += [("." * node.level + (node.module or ""), a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("tests.")]
    return out


def test_no_test_module_imports_from_another() -> None:
    bad = []
    for path in [*all_test_modules(), TESTS / "conftest.py"]:
        for module, name in imported_test_names(path):
            from_support = module == SUPPORT or module.startswith(SUPPORT + ".")
            if not from_support or name.startswith("_"):
                bad.append(f"{path.relative_to(TESTS)}: from {module} import {name}")
    assert not bad, (
        "test modules share code only through tests.support, by public names:\n" + "\n".join(bad)
    )


def test_the_checks_see_the_tests() -> None:
    # Guards the two tests above against passing on an empty or misread tree.
    names = {module_name(p) for p in all_test_modules()}
    assert "tests.runtime.test_device" in names and "tests.protocol.test_connection" in names
    assert any(m == "tests.support.runtime" for m, _ in imported_test_names(TESTS / "conftest.py"))
