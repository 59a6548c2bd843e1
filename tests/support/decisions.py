"""Shared by the tests of the decisions: a small hand-made profile for the scenarios and
estimates by bandwidth."""

from __future__ import annotations

from spinn.decisions.offline_profile import Profile, SplitProfile, ThresholdProfile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.sla import SLA, Metric

__all__ = ["LATENCY_FIRST", "est", "scenario_profile"]


def scenario_profile() -> Profile:
    """S = 6 equal device stages (4 ms) and a 10x faster server; exits after stages 1, 3
    and 5; the input (split 0) is 12 kB and activations shrink with depth."""
    sizes = [12_000, 40_000, 20_000, 10_000, 4_000, 2_000]
    return Profile(
        model_id="scenario",
        weights_sha256="0" * 64,
        arch="toy-stages",
        num_stages=6,
        exit_stages=(1, 3, 5),
        splits=tuple(
            SplitProfile(split=s, shape=(b // 4,), numel=b // 4, bytes={"float32": b})
            for s, b in enumerate(sizes)
        ),
        stage_device_ms=(4.0,) * 6,
        stage_server_ms=(0.4,) * 6,
        exit_accuracy=(0.6, 0.8, 0.93),
        thresholds=(
            ThresholdProfile(0.0, (0.8, 0.15, 0.05), 0.70),
            ThresholdProfile(0.5, (0.5, 0.3, 0.2), 0.85),
            ThresholdProfile(0.9, (0.2, 0.3, 0.5), 0.92),
            ThresholdProfile(1.0, (0.0, 0.0, 1.0), 0.93),
        ),
        calibration_size=1000,
    )


def est(bw_mbit: float, lat_ms: float = 5.0, **kw: float | bool) -> Estimates:
    return Estimates(bandwidth_bps=bw_mbit * 1e6, latency_s=lat_ms / 1000, **kw)  # type: ignore[arg-type]


LATENCY_FIRST = SLA(rank=(Metric.LATENCY,))
