"""The device's busy-time accounting (spinn.decisions.online_estimates.DeviceBusyEstimator) on real runs:
a saturating stream measures it, a paced one does not, and the worker's calls it sums
never add up to more than the run's wall time (docs/SCHEDULER.md, "device busy time")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.runtime import noise_frames, run_in_process

pytestmark = pytest.mark.timeout(90)


def test_saturating_stream_measures_the_busy_time(checkpoint: Path) -> None:
    # Split 1 with a high threshold: every frame is packed and uploaded, and the local
    # race runs stage calls after the split.
    run = run_in_process(
        checkpoint, noise_frames(40, seed=3), split=1, thr_conf=0.99, max_in_flight=4
    )
    device, wall_s = run.device, run.run_s
    assert len(run.records) == 40
    busy = device.core.profiler.busy
    snap = device.core.profiler.snapshot(0.0)
    assert snap.busy_scale is not None and snap.busy_scale > 0
    assert snap.head_overhead_ms is not None and snap.head_overhead_ms > 0
    assert snap.upload_busy_ms > 0  # 40 uploads packed and sent
    # The head calls' busy time is the worker's timeline between consecutive calls: their
    # sum cannot exceed the run's wall time (one worker: the intervals are disjoint).
    head_calls = busy._head._samples  # window 64 > 40 heads: every queued one is here
    stage_ms = busy._real.total
    assert 0 < len(head_calls) <= 40
    assert sum(head_calls) + stage_ms <= 1000 * wall_s


def test_paced_stream_leaves_the_busy_time_unmeasured(checkpoint: Path) -> None:
    # Frames 100 ms apart on a device that needs a few ms each: no call ever queues, so the
    # gaps are idleness and the throughput model keeps the latency overhead instead.
    run = run_in_process(checkpoint, noise_frames(6, seed=3), split=11, thr_conf=0.5, rate_fps=10.0)
    device = run.device
    assert len(run.records) == 6
    snap = device.core.profiler.snapshot(0.0)
    assert snap.head_overhead_ms is None and snap.busy_scale is None
    assert snap.frame_overhead_ms > 0  # measured from the local answers as before
