"""Nothing from the wire or from a file can run code (docs/PROTOCOL.md §10).

A static check over the project's sources (no pickle, ``torch.load(weights_only=True)``,
``np.load(allow_pickle=False)``, msgpack decoding only through the protocol's hardened
call) and a live one: a checkpoint file whose pickle would run a command is refused
without running it.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from spinn.model.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for d in ("protocol", "spinn", "tools")
    for p in (ROOT / d).rglob("*.py")
    if "__pycache__" not in p.parts
) + [ROOT / "spinn_server.py", ROOT / "spinn_device.py"]
_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_sources_are_found() -> None:
    assert len(SOURCES) > 20 and ROOT / "protocol" / "connection.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_runs_from_data(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [*names, module or ""]:
                assert name.split(".")[0] not in _UNSAFE_MODULES, f"{path}: imports {name}"
    for call in _calls(tree):
        name = _name(call.func)
        where = f"{path}:{call.lineno}"
        if name == "torch.load":
            assert _keyword(call, "weights_only") is True, (
                f"{where}: torch.load without weights_only"
            )
        elif name in ("np.load", "numpy.load"):
            assert _keyword(call, "allow_pickle") is False, f"{where}: np.load may unpickle"
        elif name in ("msgpack.unpackb", "msgpack.Unpacker", "msgpack.loads"):
            # Peer bytes are decoded in one place, with text keys and no ext types.
            assert path == ROOT / "protocol" / "framing.py", f"{where}: decode via protocol"
            assert _keyword(call, "strict_map_key") is True, f"{where}: strict_map_key"
            assert any(kw.arg == "ext_hook" for kw in call.keywords), f"{where}: ext_hook"
        elif (
            isinstance(call.func, ast.Name)
            and name in ("eval", "exec")
            or name
            in (
                "yaml.load",
                "yaml.unsafe_load",
            )
        ):
            raise AssertionError(f"{where}: {name} on data")


def test_checkpoint_that_would_run_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "spinn-checkpoint/1", "state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran its command"
