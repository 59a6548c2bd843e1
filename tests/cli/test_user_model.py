"""A model of the user's own code (``spinn train --arch module:callable``) is served
by spinn_server.py and run by spinn_device.py only with --allow-user-code."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import spinn_device
from spinn.model.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from spinn.model.progressive import InputSpec
from spinn.runtime.processes import free_port, stop_process, wait_listening
from tests.support.runtime import PYTHON, ROOT, write_stub_profile

pytestmark = pytest.mark.timeout(120)

_MODULE = "spinn_test_usernet"
_SOURCE = """
from torch import nn


def make(in_channels, num_classes):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt`` of a user model (with ``profile.json`` beside it); the module that
    builds it lies in the same directory, which must be on the import path to load it."""
    directory = tmp_path_factory.mktemp("usermodel")
    (directory / f"{_MODULE}.py").write_text(_SOURCE)
    torch.manual_seed(0)
    config = ModelConfig(
        arch=f"{_MODULE}:make",
        input_spec=InputSpec(1, 28, 28, (0.286,), (0.353,)),
        num_classes=10,
        exit_fractions=(0.5,),
    )
    path = directory / "model.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(directory))
        save_checkpoint(
            path, config.build().eval(), config, class_names=[str(i) for i in range(10)]
        )
        model, meta = load_checkpoint(path, allow_user_code=True)
    write_stub_profile(model, meta, directory / "profile.json")
    return path


def _images(directory: Path) -> Path:
    folder = directory / "img"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (28, 28), dtype=np.uint8))
    return folder


def _server(user_model: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(user_model.parent)])}
    return subprocess.Popen(
        [PYTHON, str(ROOT / "spinn_server.py"), "--checkpoint", str(user_model),
         "--port", str(port), "--workers", "1", *flags],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip


def test_server_refuses_user_code_without_the_flag(user_model: Path) -> None:
    proc = _server(user_model, free_port())
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 2, err
    assert "--allow-user-code" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_device_refuses_user_code_without_the_flag(
    user_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(user_model.parent))
    argv = ["--checkpoint", str(user_model), "--device-only", "--no-status",
            "--images", str(_images(tmp_path))]  # fmt: skip
    assert spinn_device.main(argv) == 2
    assert "--allow-user-code" in capsys.readouterr().err


def test_user_model_is_served_with_the_flag(
    user_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(user_model.parent))
    port = free_port()
    proc = _server(user_model, port, "--allow-user-code")
    try:
        wait_listening(port, proc, 60)
        out = tmp_path / "answers.jsonl"
        argv = ["--checkpoint", str(user_model), "--allow-user-code", "--no-status",
                "--server", f"127.0.0.1:{port}", "--split", "1", "--thr", "1", "--no-continue",
                "--images", str(_images(tmp_path)), "--out", str(out)]  # fmt: skip
        assert spinn_device.main(argv) == 0, capsys.readouterr().err
    finally:
        assert stop_process(proc) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    # No exit before the split is confident at thr 1 and the device does not race the
    # server (--no-continue): the server answers.
    assert "server" in {r["where"] for r in records}, records
    summary = json.loads(capsys.readouterr().err.split("summary ", 1)[1].splitlines()[0])
    assert summary["frames"] == 3
