"""The runtime's cores are sans-I/O: no event loop, socket, thread, clock or torch.

Read statically, like tests/project/test_import_cycles.py. In a core module every import counts,
at module level or inside a function; in a module of ours that a core imports, what
importing it runs counts (module level: a function's own import runs only if the core
calls that function, as ``spinn.model.exits.answering``'s torch, which no core does). An import
under ``if TYPE_CHECKING`` runs only for the type checker and never counts. Third-party
libraries (numpy, msgpack, zstandard) are not followed: they are not ours to change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "spinn")
CORES = (
    "spinn.runtime.device_core",
    "spinn.runtime.server_core",
    "spinn.runtime.server_queue",
    "spinn.runtime.admission",
    "spinn.runtime.run_summary",
)
"""The modules that decide: they take ``now`` and events and return what to do."""
BANNED = frozenset({"asyncio", "socket", "threading", "time", "torch"})
THREAD_LOCAL = frozenset({"protocol.packing", "protocol.dictionaries"})
"""Codecs the adapters call from executor threads: ``threading.local`` zstd contexts, so
they may import threading (they never start, wait on or lock a thread of their own)."""


def _module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_imports(name: str, path: Path, functions: bool = True) -> set[str]:
    """Modules `name` imports at run time (not under ``if TYPE_CHECKING``), absolute;
    inside its functions too unless `functions` is False."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
        if not functions and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if path.name == "__init__.py" else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _closure(name: str) -> dict[str, set[str]]:
    """Every module of ours that `name` reaches at run time → what it imports. A package's
    ``__init__`` runs before any of its modules, so it is reached too."""
    seen: dict[str, set[str]] = {}
    todo = [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_path(module)
        if path is None:
            continue
        imports = _runtime_imports(module, path, functions=module == name)
        seen[module] = imports
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo += [m for m in (*imports, *parents) if m.split(".")[0] in PACKAGES]
    return seen


@pytest.mark.parametrize("core", CORES)
def test_core_imports_no_io_thread_clock_or_torch(core: str) -> None:
    assert _module_path(core) is not None, f"{core} is gone: update CORES"
    bad = []
    for module, imports in sorted(_closure(core).items()):
        top = {i.split(".")[0] for i in imports} & BANNED
        if module in THREAD_LOCAL:
            top -= {"threading"}
        if top:
            bad.append(f"{module} imports {sorted(top)}")
    assert not bad, f"{core} reaches: " + "; ".join(bad)


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = "def f():\n    import time\n    return time\n"
    path = tmp_path / "m.py"
    path.write_text(source)
    assert "time" in _runtime_imports("spinn.m", path)
    assert "time" not in _runtime_imports("spinn.m", path, functions=False)
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n")
    assert "torch" not in _runtime_imports("spinn.m", path)
