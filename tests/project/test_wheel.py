"""The wheel installs anywhere: built with ``python -m build``, installed into a fresh
virtual environment, its commands run from another directory with the shipped model.

The fresh environment gets the project's dependencies (torch and the rest) from the
environment running the tests, through a path file, so nothing is downloaded: pip
installs the wheel alone (``--no-index``) and checks its requirements are met. About
60–80 s on two busy cores (build, install, the demo's server and device processes), so it
is marked ``integration``; it still runs in ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("protocol", "spinn", "tools", "bench", "models", "spinn_server.py", "spinn_device.py",
           "setup.cfg", "pyproject.toml", "README.md")  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{cmd}: {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed; its bin/ and an environment that does not
    see the checkout."""
    if importlib_missing("build"):
        pytest.skip("the build package is not installed (pip install build)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    # A copy, so the build writes its build/ and egg-info there, not into the checkout.
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            # symlinks=True: the build itself must follow spinn/pretrained/models.
            shutil.copytree(
                path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # No network for the build: this environment's setuptools and wheel.
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)], tmp, env)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("spinn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = "spinn/pretrained/models/default/"
    assert shipped + "model.pt" in names and shipped + "model.zdict" in names, names
    assert not [n for n in names if n.startswith("bench/")], "the benchmarks are not installed"
    venv = tmp / "venv"
    # Without pip or setuptools of its own (the old setuptools venv installs would hide the
    # newer one torch requires); this environment's pip installs into it.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())  # fmt: skip
    # The dependencies, already installed here, appended to the new environment's path.
    (purelib / "spinn-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-index", "--quiet", str(wheel)], tmp, env)  # fmt: skip
    return venv / "bin", env


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_the_installed_package_is_the_wheel_and_has_no_benchmarks(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_, env = installed
    code = (
        "import importlib.util, json, spinn, protocol, tools.netshape, spinn_server, spinn_device\n"
        "from spinn.pretrained import DEFAULT_CHECKPOINT\n"
        "print(json.dumps({'spinn': spinn.__file__, 'model': str(DEFAULT_CHECKPOINT),\n"
        "  'exists': DEFAULT_CHECKPOINT.exists(), 'bench': importlib.util.find_spec('bench') is not None}))"
    )
    out = json.loads(
        _run([str(bin_ / "python"), "-c", code], tmp_path, env).strip().splitlines()[-1]
    )
    venv = str(bin_.parent)
    assert out["spinn"].startswith(venv) and out["model"].startswith(venv), out
    assert out["exists"] and not out["bench"], out
    for command in ("spinn", "spinn-server", "spinn-device", "netshape"):
        assert "usage" in _run([str(bin_ / command), "--help"], tmp_path, env).lower()


def test_the_demo_runs_from_any_directory(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    # `make demo` without make: a server and a device process, both from the wheel, the
    # shipped model found as package data; the device's frames cross to the server.
    bin_, env = installed
    out = _run(
        [str(bin_ / "python"), "-m", "spinn.demo", "--frames", "20", "--rate", "200",
         "--policy", "fixed", "--split", "3", "--thr", "1.0"],
        tmp_path, env,
    )  # fmt: skip
    assert "device: 20 frames" in out and "accuracy against the labels" in out, out[-3000:]
    assert "'server': 0" not in out, out[-3000:]
