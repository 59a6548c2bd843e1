"""A user's own model on a user's own image folder, as README "Your own model" runs it:
spinn train, evaluate, dictionaries, profile and inspect on an RGB folder with a
non-chain backbone, with no traceback and no guessed dataset."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import spinn_device
import spinn_server
from spinn.cli import main
from spinn.decisions.offline_profile import Profile
from spinn.model.backbones import build_backbone
from spinn.model.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from spinn.model.progressive import InputSpec
from spinn.offline.data import ImageSet, load_image_folder
from spinn.offline.train import TrainConfig, _load_data

pytestmark = pytest.mark.timeout(180)

# The backbone of the bring-your-own-model journey: a strided stem and a max-pool, a
# two-branch block joined with torch.cat, residual blocks, and a flatten written as
# x.view(x.size(0), -1), which needs a contiguous tensor.
_SOURCE = """
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.b(self.relu(self.a(x))))


class Net(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 3, padding=1)
        self.res1 = Residual(8)
        self.res2 = Residual(8)
        self.fc = nn.Linear(8 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.stem(x)))
        x = self.relu(torch.cat([self.left(x), self.right(x)], 1))
        x = nn.functional.adaptive_avg_pool2d(self.res2(self.res1(x)), 2)
        return self.fc(x.view(x.size(0), -1))


def make(in_channels, num_classes):
    return Net(in_channels, num_classes)


def no_channels(num_classes):
    return Net(3, num_classes)
"""
_CLASSES = ("cat", "dog", "fox")


def _module(directory: Path, name: str) -> str:
    (directory / f"{name}.py").write_text(_SOURCE)
    return name


@pytest.fixture()
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh importable module name per test (the import system caches modules)."""
    name = f"spinn_own_{tmp_path.name.replace('-', '_')}"
    _module(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    """RGB PNGs, 24 x 20 (resized to 16 x 16 on loading); each class its own tint."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, cls in enumerate(_CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (20, 24, 3), dtype=np.uint8)
                img[..., c] += 160
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


def test_folder_images_are_contiguous(tmp_path: Path) -> None:
    data = load_image_folder(_folder(tmp_path, {"train": 2}) / "train", channels=3, size=(16, 16))
    # Channels-last strides here made a backbone's x.view(...) fail after a whole epoch.
    assert data.images.is_contiguous()
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_own_model_on_an_rgb_folder_start_to_finish(
    tmp_path: Path, user_code: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    _folder(tmp_path / "data", {"train": 8, "test": 4})
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    ckpt = "mine/model.pt"
    rc = main(["-v", "train", "--arch", f"{user_code}:make", "--dataset", "data",
               "--size", "16", "--channels", "3", "--epochs", "1", "--batch-size", "8",
               "--limit-train", "12", "--threads", "1", "--no-progress",
               "--out", ckpt])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    # Pillow's per-chunk debug lines stay out of the -v log.
    assert not [r for r in caplog.records if r.name.startswith("PIL")]
    # The table of where splits and exits fell, and the warnings of this placement: six
    # exits asked for on five candidate splits; an exit just before the classifier.
    assert "stem, relu, pool" in out and "left, right, cat, relu" in out
    assert "6 exits were asked for and 4 placed" in err
    assert "more than the" in err and "that finish the network" in err
    model, meta = load_checkpoint(ckpt, allow_user_code=True)
    assert meta.recipe["train_size"] == 12

    # The README's next commands, without --dataset: the checkpoint says what it was
    # trained on.
    assert main(["evaluate", ckpt, "--allow-user-code", "--out", "mine"]) == 0
    out, err = capsys.readouterr()
    assert "folder:data/test: 12 images" in out, err
    assert main(["dictionaries", ckpt, "--allow-user-code"]) == 0
    assert "24 folder:data/train images" in capsys.readouterr().out
    assert any("dictionaries: 24/24 images" in r.getMessage() for r in caplog.records)
    rc = main(["profile", ckpt, "--allow-user-code", "--out", "mine/profile.json",
               "--repeats", "2", "--warmup", "0", "--bytes-inputs", "4"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert any("profile 4/4" in r.getMessage() for r in caplog.records)
    profile = Profile.load("mine/profile.json")
    assert profile.calibration_size == 12

    capsys.readouterr()
    assert main(["inspect", ckpt, "--allow-user-code"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert rows and rows[0][1:5] == ["left,", "right,", "cat,", "relu"]
    # The packed bytes at split 2 are the profile's, with the dictionary codec.
    assert "bytes sparse_int8_zdict" in out
    assert str(profile.packed_bytes(2, "sparse_int8_zdict")) in rows[0]
    accuracy = meta.metrics["test_exit_accuracy"]
    exit_index = model.exit_at_stage(1)
    assert exit_index is not None
    assert f"{100 * accuracy[exit_index]:.2f}" == rows[0][-1]
    assert "6 exits were asked for" in err


def test_recorded_dataset_that_is_gone_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)
    config = ModelConfig("resnet20", spec, 3, {"width": 4}, exit_fractions=(0.5,))
    torch.manual_seed(0)
    model = config.build()
    names = list(_CLASSES)
    gone = tmp_path / "gone.pt"
    save_checkpoint(gone, model, config, class_names=names, recipe={"dataset": "photos"})
    none = tmp_path / "none.pt"
    save_checkpoint(none, model, config, class_names=names)
    monkeypatch.chdir(tmp_path)
    for command in ("evaluate", "profile", "dictionaries"):
        extra = ["--out", "p.json"] if command == "profile" else []
        assert main([command, str(gone), *extra]) == 2
        err = capsys.readouterr().err
        assert "trained on 'photos', which is not there" in err
        assert "pass --dataset with the path of that image folder" in err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["evaluate", str(none)]) == 2
    err = capsys.readouterr().err
    assert "does not record the data it was trained on: pass --dataset" in err
    assert "3x16x16 images" in err
    # A dataset of the wrong shape says which flag to change.
    assert main(["evaluate", str(gone), "--dataset", "mnist"]) == 2
    assert "pass --dataset with images of that shape" in capsys.readouterr().err


def test_limit_is_stratified_and_seeded(tmp_path: Path) -> None:
    images = torch.zeros(30, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(30, dtype=torch.uint8)
    labels = torch.tensor([0] * 15 + [1] * 9 + [2] * 6)
    data = ImageSet(images, labels, _CLASSES, "sorted")
    a = data.sample(10, seed=3)
    assert torch.bincount(a.labels).tolist() == [5, 3, 2]
    assert torch.equal(a.images, data.sample(10, seed=3).images)
    assert not torch.equal(a.images, data.sample(10, seed=4).images)
    assert data.sample(None) is data and len(data.sample(40)) == 30
    # spinn train --limit-train/--limit-test on a folder: every class, not the first.
    _folder(tmp_path / "data", {"train": 6, "test": 4})
    cfg = TrainConfig(out=str(tmp_path / "m.pt"), dataset=str(tmp_path / "data"), size=8,
                      channels=3, limit_train=6, limit_test=3)  # fmt: skip
    train_set, test_set = _load_data(cfg)
    assert torch.bincount(train_set.labels).tolist() == [2, 2, 2]
    assert torch.bincount(test_set.labels).tolist() == [1, 1, 1]


def test_callable_without_in_channels_is_one_line(
    tmp_path: Path, user_code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="give it those parameters, or \\*\\*kwargs"):
        build_backbone(f"{user_code}:no_channels", in_channels=3, num_classes=3)
    rc = main(["train", "--arch", f"{user_code}:no_channels", "--dataset", "mnist",
               "--out", str(tmp_path / "m.pt"), "--no-progress"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "no_channels(num_classes) cannot be called as (in_channels=1, num_classes=10)" in err
    assert len(err.strip().splitlines()) == 1, err


def test_server_and_device_name_an_unimportable_module_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _module(tmp_path, "spinn_own_vanishing")
    spec = InputSpec(3, 16, 16, (0.5,) * 3, (0.25,) * 3)
    config = ModelConfig(f"{name}:make", spec, 3, exit_fractions=(0.5,))
    ckpt = tmp_path / "model.pt"
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        save_checkpoint(ckpt, config.build(), config, class_names=list(_CLASSES))
    sys.modules.pop(name, None)
    (tmp_path / f"{name}.py").unlink()
    base = ["--checkpoint", str(ckpt), "--allow-user-code"]
    assert spinn_server.main([*base, "--port", "0", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot import '{name}'" in err and "PYTHONPATH" in err
    assert len(err.strip().splitlines()) == 1, err
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    argv = [*base, "--device-only", "--no-status", "--images", str(tmp_path / "img")]
    assert spinn_device.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot import '{name}'" in err
    assert len(err.strip().splitlines()) == 1, err
