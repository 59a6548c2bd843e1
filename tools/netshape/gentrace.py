"""Generator of the shipped traces: ``python -m tools.netshape.gentrace --all tools/netshape/traces``.

The paper's network settings (SPINN, MobiCom'20, Sec. 7) are read as: 4G = 24 Mbit/s with
40 ms round-trip latency, 5G = 250 Mbit/s with 1 ms round-trip latency. A trace's ``delay``
column is one-way and applied in each direction, so these traces carry half the round trip.

Kinds (all deterministic for a given seed):

* ``4g``: steady 24 Mbit/s both ways, 20 ms one-way delay.
* ``5g``: steady 250 Mbit/s both ways, 0.5 ms one-way delay.
* ``fluctuating``: a random walk of the rate in log space between 1 and 100 Mbit/s, one row
  per second, the download at twice the upload (capped at 100 Mbit/s), delay 10-40 ms;
  meant to be replayed with ``--trace-interp linear``.
* ``outages``: the 4G link with a black hole (3 s at 10 s), a reset (at 25 s, 1 s) and a
  refused period (2 s at 40 s), for the paper's server-failure experiments.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from tools.netshape.trace import TracePoint, format_trace

__all__ = ["KINDS", "generate", "main"]

KINDS: tuple[str, ...] = ("4g", "5g", "fluctuating", "outages")

_4G_RATE = 24e6
_4G_DELAY = 0.020
_5G_RATE = 250e6
_5G_DELAY = 0.0005


def _steady(rate: float, delay: float, duration_s: float) -> list[TracePoint]:
    return [
        TracePoint(0.0, rate, rate, delay, 0.0, None),
        TracePoint(duration_s, rate, rate, delay, 0.0, None),
    ]


def _fluctuating(rng: random.Random, duration_s: float) -> list[TracePoint]:
    lo, hi = math.log(1e6), math.log(100e6)
    log_rate = math.log(10e6)
    delay = 0.020
    points = []
    for second in range(int(duration_s) + 1):
        up = round(math.exp(log_rate))
        down = min(2 * up, 100_000_000)
        points.append(TracePoint(float(second), float(up), float(down), round(delay, 4), 0.0, None))
        # Reflecting random walk: rates change by up to ~x1.5 per second.
        log_rate += rng.uniform(-0.4, 0.4)
        if log_rate > hi:
            log_rate = 2 * hi - log_rate
        elif log_rate < lo:
            log_rate = 2 * lo - log_rate
        delay = min(0.040, max(0.010, delay + rng.uniform(-0.004, 0.004)))
    return points


def _outages(duration_s: float) -> list[TracePoint]:
    r, d = _4G_RATE, _4G_DELAY
    windows = [(10.0, 13.0, "blackhole"), (25.0, 26.0, "reset"), (40.0, 42.0, "refuse")]
    points = [TracePoint(0.0, r, r, d, 0.0, None)]
    for start, end, mode in windows:
        if end < duration_s:
            points.append(TracePoint(start, r, r, d, 0.0, mode))
            points.append(TracePoint(end, r, r, d, 0.0, None))
    points.append(TracePoint(duration_s, r, r, d, 0.0, None))
    return points


def generate(kind: str, *, seed: int = 0, duration_s: float = 60.0) -> list[TracePoint]:
    """The rows of trace ``kind``; the last row's time is ``duration_s`` (the loop period)."""
    if duration_s < 1:
        raise ValueError(f"duration_s={duration_s!r}: must be >= 1")
    if kind == "4g":
        return _steady(_4G_RATE, _4G_DELAY, duration_s)
    if kind == "5g":
        return _steady(_5G_RATE, _5G_DELAY, duration_s)
    if kind == "fluctuating":
        return _fluctuating(random.Random(seed), duration_s)
    if kind == "outages":
        if duration_s <= 42:
            raise ValueError("the outages trace needs duration_s > 42")
        return _outages(duration_s)
    raise ValueError(f"unknown trace kind {kind!r} (known: {', '.join(KINDS)})")


def _comment(kind: str, seed: int, duration_s: float) -> str:
    return (
        f"netshape trace '{kind}', made by: python -m tools.netshape.gentrace {kind} "
        f"--seed {seed} --duration {duration_s:g}\n"
        "columns: time [s], up_rate/down_rate [bit/s], delay [s, one-way, each direction], "
        "loss [per segment], outage"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Write one trace to --out (or stdout), or all shipped traces into --all DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.netshape.gentrace", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("kind", nargs="?", choices=KINDS, help="which trace to make")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random walk (0)")
    parser.add_argument("--duration", type=float, default=None, help="length in seconds")
    parser.add_argument("--out", type=Path, help="file to write (default stdout)")
    parser.add_argument("--all", type=Path, metavar="DIR", help="write every kind into DIR")
    args = parser.parse_args(argv)
    if args.all is None and args.kind is None:
        parser.error("give a trace kind or --all DIR")
    kinds = KINDS if args.all is not None else (args.kind,)
    for kind in kinds:
        duration = args.duration
        if duration is None:
            duration = 120.0 if kind == "fluctuating" else 60.0
        try:
            text = format_trace(
                generate(kind, seed=args.seed, duration_s=duration),
                comment=_comment(kind, args.seed, duration),
            )
        except ValueError as exc:
            parser.error(str(exc))
        if args.all is not None:
            args.all.mkdir(parents=True, exist_ok=True)
            (args.all / f"{kind}.csv").write_text(text, encoding="utf-8")
        elif args.out is not None:
            args.out.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
