"""Datasets: real Fashion-MNIST and MNIST files, image folders, .npz, and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spinn.offline.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    DataError,
    ImageSet,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_mnist_5k,
    load_npz,
    read_idx,
    render_camera_frames,
)

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@needs_fashion
def test_fashion_mnist_test_split() -> None:
    data = load_fashion_mnist("test")
    assert len(data) == 10_000
    assert data.shape == (1, 28, 28)
    assert data.images.dtype == torch.uint8
    assert data.class_names == FASHION_MNIST_CLASSES
    # The test set is balanced: 1,000 images per class.
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    mean, _ = data.mean_std()
    assert abs(mean[0] - FASHION_MNIST_MEAN) < 0.01


@needs_fashion
def test_fashion_mnist_train_split_and_dispatch() -> None:
    data = load_dataset("fashion-mnist", "train")
    assert len(data) == 60_000
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_fashion_mnist("val")


@needs_fashion
def test_camera_frames_are_deterministic_rgb_with_the_real_labels() -> None:
    grey = load_fashion_mnist("test")
    frames = load_dataset("fashion-mnist-camera", "test")
    assert frames.shape == (3, 96, 96) and len(frames) == 10_000
    assert torch.equal(frames.labels, grey.labels)
    assert frames.class_names == FASHION_MNIST_CLASSES
    # A frame depends on its image and index alone: rendering it on its own gives the
    # same bytes as rendering the whole split in chunks.
    again = render_camera_frames(grey.images[1500:1502], np.array([1500, 1501]))
    assert torch.equal(again, frames.images[1500:1502])
    other = render_camera_frames(grey.images[1500:1501], np.array([7]))
    assert not torch.equal(other[0], frames.images[1500])
    # Colour and noise: the channels differ, and no frame is flat.
    f = frames.images[:64].to(torch.float32)
    assert (f[:, 0] - f[:, 1]).abs().mean() > 5
    assert f.flatten(1).std(dim=1).min() > 5
    with pytest.raises(DataError, match=r"\(N, 1, 28, 28\)"):
        render_camera_frames(frames.images[:1], np.array([0]))
    # limit renders the first frames alone, the same bytes as in the whole split.
    head = load_dataset("fashion-mnist-camera", "test", limit=1100)
    assert len(head) == 1100 and torch.equal(head.images, frames.images[:1100])
    assert torch.equal(head.labels, grey.labels[:1100])
    assert len(load_dataset("fashion-mnist", "test", limit=3)) == 3


def test_mean_std_in_chunks_matches_torch() -> None:
    images = torch.randint(0, 256, (2500, 2, 3, 3), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(2500, dtype=torch.int64), ("a",), "random")
    mean, std = data.mean_std()
    x = images.to(torch.float64) / 255.0
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3)))


def test_fashion_mnist_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)


def test_mnist_5k() -> None:
    data = load_mnist_5k()
    assert len(data) == 5000 and data.shape == (1, 28, 28)
    assert set(data.labels.tolist()) == set(range(10))
    train = load_mnist_5k("train")
    test = load_dataset("mnist", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert set(train.labels[:50].tolist()) != {0}  # shuffled, not sorted by digit
    with pytest.raises(DataError, match="MNIST split"):
        load_mnist_5k("val")


def _write_idx(path: Path, array: np.ndarray, *, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.gz"
    _write_idx(good, arr)
    np.testing.assert_array_equal(read_idx(good), arr)
    bad_type = tmp_path / "float.gz"
    _write_idx(bad_type, arr, magic_type=0x0D)
    with pytest.raises(DataError, match="unsupported"):
        read_idx(bad_type)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(DataError, match="promises 100 bytes"):
        read_idx(truncated)
    not_idx = tmp_path / "text.gz"
    with gzip.open(not_idx, "wb") as f:
        f.write(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(not_idx)


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            img = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    grey = load_image_folder(tmp_path, channels=1, size=(28, 28))
    assert grey.class_names == ("cat", "dog")
    # In a fixed shuffled order, so that the first N images hold every class.
    assert sorted(grey.labels.tolist()) == [0, 0, 0, 1, 1]
    assert (
        grey.labels.tolist() == load_image_folder(tmp_path, channels=1, size=(8, 8)).labels.tolist()
    )
    assert grey.images.shape == (5, 1, 28, 28)
    rgb = load_dataset(str(tmp_path), "train", channels=3, size=(32, 32))
    assert rgb.images.shape == (5, 3, 32, 32)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_image_folder(tmp_path, channels=1, size=(28, 28))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path, channels=1, size=(8, 8))
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path, channels=1, size=(8, 8))
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", channels=1, size=(8, 8))


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    path = tmp_path / "d.npz"
    np.savez(path, images=nhwc, labels=labels, class_names=np.array(["x", "y", "z"]))
    data = load_npz(path)
    assert data.images.shape == (6, 3, 8, 8)
    assert data.class_names == ("x", "y", "z")
    np.testing.assert_array_equal(data.images.numpy(), nhwc.transpose(0, 3, 1, 2))
    plain = tmp_path / "p.npz"
    np.savez(plain, x=nhwc[..., 0], y=labels)
    assert load_dataset(str(plain)).images.shape == (6, 1, 8, 8)


def test_npz_errors(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="needs arrays 'images' and 'labels'"):
        load_npz(p)
    np.savez(p, images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="must be uint8"):
        load_npz(p)
    np.savez(p, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1, 1]))
    with pytest.raises(DataError, match="2 images but labels"):
        load_npz(p)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar-1000")
