"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import os

__all__ = ["pin_one_core"]


def pin_one_core() -> int | None:
    """Run this process on a single core (the highest available), as the single-core
    targets say; returns the core, or None where affinity is unsupported."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
        return cores[-1]
    except (AttributeError, OSError):
        return None
