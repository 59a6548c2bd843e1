"""Frame sources on real files written here, preprocessing, pacing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from spinn.model.progressive import InputSpec
from spinn.runtime.sources import (
    ArraySource,
    CaptureSource,
    ImageFolderSource,
    Pacer,
    SourceError,
    camera_target,
    dataset_source,
    folder_class,
    preprocess,
)

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.5,), std=(0.25,))


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocess_gray_same_size_is_scale_and_normalise() -> None:
    img = np.arange(28 * 28, dtype=np.int64).reshape(28, 28).astype(np.uint8)
    x = preprocess(img, SPEC).numpy()
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (img / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_preprocess_rgb_to_gray_and_resize() -> None:
    img = np.zeros((56, 84, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x = preprocess(img, SPEC).numpy()
    assert x.shape == (1, 28, 28)
    # ITU-R BT.601 luma of red: 0.299
    np.testing.assert_allclose(x, (76 / 255 - 0.5) / 0.25, atol=2e-2)


def test_preprocess_gray_to_rgb_and_errors() -> None:
    img = np.full((10, 10), 255, np.uint8)
    rgb = InputSpec(channels=3, height=8, width=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = preprocess(img, rgb)
    assert tuple(x.shape) == (3, 8, 8)
    np.testing.assert_allclose(x.numpy(), 1.0)
    with pytest.raises(SourceError, match="uint8"):
        preprocess(img.astype(np.float32), SPEC)
    with pytest.raises(SourceError, match="H×W or H×W×3"):
        preprocess(np.zeros((4, 4, 2), np.uint8), SPEC)


def test_image_folder_reads_sorted_with_class_labels(tmp_path: Path) -> None:
    for cls, seed in (("Trouser", 1), ("Bag", 2)):
        (tmp_path / cls).mkdir()
        cv2.imwrite(str(tmp_path / cls / f"{seed}.png"), _rgb(30, 40, seed)[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "loose.jpg"), _rgb(16, 16, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path, class_names=["T-shirt", "Trouser", "Bag"])
    frames = list(src)
    assert [Path(f.origin).name for f in frames] == ["2.png", "1.png", "loose.jpg"]
    assert [f.label for f in frames] == [2, 1, None]
    # PNG is lossless: the RGB conversion round-trips exactly.
    np.testing.assert_array_equal(frames[1].image, _rgb(30, 40, 1))
    assert [f.index for f in frames] == [0, 1, 2]
    assert len(ImageFolderSource(tmp_path, limit=1)) == 1


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]  # fmt: skip


def test_folder_names_give_classes_by_name_index_or_spelling() -> None:
    assert folder_class("Trouser", FASHION) == 1
    # A class index within the classes.
    assert folder_class("0", FASHION) == 0 and folder_class("9", FASHION) == 9
    assert folder_class("10", FASHION) is None and folder_class("-1", FASHION) is None
    # '/' cannot be in a folder name: any case, '/' as '_', '-', ' ' or nothing.
    for spelling in ("T-shirt_top", "t-shirt top", "tshirttop", "TSHIRT-TOP"):
        assert folder_class(spelling, FASHION) == 0, spelling
    assert folder_class("ankle_boot", FASHION) == 9 and folder_class("ANKLEBOOT", FASHION) == 9
    assert folder_class("cat", FASHION) is None and folder_class("__", FASHION) is None
    # The exact name wins over an index; two classes spelled alike give no label.
    assert folder_class("3", ["a", "b", "c", "d", "3"]) == 4
    assert folder_class("ab", ["a-b", "a_b"]) is None and folder_class("a_b", ["a-b", "a_b"]) == 1


def test_image_folder_labels_from_numeric_and_respelled_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for folder in ("0", "ankle_boot", "cat", "dog", "12"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), _rgb(8, 8, 0))
    cv2.imwrite(str(tmp_path / "loose.png"), _rgb(8, 8, 0))
    with caplog.at_level("WARNING", logger="spinn.runtime.sources"):
        frames = list(ImageFolderSource(tmp_path, class_names=FASHION))
    labels = {Path(f.origin).parent.name: f.label for f in frames}
    assert labels == {"0": 0, "ankle_boot": 9, "cat": None, "dog": None, "12": None,
                      tmp_path.name: None}  # fmt: skip
    # One warning names every folder that gives no label.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "12, cat, dog" in warnings[0]
    caplog.clear()
    ImageFolderSource(tmp_path / "0", class_names=FASHION)
    ImageFolderSource(tmp_path)  # no class names: no labels to miss
    assert not caplog.records


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a directory"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(SourceError, match="no image files"):
        ImageFolderSource(tmp_path)
    # A folder of files none of which decodes still opens: each file is one failed frame.
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert len(ImageFolderSource(tmp_path)) == 1


def _folder_with_a_broken_image(root: Path) -> None:
    """``cat/`` and ``dog/`` with three 28×28 PNGs each, and ``dog/broken.png``, a text file."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(3):
            cv2.imwrite(str(root / cls / f"{i}.png"), rng.integers(0, 256, (28, 28), np.uint8))
    (root / "dog" / "broken.png").write_text("not an image\n")


def test_an_unreadable_image_is_a_frame_that_says_why(tmp_path: Path) -> None:
    _folder_with_a_broken_image(tmp_path)
    frames = list(ImageFolderSource(tmp_path, class_names=["cat", "dog"]))
    assert [Path(f.origin).name for f in frames] == ["0.png", "1.png", "2.png"] + [
        "0.png", "1.png", "2.png", "broken.png"
    ]  # fmt: skip
    broken = frames[-1]
    assert broken.index == 6 and broken.label == 1 and broken.image.size == 0
    assert "cannot decode" in broken.error and "broken.png" in broken.error
    assert not any(f.error for f in frames[:-1])
    # Should a frame without pixels reach the model anyway, it fails there alone.
    with pytest.raises(SourceError, match="no pixels"):
        preprocess(broken.image, SPEC)


def test_an_unreadable_image_gets_one_error_record_and_the_run_goes_on(
    tmp_path: Path, checkpoint: Path
) -> None:
    from tests.support.runtime import by_frame, run_in_process

    _folder_with_a_broken_image(tmp_path)
    source = ImageFolderSource(tmp_path)
    run = run_in_process(checkpoint, source, serve=False, connect=False, split=2, thr_conf=0.8)
    records = by_frame(run.records, 7)
    errors = [r for r in records if r["where"] == "error"]
    assert [r["frame"] for r in errors] == [6]
    assert "cannot decode" in errors[0]["error"] and errors[0]["origin"].endswith("broken.png")
    assert all(r["where"] == "device" for r in records[:6])
    summary = run.summary
    assert summary["frames_read"] == 7 and summary["errors"] == 1
    assert summary["frames"] == 6 and summary["unanswered"] == 0


def test_video_file_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (32, 24))
    assert writer.isOpened()
    for i in range(7):
        writer.write(np.full((24, 32, 3), i * 30, np.uint8))
    writer.release()
    src = CaptureSource(str(path), kind="video")
    frames = list(src)
    src.close()
    assert len(frames) == 7
    assert frames[0].image.shape == (24, 32, 3)
    # MJPG is lossy and goes through YUV: brightness survives within a few levels.
    for i, f in enumerate(frames):
        assert abs(float(f.image.mean()) - i * 30) <= 6, (i, f.image.mean())
    limited = CaptureSource(str(path), kind="video", limit=3)
    assert len(list(limited)) == 3
    limited.close()
    with pytest.raises(SourceError, match="no such file"):
        CaptureSource(str(tmp_path / "nope.mp4"), kind="video")
    (tmp_path / "junk.mp4").write_bytes(b"junk")
    with pytest.raises(SourceError, match="cannot open"):
        CaptureSource(str(tmp_path / "junk.mp4"), kind="video")


def test_camera_target_parsing() -> None:
    assert camera_target("0") == 0
    assert camera_target("rtsp://127.0.0.1:8554/cam") == "rtsp://127.0.0.1:8554/cam"
    with pytest.raises(SourceError, match="device index or a URL"):
        camera_target("front")
    with pytest.raises(SourceError, match=">= 0"):
        camera_target("-1")


def test_array_source_labels_limit_and_errors() -> None:
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.arange(5)
    frames = list(ArraySource(images, labels, name="ds", limit=3))
    assert [(f.index, f.label, f.origin) for f in frames] == [
        (0, 0, "ds[0]"),
        (1, 1, "ds[1]"),
        (2, 2, "ds[2]"),
    ]
    with pytest.raises(SourceError, match="5 images but 4 labels"):
        ArraySource(images, labels[:4])
    with pytest.raises(SourceError, match="uint8"):
        list(ArraySource(images.astype(np.float32)))


def test_pacer_keeps_rate_without_drift() -> None:
    p = Pacer(10.0)
    assert p.wait_s(100.0) == 0.0
    assert p.wait_s(100.0) == pytest.approx(0.1)
    # A late frame (released at 100.35 instead of 100.2) does not shift later ones.
    assert p.wait_s(100.35) == 0.0
    assert p.wait_s(100.31) == 0.0
    assert p.wait_s(100.32) == pytest.approx(0.08)
    fast = Pacer(None)
    assert fast.wait_s(0.0) == 0.0 and fast.wait_s(0.0) == 0.0
    with pytest.raises(SourceError, match="--rate"):
        Pacer(-1.0)


def test_fashion_mnist_replay_is_the_real_test_set() -> None:
    src = dataset_source("fashion-mnist:test", limit=5)
    frames = list(src)
    assert len(frames) == 5 and src.class_names[0] == "T-shirt/top"
    assert frames[0].image.shape == (28, 28) and frames[0].image.dtype == np.uint8
    # The first Fashion-MNIST test image is an ankle boot (class 9).
    assert frames[0].label == 9
    with pytest.raises(SourceError, match="unknown dataset"):
        dataset_source("cifar")
    with pytest.raises(SourceError, match="'test' or 'train'"):
        dataset_source("fashion-mnist:val")


def test_camera_replay_renders_only_the_frames_asked_for() -> None:
    src = dataset_source("fashion-mnist-camera", limit=3)
    frames = list(src)
    assert len(frames) == 3 and src.class_names[0] == "T-shirt/top"
    # Height x width x RGB, as a camera gives them; the first test image is an ankle boot.
    assert frames[0].image.shape == (96, 96, 3) and frames[0].image.dtype == np.uint8
    assert frames[0].label == 9
    with pytest.raises(SourceError, match="'test' or 'train'"):
        dataset_source("fashion-mnist-camera:val")


def test_sixteen_bit_images_keep_the_high_byte(tmp_path: Path) -> None:
    img16 = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), img16)
    (frame,) = list(ImageFolderSource(tmp_path))
    np.testing.assert_array_equal(frame.image, (img16 >> 8).astype(np.uint8))
