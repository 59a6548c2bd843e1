"""spinn train | evaluate | profile from the command line, help texts and error exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.dictionaries import ZstdDictionaries
from protocol.packing import DICT_CODEC
from spinn.cli import main
from spinn.model.zdict_file import dictionaries_path


def test_help_explains_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spinn", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    for name in ("train", "evaluate", "profile", "dictionaries"):
        assert name in out.stdout
    for sub, flag in (("train", "--exits"), ("evaluate", "--thresholds"), ("profile", "--repeats")):
        with pytest.raises(SystemExit) as info:
            main([sub, "--help"])
        assert info.value.code == 0
        assert flag in capsys.readouterr().out


def test_train_evaluate_profile_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "m.pt"
    rc = main(
        [
            "train",
            "--out",
            str(ckpt),
            "--arch",
            "resnet20",
            "--width",
            "4",
            "--dataset",
            "mnist",
            "--epochs",
            "1",
            "--limit-train",
            "96",
            "--limit-test",
            "50",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--exits",
            "0.3,0.6",
            "--no-progress",
        ]  # fmt: skip
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "test accuracy per exit" in out
    rc = main(
        [
            "evaluate",
            str(ckpt),
            "--dataset",
            "mnist",
            "--limit",
            "50",
            "--out",
            str(tmp_path),
            "--thresholds",
            "0.5,0.9",
        ]  # fmt: skip
    )
    assert rc == 0
    assert "thr_conf" in capsys.readouterr().out
    assert (tmp_path / "evaluation.csv").exists() and (tmp_path / "evaluation.png").exists()
    rc = main(["dictionaries", str(ckpt), "--dataset", "mnist", "--limit", "64"])
    assert rc == 0
    zdict = ZstdDictionaries.from_bytes(dictionaries_path(ckpt).read_bytes())
    assert f"sha256 {zdict.sha256}" in capsys.readouterr().out
    prof = tmp_path / "profile.json"
    rc = main(
        [
            "profile",
            str(ckpt),
            "--dataset",
            "mnist",
            "--out",
            str(prof),
            "--calibration-size",
            "40",
            "--bytes-inputs",
            "4",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--lossy-inputs",
            "40",
        ]  # fmt: skip
    )
    assert rc == 0
    doc = json.loads(prof.read_text())
    assert doc["format"] == "spinn-profile/1" and doc["calibration_size"] == 40
    # The widths on the first training images (--lossy-split train): the test split is
    # left for the held-out measurements.
    assert doc["precision_inputs"] == 40 and doc["precision_data"] == "mnist-5k/train"
    # --precision-only re-measures the sparse_uintb widths alone, in place.
    argv = ["profile", str(ckpt), "--dataset", "mnist", "--out", str(prof), "--precision-only"]
    assert main([*argv, "--lossy-inputs", "30", "--bytes-inputs", "4"]) == 0
    assert "sparse_uintb bits per split" in capsys.readouterr().out
    again = json.loads(prof.read_text())
    assert again["precision_inputs"] == 30 and again["precision_data"] == "mnist-5k/train"
    assert again["stage_device_ms"] == doc["stage_device_ms"]
    assert again["thresholds"] == doc["thresholds"]
    assert len(doc["exit_accuracy"]) == 3
    # The dictionaries beside the checkpoint are profiled too, and pack smaller than zstd.
    assert len(zdict) == doc["num_stages"]  # one table per split
    sizes = [split["bytes"] for split in doc["splits"]]
    assert all(DICT_CODEC in s for s in sizes)
    assert sum(s[DICT_CODEC] for s in sizes) < sum(s["sparse_int8+zstd"] for s in sizes)


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    rc = main(
        ["train", "--out", str(tmp_path / "x.pt"), "--exits", "0.5,1.5", "--dataset", "mnist"]
    )
    assert rc == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", "x.pt", "--exits", "a,b"])
    assert info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(tmp_path / "none.pt"), "--thresholds", "2"])
    assert info.value.code == 2
    assert "--thresholds: expected numbers in [0, 1], got 2" in capsys.readouterr().err
    rc = main(["train", "--out", str(tmp_path / "x.pt"), "--arch", "no_such_module_xyz:make"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "No module named 'no_such_module_xyz'" in err and "PYTHONPATH" in err
