"""Live status and end-of-run summary of a device, and the server's stats line.

Pure: answers and events come in with ``now``; strings and dicts come out.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from spinn.model.exits import ExitRule
from spinn.runtime.tracker import Answer, Where

__all__ = ["COMPUTE_WINDOW", "DeviceStats", "ServerStats", "median_or_none", "percentile"]

COMPUTE_WINDOW = 4096
"""Compute times kept by ``ServerStats`` for its median: the most recent requests only, so
a long-running server's memory stays bounded while the median tracks current load."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values``; nan if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_or_none(values: Sequence[float]) -> float | None:
    """The median of ``values`` to 4 decimals for a stats record; None if empty."""
    return round(percentile(values, 50), 4) if values else None


def _request_window() -> collections.deque[float]:
    """A window of the last ``COMPUTE_WINDOW`` per-request times."""
    return collections.deque(maxlen=COMPUTE_WINDOW)


def _fmt_rate(bps: float) -> str:
    if not math.isfinite(bps):
        return "?"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def _fmt_ms(ms: float) -> str:
    # No answer in the window: a dash, not "nan".
    return f"{ms:6.1f}" if math.isfinite(ms) else f"{'-':>6}"


_SERVER_STATE = {True: "server up", False: "server DOWN", None: "no server"}


@dataclass(slots=True)
class DeviceStats:
    """Counts and latencies of a device run; feeds the status line and the summary."""

    window_s: float = 5.0
    """Span of the sliding window behind the live fps and latency percentiles."""
    started_at: float | None = None
    """Time of the first recorded answer's frame start (set by the first answer)."""
    frames: int = 0
    by_where: dict[str, int] = field(default_factory=lambda: {w.value: 0 for w in Where})
    by_exit: dict[int, int] = field(default_factory=dict)
    offloaded: int = 0
    cancels: int = 0
    bytes_sent: int = 0
    labelled: int = 0
    correct: int = 0
    last_answer_at: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    _recent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    def record(self, answer: Answer, now: float, label: int | None) -> None:
        """One frame was answered at ``now``; ``label`` is its ground truth if known."""
        if self.started_at is None:
            self.started_at = now - answer.latency_s
        self.frames += 1
        self.by_where[answer.where.value] += 1
        self.by_exit[answer.exit_index] = self.by_exit.get(answer.exit_index, 0) + 1
        self.bytes_sent += answer.bytes_sent
        if answer.request_id is not None:
            self.offloaded += 1
        if label is not None:
            self.labelled += 1
            self.correct += int(bool(answer.classes) and answer.classes[0] == label)
        latency_ms = answer.latency_s * 1e3
        self.latencies_ms.append(latency_ms)
        self._recent.append((now, latency_ms))
        self.last_answer_at = now
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def live_fps(self, now: float) -> float:
        """Answers per second over the sliding window."""
        self._trim(now)
        if self.started_at is None:
            return 0.0
        span = min(self.window_s, max(now - self.started_at, 1e-9))
        return len(self._recent) / span

    def status_line(
        self,
        now: float,
        *,
        split: int,
        thr_conf: float | None,
        bandwidth_bps: float,
        latency_s: float,
        server_up: bool | None,
    ) -> str:
        """One line for stderr: fps, p50/p95, split, thr, B, L, offload and cancel rates;
        ``server_up`` None: no server configured (a device-only run)."""
        self._trim(now)
        recent = [lat for _, lat in self._recent]
        n = max(self.frames, 1)
        return (
            f"frames {self.frames:6d} | {self.live_fps(now):6.1f} fps"
            f" | p50 {_fmt_ms(percentile(recent, 50))} ms p95 {_fmt_ms(percentile(recent, 95))} ms"
            f" | split {split} {ExitRule(thr_conf).describe()}"
            f" | B {_fmt_rate(bandwidth_bps)} L {latency_s * 1e3:.1f} ms"
            f" | {_SERVER_STATE[server_up]}"
            f" | offload {100.0 * self.offloaded / n:5.1f}%"
            f" cancel {100.0 * self.cancels / max(self.offloaded, 1):5.1f}%"
            f" fallback {self.by_where[Where.FALLBACK.value]}"
        )

    def summary(self, now: float) -> dict[str, object]:
        """End-of-run figures as a JSON-ready dict."""
        elapsed = (
            (self.last_answer_at or now) - self.started_at if self.started_at is not None else 0.0
        )
        out: dict[str, object] = {
            "frames": self.frames,
            "elapsed_s": round(elapsed, 3),
            "fps": round(self.frames / elapsed, 2) if elapsed > 0 else 0.0,
            # null without answers: NaN is not JSON, and the summary is read as JSON.
            "latency_ms": {
                "p50": round(percentile(self.latencies_ms, 50), 3),
                "p95": round(percentile(self.latencies_ms, 95), 3),
                "mean": round(sum(self.latencies_ms) / len(self.latencies_ms), 3),
            }
            if self.latencies_ms
            else {"p50": None, "p95": None, "mean": None},
            "answered_by": dict(self.by_where),
            "exits": {str(k): v for k, v in sorted(self.by_exit.items())},
            "offloaded": self.offloaded,
            "offload_rate": round(self.offloaded / self.frames, 4) if self.frames else 0.0,
            "cancels": self.cancels,
            "bytes_sent": self.bytes_sent,
        }
        if self.labelled:
            out["labelled"] = self.labelled
            out["accuracy"] = round(self.correct / self.labelled, 4)
        return out


@dataclass(slots=True)
class ServerStats:
    """Server counters behind the periodic stats line and the final stats record."""

    connections: int = 0
    """Connections open now."""
    connections_total: int = 0
    requests: int = 0
    """INFER messages accepted."""
    computed: int = 0
    """Requests whose compute ran to a RESULT."""
    stages_run: int = 0
    """Stages executed over all requests (the server's work)."""
    cancelled_queued: int = 0
    """Requests cancelled before their compute started (never ran)."""
    cancelled_running: int = 0
    """Requests stopped at a stage boundary."""
    expired_unrun: int = 0
    """Requests dropped unrun because their deadline_ms had passed."""
    cancels_received: int = 0
    """CANCELs of a request the server held (queued or running)."""
    errors_sent: int = 0
    busy_sent: int = 0
    """Requests refused with ERROR(BUSY): the server was overloaded."""
    connections_refused: int = 0
    """Connections closed by a limit: too many, unauthenticated, handshake or idle timeout."""
    handshakes: int = 0
    """Connections in the handshake now (their own pool, ``LimitsConfig.max_handshakes``)."""
    handshakes_shed: int = 0
    """Connections refused at once because the handshake pool (or an address's share of
    it) was full."""
    handshakes_timed_out: int = 0
    """Connections closed for not finishing the handshake within its timeout."""
    handshakes_evicted: int = 0
    """Connections closed before their timeout, to make room in a full handshake pool."""
    cancels_unknown: int = 0
    """CANCELs for request ids the connection does not hold (answered already, or never
    sent): counted apart from ``cancels_received``, which stopped a request."""
    rate_limited: int = 0
    """Connections closed for sending PINGs or unknown-id CANCELs above their rate."""
    compute_ms_total: float = 0.0
    compute_ms: collections.deque[float] = field(default_factory=_request_window)
    """Compute times of the last ``COMPUTE_WINDOW`` requests (the median in the final stats);
    bounded, unlike the totals, so memory does not grow with the server's uptime."""
    held_ms: collections.deque[float] = field(default_factory=_request_window)
    """Time from decoding each INFER to sending its RESULT, of the last ``COMPUTE_WINDOW``
    answered requests: the server time a device infers when compute is not reported."""
    overhead_ms_total: float = 0.0
    """Framing + unpack + dispatch time on the event loop, over all requests."""
    _last_requests: int = 0
    _last_at: float | None = None

    def line(self, now: float, queue_depth: int) -> str:
        """Periodic stats line: connections, requests/s, queue depth, mean compute, cancels."""
        rate = 0.0
        if self._last_at is not None and now > self._last_at:
            rate = (self.requests - self._last_requests) / (now - self._last_at)
        self._last_at = now
        self._last_requests = self.requests
        mean = self.compute_ms_total / self.computed if self.computed else 0.0
        return (
            f"stats connections={self.connections} requests={self.requests}"
            f" req/s={rate:.1f} queue={queue_depth} computed={self.computed}"
            f" mean_compute_ms={mean:.2f} cancels={self.cancels_received}"
            f" (queued {self.cancelled_queued}, running {self.cancelled_running})"
            f" expired={self.expired_unrun}"
            f" handshakes={self.handshakes} shed={self.handshakes_shed}"
            f" evicted={self.handshakes_evicted}"
        )

    def as_dict(self) -> dict[str, object]:
        """All counters, JSON-ready."""
        return {
            "connections_total": self.connections_total,
            "requests": self.requests,
            "computed": self.computed,
            "stages_run": self.stages_run,
            "cancels_received": self.cancels_received,
            "cancelled_queued": self.cancelled_queued,
            "cancelled_running": self.cancelled_running,
            "expired_unrun": self.expired_unrun,
            "errors_sent": self.errors_sent,
            "busy_sent": self.busy_sent,
            "connections_refused": self.connections_refused,
            "handshakes_shed": self.handshakes_shed,
            "handshakes_timed_out": self.handshakes_timed_out,
            "handshakes_evicted": self.handshakes_evicted,
            "cancels_unknown": self.cancels_unknown,
            "rate_limited": self.rate_limited,
            "compute_ms_total": round(self.compute_ms_total, 3),
            "compute_ms_median": median_or_none(self.compute_ms),
            "held_ms_median": median_or_none(self.held_ms),
            "overhead_ms_total": round(self.overhead_ms_total, 3),
        }
