"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol.description import Description

__all__ = [
    "FRAME_DATASETS",
    "ROOT",
    "ensure_profile",
    "frames_dataset",
    "pin_one_core",
    "stub_description",
]

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: the benchmarks start spinn_server.py and netshape from here."""


def pin_one_core() -> int | None:
    """Run this process on a single core (the highest available), as the single-core
    targets say; returns the core, or None where affinity is unsupported."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
        return cores[-1]
    except (AttributeError, OSError):
        return None


# The datasets a checkpoint's recipe may name whose test split the benchmarks replay.
FRAME_DATASETS = ("fashion-mnist", "fashion-mnist-camera")


def frames_dataset(recipe: Mapping[str, Any]) -> str:
    """The dataset whose test split a model's benchmark runs replay: the one it was trained
    on (``recipe['dataset']``) when it is one of ``FRAME_DATASETS``, else Fashion-MNIST."""
    name = recipe.get("test_dataset") or recipe.get("dataset")
    return name if name in FRAME_DATASETS else "fashion-mnist"


def ensure_profile(checkpoint: Path, profile_path: Path, workdir: Path) -> Path:
    """The checkpoint's profile; measured here (small calibration, on the test split of
    the dataset the model was trained on) when none ships."""
    if profile_path.exists():
        return profile_path
    from spinn.model.checkpoint import load_checkpoint
    from spinn.offline import data
    from spinn.offline.profiling import ProfilerConfig, profile_model

    print(f"{profile_path} missing: profiling {checkpoint} on 1000 test images")
    model, meta = load_checkpoint(checkpoint)
    if frames_dataset(meta.recipe) == "fashion-mnist-camera":
        calibration = data.load_fashion_mnist_camera("test", limit=1000)
    else:
        calibration = data.load_fashion_mnist("test")
    # The widths on the same 1,000 images: a stand-in profile, quick to make.
    cfg = ProfilerConfig(calibration_size=1000, repeats=15, lossy_inputs=1000)
    prof = profile_model(model, meta, calibration, cfg)
    out = workdir / "profile.json"
    prof.save(out)
    return out


def stub_description() -> Description:
    """A WELCOME description for the in-memory servers of benchmarks and tests that serve
    no model (PROTOCOL.md §5.12 requires one from version 2): one 1×1×1 input, two splits."""
    from protocol.description import Description

    return Description(
        input_shape=(1, 1, 1),
        input_mean=(0.0,),
        input_std=(1.0,),
        classes=("a", "b"),
        split_shapes=((1, 1, 1), (4,)),
        max_batch=1,
        max_frame_bytes=2**26,
        max_tensor_elements=2**24,
        max_in_flight=1024,
        max_outstanding=1024,
        handshake_timeout_s=10.0,
        idle_timeout_s=60.0,
    )
