"""Accuracy of the live bandwidth and RTT estimates: ``python -m bench.estimators [--quick]``.

The real device runtime (this process) talks through ``tools/netshape`` (its own process)
to a real ``spinn_server.py`` (its own process) on loopback, with the shipped model, as in
``bench.paper``.  For each shaped rate × round-trip time × policy it runs the device for a
few seconds and reads the estimates the device handed its policy for every frame
(``spinn.decisions.online_estimates.Estimates``: bandwidth B and round trip L):

* **server-only**: split 0, every input uploaded (under 1 KiB each);
* **middle split**: split 4 without early exits (about 4.4 KB per upload);
* **device-only**: nothing uploaded, the link idle but for PINGs and probe trains.

Per run: the median relative error of B against the shaped rate and of L against the
shaped RTT plus the loopback floor (the median L of an unshaped run: both event loops and
the proxy), after a warm-up; and the probe trains' bytes over what the link could carry in
the run, start-up included.  ``probe_overhead`` is the trains' share once started: the
difference between a short and a three times longer device-only run, per rate.  Then step runs: the rate changes half-way through a
middle-split run, and ``settle_s`` is the time from the step until B stays within 30% of
the new rate for the rest of the run (``None``: never).

Prints one table per RTT, then ONE JSON line:
``{"bench": "estimators", "bandwidth_error_median": ..., "bandwidth_error_p90": ...,
"rtt_error_median": ..., "settle_s_median": ..., "probe_overhead": ...}``
(errors relative, over the runs; ``probe_overhead`` the largest of any run).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._harness import ServerProcess, Shaper, Testbed, measure
from bench.paper import DEFAULT_CHECKPOINT
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, FixedPolicy, Policy

__all__ = ["Plan", "main", "run"]

SETTLE_REL = 0.3
"""A step is settled once B stays within this of the new rate."""


@dataclass(frozen=True)
class Plan:
    name: str
    rates_mbit: tuple[float, ...]
    rtts_ms: tuple[float, ...]
    run_s: float
    """Length of each run."""
    warmup_s: float
    """Estimates before this (from the first frame) are not scored."""
    steps_mbit: tuple[tuple[float, float], ...]
    """Rate before and after each step run's step."""
    step_rtt_ms: float
    step_half_s: float
    """Each step run holds each rate this long."""
    overhead_rates_mbit: tuple[float, ...]
    """Rates whose steady probe overhead is measured (``steady_overhead``)."""


FULL = Plan(
    "full",
    rates_mbit=(0.5, 5, 24, 100, 250, 500),
    rtts_ms=(1, 40, 100),
    run_s=3.0,
    warmup_s=1.0,
    steps_mbit=((24, 250), (250, 24), (50, 1), (1, 50), (500, 5)),
    step_rtt_ms=20,
    step_half_s=3.0,
    overhead_rates_mbit=(0.5, 24, 500),
)
QUICK = Plan(
    "quick",
    rates_mbit=(1, 50, 500),
    rtts_ms=(20,),
    run_s=2.0,
    warmup_s=0.8,
    steps_mbit=((250, 24),),
    step_rtt_ms=20,
    step_half_s=2.0,
    overhead_rates_mbit=(1,),
)


class _Trace:
    """A fixed policy that keeps the estimates it was handed, with their time."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.points: list[tuple[float, float, float]] = []
        """(time, B bit/s, L s) per decision, on ``time.perf_counter``'s clock."""

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.points.append((time.perf_counter(), estimates.bandwidth_bps, estimates.latency_s))
        return self.inner.decide(now, estimates)


@dataclass
class Case:
    rate_mbit: float
    rtt_ms: float
    policy: str
    bandwidth_mbit_median: float = math.nan
    bandwidth_error: float = math.nan
    latency_ms_median: float = math.nan
    rtt_error: float = math.nan
    probe_overhead: float = math.nan
    trains: int = 0
    frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _rel(value: float, ref: float) -> float:
    return abs(value / ref - 1.0)


def _policies(tb: Testbed) -> dict[str, Policy]:
    s = tb.profile.num_stages
    return {
        "server-only": FixedPolicy(0, 1.0),
        "middle": FixedPolicy(min(4, s - 1), 1.0),
        "device-only": FixedPolicy(s, 0.8),
    }


def _run(
    tb: Testbed, shaper: Shaper, policy: Policy, duration_s: float
) -> tuple[_Trace, dict[str, Any], float]:
    trace = _Trace(policy)
    t0 = time.perf_counter()
    result = measure(tb, shaper.port, "trace", trace, duration_s=duration_s, warmup_s=0.0)
    return trace, result.summary, t0


def loopback_floor_ms(tb: Testbed, server: ServerProcess, run_s: float) -> float:
    """Median L of a device-only run through an unshaped proxy: the round trip's floor."""
    with Shaper(tb, server.port) as shaper:
        trace, _, t0 = _run(tb, shaper, _policies(tb)["device-only"], run_s)
    lat = [lat for t, _, lat in trace.points if t >= t0 + 0.5]
    return 1e3 * statistics.median(lat)


def run_case(
    tb: Testbed, shaper: Shaper, case: Case, policy: Policy, plan: Plan, floor_ms: float
) -> Case:
    rate = case.rate_mbit * 1e6
    shaper.set(f"{case.rate_mbit:g}mbit", f"{case.rtt_ms / 2:g}ms")
    trace, summary, t0 = _run(tb, shaper, policy, plan.run_s)
    pts = [p for p in trace.points if p[0] >= t0 + plan.warmup_s] or trace.points
    bws = [b for _, b, _ in pts]
    lats = [lat for _, _, lat in pts]
    ref_rtt = case.rtt_ms + floor_ms
    case.bandwidth_mbit_median = statistics.median(bws) / 1e6
    case.bandwidth_error = statistics.median(_rel(b, rate) for b in bws)
    case.latency_ms_median = 1e3 * statistics.median(lats)
    case.rtt_error = statistics.median(_rel(1e3 * v, ref_rtt) for v in lats)
    est = summary.get("estimates", {})
    case.probe_overhead = 8.0 * float(est.get("probe_bytes", 0)) / (rate * plan.run_s)
    case.trains = int(est.get("probe_trains", 0))
    case.frames = len(trace.points)
    return case


def steady_overhead(
    tb: Testbed, server: ServerProcess, rate_mbit: float, rtt_ms: float, short_s: float
) -> float:
    """The probe trains' share of the link once started: the probe bytes of a device-only
    run of ``3 × short_s`` less those of one of ``short_s``, over what the link carried
    in the difference (the start-up, from the prior to the link's rate, cancels out)."""
    policy = _policies(tb)["device-only"]
    sent = []
    with Shaper(tb, server.port, rate=f"{rate_mbit:g}mbit", delay=f"{rtt_ms / 2:g}ms") as sh:
        for duration in (short_s, 3 * short_s):
            _, summary, _ = _run(tb, sh, policy, duration)
            sent.append(float(summary.get("estimates", {}).get("probe_bytes", 0)))
    return 8.0 * (sent[1] - sent[0]) / (rate_mbit * 1e6 * 2 * short_s)


def settle_time(
    points: list[tuple[float, float, float]], t_step: float, rate_bps: float
) -> float | None:
    """Seconds from ``t_step`` until B stayed within ``SETTLE_REL`` of ``rate_bps`` for the
    rest of the points (``None`` if it was off at the last one)."""
    after = [(t, b) for t, b, _ in points if t >= t_step]
    off = [i for i, (_, b) in enumerate(after) if _rel(b, rate_bps) > SETTLE_REL]
    if not off:
        return 0.0 if after else None
    if off[-1] == len(after) - 1:
        return None
    return after[off[-1] + 1][0] - t_step


def run_step(
    tb: Testbed, server: ServerProcess, before: float, after: float, plan: Plan, policy: Policy
) -> dict[str, Any]:
    delay = f"{plan.step_rtt_ms / 2:g}ms"
    with Shaper(tb, server.port, rate=f"{before:g}mbit", delay=delay) as shaper:
        stepped: list[float] = []

        def step() -> None:
            shaper.set(f"{after:g}mbit", delay)
            stepped.append(time.perf_counter())

        timer = threading.Timer(plan.step_half_s, step)
        timer.start()
        try:
            trace, summary, _ = _run(tb, shaper, policy, 2 * plan.step_half_s)
        finally:
            timer.cancel()
    if not stepped:
        return {"from_mbit": before, "to_mbit": after, "settle_s": None, "error": "no step"}
    t_step = stepped[0]
    settle = settle_time(trace.points, t_step, after * 1e6)
    tail = [b for t, b, _ in trace.points if t >= t_step + plan.step_half_s / 2]
    return {
        "from_mbit": before,
        "to_mbit": after,
        "settle_s": None if settle is None else round(settle, 3),
        "bandwidth_mbit_after": round(statistics.median(tail) / 1e6, 3) if tail else None,
    }


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}%"


def print_table(cases: list[Case], rtt_ms: float, floor_ms: float) -> None:
    print(f"\nRTT {rtt_ms:g} ms (L reference {rtt_ms + floor_ms:.2f} ms = shaped + floor)")
    print(
        f"{'rate Mbit/s':>11} {'policy':>12} {'B median':>10} {'B err':>7} {'L ms':>8} "
        f"{'L err':>7} {'probe':>6} {'trains':>7}"
    )
    for c in cases:
        print(
            f"{c.rate_mbit:>11g} {c.policy:>12} {c.bandwidth_mbit_median:>10.3f} "
            f"{_pct(c.bandwidth_error):>7} {c.latency_ms_median:>8.2f} {_pct(c.rtt_error):>7} "
            f"{_pct(c.probe_overhead):>6} {c.trains:>7}",
            flush=True,
        )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run(plan: Plan, checkpoint: Path, device_slowdown: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spinn-bench-est-") as tmp:
        workdir = Path(tmp)
        tb = Testbed.prepare(
            checkpoint, checkpoint.with_name("profile.json"), device_slowdown, workdir
        )
        print(f"plan {plan.name}; device slowdown ×{device_slowdown:g}; {tb.cores.describe()}")
        policies = _policies(tb)
        # The first run of a process pays torch's lazy start-up; not scored.
        measure(tb, None, "warm-up", policies["device-only"], duration_s=1.0, warmup_s=0.0)
        cases: list[Case] = []
        steps: list[dict[str, Any]] = []
        with ServerProcess(tb) as server:
            floor_ms = loopback_floor_ms(tb, server, 2.0)
            print(f"loopback floor of the round trip: {floor_ms:.3f} ms", flush=True)
            for rtt in plan.rtts_ms:
                rows = []
                with Shaper(tb, server.port) as shaper:
                    for rate in plan.rates_mbit:
                        for name, policy in policies.items():
                            rows.append(
                                run_case(tb, shaper, Case(rate, rtt, name), policy, plan, floor_ms)
                            )
                print_table(rows, rtt, floor_ms)
                cases += rows
            print("\nprobe trains' share of the link once started (device-only)")
            steady = {}
            for rate in plan.overhead_rates_mbit:
                steady[rate] = steady_overhead(tb, server, rate, plan.step_rtt_ms, plan.run_s)
                print(f"{rate:g} Mbit/s: {steady[rate]:.1%}", flush=True)
            print(f"\nsteps (middle split, RTT {plan.step_rtt_ms:g} ms)")
            for before, after in plan.steps_mbit:
                s = run_step(tb, server, before, after, plan, policies["middle"])
                print(
                    f"{before:g} -> {after:g} Mbit/s: B within {SETTLE_REL:.0%} after "
                    f"{s['settle_s']} s; median B in the step's second half "
                    f"{s.get('bandwidth_mbit_after')} Mbit/s",
                    flush=True,
                )
                steps.append(s)
    bw = [c.bandwidth_error for c in cases]
    settles = [s["settle_s"] for s in steps]
    settled = [x for x in settles if x is not None]
    return {
        "bench": "estimators",
        "plan": plan.name,
        "device_slowdown": device_slowdown,
        "loopback_floor_ms": round(floor_ms, 3),
        "bandwidth_error_median": round(statistics.median(bw), 4),
        "bandwidth_error_p90": round(_quantile(bw, 0.9), 4),
        "bandwidth_within_20pct": f"{sum(e <= 0.2 for e in bw)}/{len(bw)}",
        "rtt_error_median": round(statistics.median(c.rtt_error for c in cases), 4),
        "rtt_within_20pct": f"{sum(c.rtt_error <= 0.2 for c in cases)}/{len(cases)}",
        # Steps B never came back from count as not settled: the median is over all steps.
        "settle_s_median": (
            None
            if len(settled) * 2 <= len(settles)
            else round(statistics.median(x if x is not None else math.inf for x in settles), 3)
        ),
        "steps_settled": f"{len(settled)}/{len(settles)}",
        # Once started; the runs' own figures include the start-up from the prior.
        "probe_overhead": round(max(steady.values()), 4),
        "probe_overhead_steady": {f"{r:g}": round(v, 4) for r, v in steady.items()},
        "probe_overhead_run_max": round(max(c.probe_overhead for c in cases), 4),
        "probe_overhead_run_median": round(statistics.median(c.probe_overhead for c in cases), 4),
        "cases": [
            {
                "rate_mbit": c.rate_mbit,
                "rtt_ms": c.rtt_ms,
                "policy": c.policy,
                "bandwidth_mbit_median": round(c.bandwidth_mbit_median, 4),
                "bandwidth_error": round(c.bandwidth_error, 4),
                "latency_ms_median": round(c.latency_ms_median, 3),
                "rtt_error": round(c.rtt_error, 4),
                "probe_overhead": round(c.probe_overhead, 4),
            }
            for c in cases
        ],
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one RTT, three rates (< 1 min)")
    parser.add_argument("--device-slowdown", type=float, default=5.0,
                        help="each device stage takes K× its time (default 5)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    figures = run(QUICK if args.quick else FULL, args.checkpoint, args.device_slowdown)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
