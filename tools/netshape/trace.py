"""Network traces: CSV rows ``time,up_rate,down_rate,delay,loss,outage`` replayed in time.

Format (docs/NETSHAPE.md, "Trace format"): a header line naming the six columns, then one row
per change point. ``time`` is seconds since the start of the replay (strictly increasing,
first row >= 0); ``up_rate``/``down_rate`` are rates as :func:`parse_rate` reads them (a bare
number is bit/s, empty or ``unlimited`` means no limit); ``delay`` is the one-way delay added
in *each* direction (bare number = seconds); ``loss`` is the per-segment loss probability in
each direction; ``outage`` is empty/``none`` or one of ``blackhole``, ``reset``, ``refuse``,
or the numeric flag measured traces carry: ``0`` = no outage, ``1`` = ``blackhole`` (a link
that is down drops what is sent, the commonest measured outage). Lines starting with ``#`` are
comments.

Replay is a pure function of elapsed time: ``step`` holds each row until the next one,
``linear`` interpolates rates, delay and loss between rows (outages are always steps). When
looping, the last row's time is the period and the last row only serves as the end point of
the interpolation; without looping, the last row holds forever.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tools.netshape.config import OUTAGE_MODES
from tools.netshape.units import (
    parse_duration,
    parse_probability,
    parse_rate,
)

__all__ = ["TRACE_COLUMNS", "Trace", "TracePoint", "TraceState", "format_trace", "load_trace"]

TRACE_COLUMNS: tuple[str, ...] = ("time", "up_rate", "down_rate", "delay", "loss", "outage")


@dataclass(frozen=True, slots=True)
class TracePoint:
    """One row of a trace."""

    time_s: float
    """Seconds since the start of the replay."""
    up_rate_bps: float | None
    """Upload rate in bit/s; None = unlimited."""
    down_rate_bps: float | None
    """Download rate in bit/s; None = unlimited."""
    delay_s: float
    """One-way delay added in each direction."""
    loss: float
    """Per-segment loss probability in each direction."""
    outage: str | None
    """Outage mode in force from this row on, or None."""


@dataclass(frozen=True, slots=True)
class TraceState:
    """The link conditions a trace prescribes at one moment."""

    up_rate_bps: float | None
    """Upload rate in bit/s; None = unlimited."""
    down_rate_bps: float | None
    """Download rate in bit/s; None = unlimited."""
    delay_s: float
    """One-way delay added in each direction."""
    loss: float
    """Per-segment loss probability in each direction."""
    outage: tuple[tuple[object, ...], str] | None
    """``(key, mode)`` of the outage in force (key names the row and loop), or None."""


def _lerp_rate(a: float | None, b: float | None, frac: float) -> float | None:
    # An unlimited end point has no meaningful midpoint: hold the earlier value.
    if a is None or b is None:
        return a
    return a + (b - a) * frac


@dataclass(frozen=True, slots=True)
class Trace:
    """A validated trace and how to replay it."""

    points: tuple[TracePoint, ...]
    """Rows in time order."""
    interpolation: Literal["step", "linear"] = "step"
    """"step" holds each row; "linear" interpolates rates, delay and loss."""
    loop: bool = False
    """Replay again from the start once the last row's time is reached."""

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("trace has no rows")
        if self.interpolation not in ("step", "linear"):
            raise ValueError(f"interpolation={self.interpolation!r}: must be 'step' or 'linear'")
        if self.points[0].time_s < 0:
            raise ValueError("trace: the first row's time must be >= 0")
        for before, after in zip(self.points, self.points[1:], strict=False):
            if after.time_s <= before.time_s:
                raise ValueError(
                    f"trace: times must increase strictly ({before.time_s} then {after.time_s})"
                )
        if self.loop and self.points[-1].time_s <= 0:
            raise ValueError("trace: a looping trace needs a last row with time > 0 (its period)")

    @property
    def duration_s(self) -> float:
        """Time of the last row (the period when looping)."""
        return self.points[-1].time_s

    def at(self, elapsed: float) -> TraceState:
        """The conditions at ``elapsed`` seconds since the replay started."""
        points = self.points
        iteration = 0
        t = elapsed
        if self.loop:
            iteration = int(elapsed // self.duration_s)
            t = elapsed - iteration * self.duration_s
        if t < points[0].time_s:
            # Before the first row nothing is shaped by the trace yet: use the first row.
            index = 0
        else:
            index = 0
            lo, hi = 0, len(points) - 1
            while lo <= hi:  # last row with time <= t
                mid = (lo + hi) // 2
                if points[mid].time_s <= t:
                    index = mid
                    lo = mid + 1
                else:
                    hi = mid - 1
        row = points[index]
        outage = None if row.outage is None else (("trace", index, iteration), row.outage)
        if self.interpolation == "linear" and index + 1 < len(points) and t >= row.time_s:
            nxt = points[index + 1]
            frac = (t - row.time_s) / (nxt.time_s - row.time_s)
            return TraceState(
                up_rate_bps=_lerp_rate(row.up_rate_bps, nxt.up_rate_bps, frac),
                down_rate_bps=_lerp_rate(row.down_rate_bps, nxt.down_rate_bps, frac),
                delay_s=row.delay_s + (nxt.delay_s - row.delay_s) * frac,
                loss=row.loss + (nxt.loss - row.loss) * frac,
                outage=outage,
            )
        return TraceState(
            up_rate_bps=row.up_rate_bps,
            down_rate_bps=row.down_rate_bps,
            delay_s=row.delay_s,
            loss=row.loss,
            outage=outage,
        )


def _parse_row(row: dict[str, str], where: str) -> TracePoint:
    def cell(name: str) -> str:
        value = row.get(name)
        return "" if value is None else value.strip()

    try:
        time_s = parse_duration(cell("time"))
    except ValueError as exc:
        raise ValueError(f"{where}, column time: {exc}") from None
    rates: list[float | None] = []
    for name in ("up_rate", "down_rate"):
        text = cell(name)
        try:
            rates.append(None if text == "" else parse_rate(text))
        except ValueError as exc:
            raise ValueError(f"{where}, column {name}: {exc}") from None
    try:
        delay = parse_duration(cell("delay") or "0")
    except ValueError as exc:
        raise ValueError(f"{where}, column delay: {exc}") from None
    try:
        loss = parse_probability(cell("loss") or "0")
    except ValueError as exc:
        raise ValueError(f"{where}, column loss: {exc}") from None
    try:
        outage = _parse_outage(cell("outage"))
    except ValueError as exc:
        raise ValueError(f"{where}, column outage: {exc}") from None
    return TracePoint(time_s, rates[0], rates[1], delay, loss, outage)


def _parse_outage(text: str) -> str | None:
    """An outage cell: a mode name, empty/``none``, or the 0/1 flag of measured traces.

    ``1`` means ``blackhole``: a measured trace records only that the link was down, and a
    link that is down drops what is sent without a reset (docs/NETSHAPE.md, "Trace format").
    """
    word = text.lower()
    if word in ("", "none", "no"):
        return None
    if word in OUTAGE_MODES:
        return word
    try:
        flag = float(word)
    except ValueError:
        flag = math.nan
    if flag == 0.0:
        return None
    if flag == 1.0:
        return "blackhole"
    raise ValueError(f"{text!r} is not one of none, {', '.join(OUTAGE_MODES)}, 0, 1")


def load_trace(
    source: str | Path | Iterable[str],
    *,
    interpolation: Literal["step", "linear"] = "step",
    loop: bool = False,
) -> Trace:
    """Read a trace CSV from a path or from lines of text; errors name the line and column."""
    name = "<trace>"
    if isinstance(source, str | Path):
        name = str(source)
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    else:
        lines = list(source)
    numbered = [
        (number, line)
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not numbered:
        raise ValueError(f"{name}: empty trace")
    header_number, header_line = numbered[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{name}, line {header_number}: header lacks column(s) {', '.join(missing)} "
            f"(expected {','.join(TRACE_COLUMNS)})"
        )
    points = []
    for number, line in numbered[1:]:
        cells = next(csv.reader([line]))
        if len(cells) != len(header):
            raise ValueError(
                f"{name}, line {number}: {len(cells)} cells, the header has {len(header)}"
            )
        points.append(_parse_row(dict(zip(header, cells, strict=True)), f"{name}, line {number}"))
    try:
        return Trace(tuple(points), interpolation=interpolation, loop=loop)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _rate_cell(bps: float | None) -> str:
    if bps is None:
        return "unlimited"
    return str(int(bps)) if bps == int(bps) else repr(bps)


def format_trace(points: Iterable[TracePoint], comment: str = "") -> str:
    """Write trace rows as CSV text (bare SI numbers) that :func:`load_trace` reads back exactly."""
    out = io.StringIO()
    for line in comment.splitlines():
        out.write(f"# {line}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TRACE_COLUMNS)
    for p in points:
        writer.writerow(
            [
                repr(p.time_s),
                _rate_cell(p.up_rate_bps),
                _rate_cell(p.down_rate_bps),
                repr(p.delay_s),
                repr(p.loss),
                p.outage or "",
            ]
        )
    return out.getvalue()
