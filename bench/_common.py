"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.description import Description

__all__ = ["ROOT", "ensure_profile", "pin_one_core", "stub_description"]

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


def ensure_profile(checkpoint: Path, profile_path: Path, workdir: Path) -> Path:
    """The checkpoint's profile; measured here (small calibration) when none ships."""
    if profile_path.exists():
        return profile_path
    from spinn.checkpoint import load_checkpoint
    from spinn.data import load_fashion_mnist
    from spinn.profiler import ProfilerConfig, profile_model

    print(f"{profile_path} missing: profiling {checkpoint} on 1000 test images")
    model, meta = load_checkpoint(checkpoint)
    prof = profile_model(
        model, meta, load_fashion_mnist("test"), ProfilerConfig(calibration_size=1000, repeats=15)
    )
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
