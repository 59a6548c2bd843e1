"""Scheduler benchmark: decision time over the whole candidate grid.

``python -m bench.scheduler`` times ``Scheduler.decide`` (predictions for every split ×
threshold, lexicographic choice, hysteresis) on one core for a synthetic 20-split ×
20-threshold profile (21 × 21 candidates with server-only and "no early exit") and, when
present, for the shipped model's profile (models/default/profile.json).  Target
(issue 6): median < 1 ms for 20 × 20 on one core.  The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from spinn.estimators import Estimates
from spinn.profile import Profile, synthetic_profile
from spinn.scheduler import Scheduler, SchedulerConfig
from spinn.sla import SLA, Metric

DEFAULT_PROFILE = Path("models/default/profile.json")


def _pin_one_core() -> int | None:
    """Run on a single core, as the target says; returns the core or None if unsupported."""
    try:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
        return cores[-1]
    except (AttributeError, OSError):
        return None


def _walk(rng: random.Random, calls: int) -> list[Estimates]:
    """Estimates that drift as a random walk (bandwidth by up to ~20% per step, the rest
    less), with rare server outages: the re-planning and hysteresis paths both run."""
    bw, lat, sf, g, q = 20e6, 0.02, 1.0, 1.0, 0.0
    out = []
    up = True
    for _ in range(calls):
        bw = min(1e9, max(1e5, bw * rng.lognormvariate(0, 0.1)))
        lat = min(0.2, max(1e-4, lat * rng.lognormvariate(0, 0.05)))
        sf = min(4.0, max(0.5, sf * rng.lognormvariate(0, 0.03)))
        g = min(10.0, max(0.5, g * rng.lognormvariate(0, 0.05)))
        q = max(0.0, q + rng.choice((-1.0, 0.0, 0.0, 1.0)))
        if rng.random() < 0.002:
            up = not up
        out.append(Estimates(bw, lat, sf, g, q, up))
    return out


def time_decisions(
    profile: Profile, calls: int, seed: int, hysteresis: float = 5.0
) -> dict[str, float]:
    """Median and p99 of ``decide`` over ``calls`` calls on drifting estimates."""
    sla = SLA(max_latency_ms=50, min_accuracy=0.5, rank=(Metric.ACCURACY, Metric.SERVER_COST))
    sched = Scheduler(profile, sla, SchedulerConfig(hysteresis=hysteresis))
    warmup = 200
    walk = _walk(random.Random(seed), calls + warmup)
    times: list[float] = []
    for i, est in enumerate(walk):
        t0 = time.perf_counter()
        sched.decide(float(i), est)
        dt = time.perf_counter() - t0
        if i >= warmup:  # first calls pay for numpy's lazy initialisation
            times.append(dt * 1000.0)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p99_ms": times[int(0.99 * (len(times) - 1))],
        "changes": float(len(sched.history)),
        "grid": float(sched.predictor.shape[0] * sched.predictor.shape[1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="decisions timed per profile")
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    core = _pin_one_core()
    print(f"pinned to core {core}" if core is not None else "could not pin to one core")

    result: dict[str, object] = {"bench": "scheduler"}
    synth = synthetic_profile(
        random.Random(args.seed), num_stages=20, num_exits=7, num_thresholds=20
    )
    r = time_decisions(synth, args.calls, args.seed)
    print(
        f"synthetic 20 splits x 20 thresholds ({r['grid']:.0f} candidates): "
        f"decide median {r['median_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
        f"{r['changes']:.0f} re-plans in {args.calls} calls"
    )
    flappy = time_decisions(synth, args.calls, args.seed, hysteresis=1.0)
    print(
        f"same walk without hysteresis: {flappy['changes']:.0f} re-plans (with: {r['changes']:.0f})"
    )
    result["replans"] = int(r["changes"])
    result["replans_without_hysteresis"] = int(flappy["changes"])
    result["decision_ms"] = round(r["median_ms"], 4)
    result["decision_p99_ms"] = round(r["p99_ms"], 4)
    result["decision_target_met"] = r["median_ms"] < 1.0
    if args.profile.exists():
        prof = Profile.load(args.profile)
        rd = time_decisions(prof, args.calls, args.seed)
        print(
            f"{args.profile} ({prof.arch}, S={prof.num_stages}, {len(prof.thresholds)} thresholds): "
            f"decide median {rd['median_ms']:.3f} ms, p99 {rd['p99_ms']:.3f} ms"
        )
        result["model_decision_ms"] = round(rd["median_ms"], 4)
    else:
        print(f"{args.profile} not found: timing the synthetic profile only")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
