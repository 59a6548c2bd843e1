"""The online profiler: live estimates of the network, the device and the server.

DESIGN.md part 4.  Every class here is pure: a measurement comes in with the time it was
taken (``now``, seconds on any monotonic clock) and nothing reads a clock, sleeps or does
I/O, so the runtime feeds real measurements and the tests feed synthetic ones.

Conventions, used the same way by the scheduler (docs/SCHEDULER.md):

* Bandwidth ``B`` is in **bits** per second (``bandwidth_bps``).
* Latency ``L`` is the **round-trip** propagation latency (``latency_s``): the RTT of a
  bare PING (the lower quartile of the last five, ``LatencyEstimator``).  A remote inference therefore costs ``upload + L + server + download`` with
  ``L`` counted once, and the server time inferred from a response (DESIGN.md part 4,
  ``T_server = T_response − (L + D_response/B)``) reads ``T_response`` as the time from the
  end of the upload to the arrival of the RESULT; since the device times from the start
  of the upload it subtracts the upload time ``8·D_request/B`` as well.
* Scale factors are ratios real / offline: ``device_scale`` is DESIGN.md's ``SF``
  (``T_real⟨s⟩ / T_offline⟨s⟩``, applied to every split), ``server_scale`` the same for the
  server part (so it absorbs server load when the server does not report compute time).

Robustness: the scale and overhead estimators pass their raw samples through a median-of-3
pre-filter before the EWMA.  One outlier is never the median of three samples, so a single spike (a GC
pause, a retransmission) never reaches the EWMA (it sees a normal neighbour instead),
while a real step change
shows through after two samples and the EWMA then converges geometrically
(error × (1 − alpha) per sample).  The window starts filled with the first sample, so
the first sample is taken as is and the second cannot be an outlier on its own either.
Bandwidth is the median of the last five probe trains (``BandwidthEstimator``,
``train_dispersion``), or without trains a windowed maximum of upload samples, which err
in one direction only; latency a low quantile of round trips, which err upwards.  The
device's
busy time (``DeviceBusyEstimator``) is a plain windowed mean instead: it feeds the
throughput, which follows the mean, slow calls included (docs/SCHEDULER.md).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spinn.decisions.offline_profile import Profile

__all__ = [
    "EWMA",
    "BandwidthEstimator",
    "DeviceBusyEstimator",
    "DeviceScaleEstimator",
    "Estimates",
    "LatencyEstimator",
    "MedianOf3",
    "OnlineEstimates",
    "OnlineEstimatesConfig",
    "OverheadEstimator",
    "ServerTimeEstimator",
    "SILENCE_MIN_S",
    "SILENCE_RTT_FACTOR",
    "TRAIN_CONFIRM_REL",
    "train_dispersion",
]


_MIN_SCALE = 1e-3


def _check_sample(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _median(values: Sequence[float] | deque[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class EWMA:
    """Exponentially weighted moving average: ``v ← v + alpha·(x − v)``; the first sample
    initialises it (unless ``initial`` is given)."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float, initial: float | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EWMA alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.value: float | None = initial

    def update(self, sample: float) -> float:
        if self.value is None:
            self.value = sample
        else:
            self.value += self.alpha * (sample - self.value)
        return self.value


class MedianOf3:
    """Running median of the last three samples (window primed with the first sample)."""

    __slots__ = ("_window",)

    def __init__(self) -> None:
        self._window: list[float] = []

    def update(self, sample: float) -> float:
        if not self._window:
            self._window = [sample, sample, sample]
        else:
            self._window = [self._window[1], self._window[2], sample]
        return sorted(self._window)[1]


class _Filtered:
    """Median-of-3 then EWMA, with the time of the last sample."""

    __slots__ = ("_ewma", "_median", "samples", "updated_at")

    def __init__(self, alpha: float) -> None:
        self._median = MedianOf3()
        self._ewma = EWMA(alpha)
        self.samples = 0
        self.updated_at: float | None = None

    def update(self, now: float, sample: float) -> float:
        self.samples += 1
        self.updated_at = now
        return self._ewma.update(self._median.update(sample))

    @property
    def value(self) -> float | None:
        return self._ewma.value

    def update_ratio(
        self, now: float, owner: str, kind: str, measured_ms: float, offline_ms: float
    ) -> float | None:
        """Feed ``measured / offline`` as a scale factor; None (nothing fed) when the
        offline time is 0. A zero time would make every prediction free, so the factor
        is kept strictly positive."""
        measured = _check_sample(f"{owner} {kind} ms", measured_ms)
        offline = _check_sample(f"{owner} offline ms", offline_ms)
        if offline <= 0.0:
            return None
        ratio = max(measured / offline, _MIN_SCALE)
        self.update(now, ratio)
        return ratio


# A probe's padding must add at least this to the round trip to be timed.
_PROBE_RESOLUTION_S = 0.002
# A probe train's second half must spread over at least this at the server to be timed:
# its arrival times carry the server's read and event-loop jitter (about 1 ms on a loaded
# two-core host, docs/SCHEDULER.md "Bandwidth from probe trains").
_TRAIN_RESOLUTION_S = 0.002
# A timed train this many times slower than B replaces the estimate at once (a server
# that read a train late made a 100 Mbit/s link read 24 on the loaded two-core host).
_TRAIN_DROP_RATIO = 8.0
# Uploads this long each are neither a per-request cost (about 0.5 ms) nor, mostly, an
# answer the loaded device read late: their rate is the link's, or less (docs/SCHEDULER.md,
# "Bandwidth from probe trains"). Counted per upload: a sample of eight small uploads held
# eight answers' delays, and 20 ms in all read 24 Mbit/s as 0.4.
_UPLOAD_COLLAPSE_S = 0.05
# Uploads this many times faster than B, three in a row, suspect a rise to the slowest of
# them (a train then looks): an upload errs slow (its time holds a per-request cost).
_UPLOAD_RISE_RATIO = 4.0
# A PING that has waited this long unanswered behind bytes on the link (and four times the
# slowest recent bare round trip) says how slow the link is at most (``observe_silence``).
# Long against an event-loop stall of the server (tens of ms on the loaded two-core host),
# short against the 1.5 s after which the device gives up on a silent link.
SILENCE_MIN_S = 0.5
SILENCE_RTT_FACTOR = 4.0
TRAIN_CONFIRM_REL = 0.3
"""A train sample further than this (relative) from the estimate asks for a confirming
train soon; two that agree within it, on the same side of all older ones, are a step."""


def train_dispersion(
    arrivals: Sequence[tuple[int, float]], train_bytes: int
) -> tuple[int, float] | None:
    """The timed part of a probe train: ``(bytes, seconds)``, the bytes that arrived after
    its first third and the time they took at the rate fitted to their arrivals.

    ``arrivals`` holds, for each frame of a train of ``train_bytes`` sent back to back and
    in the order sent, a stream offset and the time the bytes up to it had reached the
    server: the server's count of bytes read when the frame was complete (PONG
    ``received_bytes``: the end of the read that completed it), or, from a server that
    does not report it, the running total of the frames' sizes.  Any origin and any clock
    will do, as long as they are the same for the whole train.

    Packet-train dispersion (Dovrolis, Ramanathan and Moore, INFOCOM 2001): once the
    bottleneck is busy, bytes leave it at its rate.  The first third is left out: a
    shaper lets its burst through at once (netshape: 5 ms of the rate on an idle link,
    docs/NETSHAPE.md, a sixth of a train sized for 30 ms).  The rate is the least-squares
    slope of offset over time from the cut to the last arrival, so that one read the
    server took late (it reads the train fast before it and slow after) moves it less
    than it moves the two end points.  Offsets at the reads' ends make the cut exact: a
    frame's end falls anywhere inside the shaper's chunk (1500 B at 1 Mbit/s), and timing
    from it counted up to a chunk too many bytes (1 Mbit/s read as 1.9).

    ``None`` for an empty train; ``(bytes, 0.0)`` when the timed part arrived at once
    (in the read of the cut, or faster than the clocks can tell)."""
    if train_bytes <= 1 or not arrivals:
        return None
    prev = -math.inf
    for off, t in arrivals:
        _check_sample("train arrival time", t)
        if _check_sample("train offset", off) < prev:
            raise ValueError(f"train offsets must not decrease, got {off} after {prev}")
        prev = off
    last_off = arrivals[-1][0]
    cut = next(i for i, (off, _) in enumerate(arrivals) if 3 * (last_off - off) <= 2 * train_bytes)
    timed = arrivals[cut:]
    nbytes = int(last_off - timed[0][0])
    if nbytes <= 0:
        return train_bytes * 2 // 3, 0.0
    mean_t = statistics.fmean(t for _, t in timed)
    mean_o = statistics.fmean(o for o, _ in timed)
    var = sum((t - mean_t) ** 2 for _, t in timed)
    cov = sum((t - mean_t) * (o - mean_o) for o, t in timed)
    if var <= 0.0 or cov <= 0.0:
        return nbytes, 0.0  # a clock stepped backwards mid-train, or all at once
    return nbytes, nbytes * var / cov


def _stepped(samples: deque[float]) -> bool:
    """Whether the last two samples lie within ``TRAIN_CONFIRM_REL`` of each other and
    both further than that from every older one, on the same side: the rate stepped."""
    if len(samples) < 3:
        return False
    a, b = samples[-1], samples[-2]
    if abs(a - b) > TRAIN_CONFIRM_REL * min(a, b):
        return False
    older = list(samples)[:-2]
    lo, hi = min(a, b), max(a, b)
    return all(hi < o / (1 + TRAIN_CONFIRM_REL) for o in older) or all(
        lo > o * (1 + TRAIN_CONFIRM_REL) for o in older
    )


class BandwidthEstimator:
    """Uplink bandwidth ``B`` in bit/s from probe trains (``observe_train``), or, until one
    is timed, from upload transfers and single padded PINGs.

    Without trains: a measured transfer time is the wire time *plus* whatever queueing and scheduling
    delay the measurement could not subtract, never less, so a single sample
    underestimates B, badly so for small payloads on a busy host.  As in BBR's
    bottleneck-bandwidth filter (Cardwell et al., ACM Queue 2016), the estimate is the
    **maximum** over a window of recent samples (no EWMA: the window already smooths);
    the median-of-3 in front keeps one spurious high sample out.  A rise of B shows after
    two samples, a drop once the faster samples have left the window (``window + 1``).
    """

    def __init__(
        self, min_transfer_bytes: int = 4096, window: int = 8, train_window: int = 5
    ) -> None:
        if window < 1:
            raise ValueError(f"bandwidth window must be >= 1 sample, got {window}")
        if train_window < 1:
            raise ValueError(f"bandwidth train window must be >= 1 train, got {train_window}")
        self._median = MedianOf3()
        self._recent: list[float] = []
        self._trains: deque[float] = deque(maxlen=train_window)
        self._long_uploads: deque[float] = deque(maxlen=3)
        """Uploads that took ``_UPLOAD_COLLAPSE_S`` or more: they can tell a collapse."""
        self._fast_uploads: deque[float] = deque(maxlen=3)
        """Upload samples in a row that read ``_UPLOAD_RISE_RATIO`` × B or more."""
        self.train_samples = 0
        """Probe trains observed (``observe_train``), bounds included."""
        self._bounds: deque[bool] = deque(maxlen=train_window)
        """Per train sample: whether it is only a lower bound (the train was untimed)."""
        self._train_estimate: float | None = None
        self.needs_confirmation = False
        """The latest train sample lay more than 30% from the estimate before it: a step
        change, or an outlier; the next train should come soon to tell which."""
        self.suspected_bps: float | None = None
        """A rate that upload samples suspect the link moved to, far from B (a collapse or
        a rise): not B, but a reason for a train now (``take_suspicion``)."""
        self._samples = 0
        self._silenced = False
        """B is a silence's bound (``observe_silence``) that no train has confirmed yet: a
        longer silence says nothing more until one has (each further bound would feed
        on the last, and the dead-link allowance grows as B falls)."""
        self.updated_at: float | None = None
        self.floor_bps: float | None = None
        """The largest rate a probe too fast to time implied (``observe_probe``): the
        estimate until a transfer or a probe is timed, in place of the prior."""
        self.window = window
        self.min_transfer_bytes = min_transfer_bytes
        """Smaller uploads are ignored: their time is dominated by latency and socket
        buffering, not by the link rate."""

    def _update(self, now: float, sample: float) -> None:
        self._samples += 1
        self.updated_at = now
        self._recent.append(self._median.update(sample))
        del self._recent[: -self.window]

    def observe_transfer(
        self, now: float, nbytes: int, seconds: float, uploads: int = 1, *, idle: bool = True
    ) -> float | None:
        """``uploads`` uploads of ``nbytes`` in all that took ``seconds`` on the wire
        (latency excluded); ``idle``: each found the link idle (timed from when it was sent,
        not from the previous upload's end, which late-read answers bunch together: such a
        sample reads fast and cannot show a rise). Returns the sample used, or ``None`` when
        the transfer was too small to measure."""
        n = _check_sample("transfer bytes", nbytes)
        t = _check_sample("transfer seconds", seconds)
        if n < self.min_transfer_bytes or t <= 0.0:
            return None
        sample = 8.0 * n / t
        self._update(now, sample)
        if self._train_estimate is not None and idle:
            self._rise(sample)
        if self._train_estimate is not None and t >= _UPLOAD_COLLAPSE_S * max(uploads, 1):
            # Uploads that took long and read an eighth of B or less (the last three such)
            # suspect a collapse. The fastest of the three is the suspicion: an upload errs
            # slow (a cancelled one's time is a bound, a late-read answer holds the device's
            # delay). Where the link is jammed the PINGs' silence moves B
            # (``observe_silence``); elsewhere a train, sent at once, tells.
            self._long_uploads.append(sample)
            slow = max(self._long_uploads)
            full = len(self._long_uploads) == self._long_uploads.maxlen
            if full and slow * _TRAIN_DROP_RATIO < self._train_estimate:
                self._long_uploads.clear()
                self.suspected_bps = slow
        return sample

    def take_suspicion(self) -> float | None:
        """The rate uploads suspect the link moved to (``suspected_bps``), once: a probe
        train should look now (``spinn.runtime.uplink.ProbeTrains.look_now``)."""
        rate, self.suspected_bps = self.suspected_bps, None
        return rate

    def observe_silence(self, now: float, nbytes: int, seconds: float) -> float | None:
        """A PING that had ``nbytes`` ahead of it on the link (its own padding included:
        uploads and probes not answered when it was written) is still unanswered
        ``seconds`` after it was written, round trip excluded: the link delivered fewer than
        ``nbytes`` in that time, so it is slower than ``8 * nbytes / seconds``. Returns
        that bound when it replaced B, ``None`` otherwise.

        The bound replaces B only when it lies ``_TRAIN_DROP_RATIO`` times or more below
        it, as a timed train does: a link taken for far faster than it is fills with
        uploads and probes sized for the old rate, whose answers, and so every other
        sample, wait behind them (loopback cut to 200 kbit/s at 30 uploads of 4 KB a
        second: a 32 KiB scout and the uploads held every answer back for 1.5 s, and the
        device gave the link up as dead with B still at 3 Gbit/s). Trains confirm it. The
        caller only asks after ``SILENCE_MIN_S``: a server stalled that long reads as a slow
        link, at the cost of a confirming round."""
        n = _check_sample("silence bytes", nbytes)
        t = _check_sample("silence seconds", seconds)
        before = self.bandwidth_bps
        if n < self.min_transfer_bytes or t <= 0.0 or before is None or self._silenced:
            return None
        bound = 8.0 * n / t
        if bound * _TRAIN_DROP_RATIO >= before:
            return None
        self._replace_trains(bound)
        self._silenced = True
        self._samples += 1
        self.updated_at = now
        return bound

    def _replace_trains(self, rate_bps: float) -> None:
        """A silence bounded the link (``observe_silence``): ``rate_bps`` is B until the
        trains, asked to confirm, say otherwise."""
        self._trains.clear()
        self._bounds.clear()
        self._trains.append(rate_bps)
        self._bounds.append(False)
        self._train_estimate = rate_bps
        self.needs_confirmation = True

    def _rise(self, sample: float) -> None:
        """Uploads that read far above the trains' B, three in a row, suspect a rise: the
        slowest of them is the suspicion (``take_suspicion``), and a train, sent at once,
        tells. After a drop to a low rate the trains are small and rare (their budget is a
        share of the link at B: at 0.2 Mbit/s one 6 KiB train every 8 s), and the step
        trace's rise from 0.2 to 50 Mbit/s went unseen for the 12 s the run had left; the
        uploads that keep going out show it within a second. They do not move B
        themselves: uploads smaller than a shaper's burst (netshape lets 5 ms of the rate,
        at least 1500 B, through at once) cross a 0.2 Mbit/s link that idled at once, and
        five of 1 kB read 1.85 Mbit/s, three samples in a row."""
        assert self._train_estimate is not None
        if sample < _UPLOAD_RISE_RATIO * self._train_estimate:
            self._fast_uploads.clear()
            return
        self._fast_uploads.append(sample)
        if len(self._fast_uploads) < (self._fast_uploads.maxlen or 0):
            return
        self.suspected_bps = min(self._fast_uploads)
        self._fast_uploads.clear()

    def observe_probe(
        self, now: float, probe_bytes: int, rtt_s: float, base_rtt_s: float
    ) -> float | None:
        """A padded PING: ``probe_bytes`` of padding crossed the link (count both ways if the
        PONG echoes it) in ``rtt_s``, while a bare PING takes ``base_rtt_s``.  The extra time
        is the serialisation time of the padding.  ``None`` when the difference is too
        small to resolve (the link is too fast for this probe size): below
        ``_PROBE_RESOLUTION_S`` it is the round trips' own jitter, or a shaper's burst
        let the padding through at once (24 Mbit/s with a 15 KB bucket: 16 KB of padding
        added 0.26 ms and read 500 Mbit/s).  Such a probe still says the link is at least
        ``8n / _PROBE_RESOLUTION_S`` fast, burst aside: ``floor_bps`` keeps that figure
        for as long as nothing was timed (loopback or a LAN, where no probe resolves and
        the prior's 10 Mbit/s would stand forever)."""
        n = _check_sample("probe bytes", probe_bytes)
        rtt = _check_sample("probe rtt", rtt_s)
        base = _check_sample("base rtt", base_rtt_s)
        extra = rtt - base
        if n <= 0:
            return None
        if extra < _PROBE_RESOLUTION_S:
            floor = 8.0 * n / _PROBE_RESOLUTION_S
            self.floor_bps = floor if self.floor_bps is None else max(self.floor_bps, floor)
            return None
        sample = 8.0 * n / extra
        self._update(now, sample)
        return sample

    def observe_train(
        self, now: float, arrivals: Sequence[tuple[int, float]], train_bytes: int
    ) -> float | None:
        """A probe train of ``train_bytes``: per frame, in the order sent, a stream offset
        and the server's time when the bytes up to it had arrived (``train_dispersion``).  Its second half's rate is a sample; one that
        arrived within ``_TRAIN_RESOLUTION_S`` was too small for the link and says only
        that the link is at least ``8·bytes / _TRAIN_RESOLUTION_S`` fast: that bound is
        the sample, so the next train, sized from the estimate, is larger (about 7× for a
        train of 30 ms at the estimate) until one is timed.  Returns the sample, ``None``
        for a train without a second half.

        While trains are timed they alone make the estimate, the median of the last
        ``train_window`` samples: unlike an upload's, a train's timing holds neither the
        server's time nor a per-request cost, and its frames are back to back whether the
        link is idle or busy.  It errs both ways (a server read late at the cut reads fast,
        one late at the end slow: ±30% on the loaded two-core host), so a median suits it.
        A step shows after two trains: when the last two agree with each other and lie on
        the same side of all older ones (``_stepped``), the older ones are dropped."""
        spread = train_dispersion(arrivals, train_bytes)
        if spread is None:
            return None
        self._silenced = False
        nbytes, seconds = spread
        sample = 8.0 * nbytes / max(seconds, _TRAIN_RESOLUTION_S)
        if not math.isfinite(sample):
            raise ValueError(f"train of {nbytes} bytes gives no finite rate")
        before = self._train_estimate
        bound = seconds < _TRAIN_RESOLUTION_S
        if not bound:
            # A timed train outranks the bounds: one below it said no more than it (the
            # ramp from the prior to a fast link leaves a trail of them), and one above it
            # was a train that fitted in a shaper's burst (netshape lets 5 ms of the rate
            # through at once: 300 kB at 500 Mbit/s, whose bound reads 800 Mbit/s).
            kept = [v for v, b in zip(self._trains, self._bounds, strict=True) if not b]
            self._trains = deque(kept, maxlen=self._trains.maxlen)
            self._bounds = deque((False for _ in kept), maxlen=self._bounds.maxlen)
        if not bound and before is not None and sample * _TRAIN_DROP_RATIO < before:
            # A collapse is believed at once: a link taken for eight times faster than it
            # is fills with uploads, each behind the last, and the confirming train then
            # waits behind them all (loopback to 200 kbit/s: seconds). A server stall
            # read as a slow train costs one confirming round of a low B instead.
            self._trains.clear()
            self._bounds.clear()
        self._trains.append(sample)
        self._bounds.append(bound)
        if _stepped(self._trains):
            # The last two agree with each other and not with the rest: a step.
            while len(self._trains) > 2:
                self._trains.popleft()
                self._bounds.popleft()
        self._train_estimate = _median(self._trains)
        # The first train replaced the prior, and an untimed one is only a bound: both
        # want a second train soon, as does a sample far from the estimate.
        self.needs_confirmation = (
            before is None
            or abs(sample - before) > TRAIN_CONFIRM_REL * before
            or (bound and sample > before)
        )
        self._samples += 1
        self.train_samples += 1
        self.updated_at = now
        return sample

    @staticmethod
    def train_sample(
        arrivals: Sequence[tuple[int, float]], train_bytes: int
    ) -> tuple[float, bool] | None:
        """What a train shows: ``(rate, timed)``, its timed part's rate, or with ``timed``
        False the least rate it implies (it arrived within ``_TRAIN_RESOLUTION_S``: the
        link is faster than the train can tell); ``None`` for an empty train."""
        spread = train_dispersion(arrivals, train_bytes)
        if spread is None:
            return None
        nbytes, seconds = spread
        return 8.0 * nbytes / max(seconds, _TRAIN_RESOLUTION_S), seconds >= _TRAIN_RESOLUTION_S

    @property
    def bandwidth_bps(self) -> float | None:
        """Current estimate: the median of the recent trains; without trains the upload and
        probe window's maximum, else the floor of unresolved probes, ``None`` before any."""
        if self._train_estimate is not None:
            return self._train_estimate
        return max(self._recent) if self._recent else self.floor_bps

    @property
    def samples(self) -> int:
        return self._samples


class LatencyEstimator:
    """Round-trip latency ``L`` (seconds) from bare PING round trips: the lower quartile
    of the last ``median_window`` (the second smallest of five).

    A round trip errs only upwards: an event-loop turn at either end, or bytes queued
    ahead of the PING in a buffer on the path (the device's own uploads, on a busy
    uplink).  The second smallest of five ignores up to three such delays in five, and
    one round trip that came back too fast (a clock step); it follows a drop of the path's
    delay after two PINGs and a rise after four.  (An EWMA behind a median of three, as
    for the other estimators, carried the slow first PING of a connection, 30 ms on a
    20 ms path, for seconds, and every queueing delay in part.)"""

    def __init__(self, window: int = 16, median_window: int = 5) -> None:
        if window < 1 or median_window < 1:
            raise ValueError(f"latency window must be >= 1, got {window}, {median_window}")
        self._recent: deque[float] = deque(maxlen=window)
        self._median_window = median_window
        self._samples = 0
        self.updated_at: float | None = None

    def observe_rtt(self, now: float, rtt_s: float) -> None:
        rtt = _check_sample("rtt", rtt_s)
        self._recent.append(rtt)
        self._samples += 1
        self.updated_at = now

    @property
    def propagation_s(self) -> float | None:
        """Smallest of the last ``window`` RTTs: the propagation delay alone.  A PING's RTT
        adds whatever waited in front of it (event-loop turns, queued bytes); subtracting
        that average from a response time would also subtract time the response itself did
        not wait, so the inferred server time uses this instead (docs/SCHEDULER.md)."""
        return min(self._recent) if self._recent else None

    @property
    def slowest_s(self) -> float | None:
        """Largest of the last ``window`` RTTs: how late a bare PING may come back without
        anything queued ahead of it (the server's and the device's event-loop stalls)."""
        return max(self._recent) if self._recent else None

    @property
    def latency_s(self) -> float | None:
        if not self._recent:
            return None
        last = sorted(list(self._recent)[-self._median_window :])
        return last[(len(last) - 1) // 4]

    @property
    def samples(self) -> int:
        return self._samples


class _ScaleFactor:
    """A filtered scale factor over offline timings: 1.0 (the offline figures) until
    the first measurement."""

    def __init__(self, alpha: float = 0.3) -> None:
        self._f = _Filtered(alpha)

    @property
    def scale(self) -> float:
        """Current factor, 1.0 (the offline figures) before any measurement."""
        v = self._f.value
        return 1.0 if v is None else v

    @property
    def samples(self) -> int:
        return self._f.samples


class DeviceScaleEstimator(_ScaleFactor):
    """``SF = T_real / T_offline`` of the device part; the scheduler multiplies every
    split's offline device time by it (DESIGN.md part 4)."""

    def observe(self, now: float, real_ms: float, offline_ms: float) -> float | None:
        """The device ran a range whose offline time is ``offline_ms`` in ``real_ms``."""
        return self._f.update_ratio(now, "device", "real", real_ms, offline_ms)


class ServerTimeEstimator(_ScaleFactor):
    """Server time as a scale factor over the offline server timings, plus queue depth.

    A RESULT that reports the server's compute time gives ``T_server`` directly.  One that
    does not gives it by inference (module docstring):
    ``T_server = elapsed − 8·D_request/B − L − 8·D_response/B``, clamped at 0; that figure
    includes queueing, so without reports the scale absorbs server load.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        super().__init__(alpha)
        self.queue = 0.0
        """Last queue depth the server reported (requests waiting ahead of ours)."""

    def observe_reported(self, now: float, compute_ms: float, offline_ms: float) -> float | None:
        return self._f.update_ratio(now, "server", "compute", compute_ms, offline_ms)

    @staticmethod
    def infer_compute_ms(
        elapsed_s: float,
        request_bytes: int,
        response_bytes: int,
        latency_s: float,
        bandwidth_bps: float,
    ) -> float:
        """Server time (ms) hidden in a response time: the elapsed time from the start of the
        upload to the arrival of the RESULT, less upload, round-trip latency and download."""
        elapsed = _check_sample("response elapsed s", elapsed_s)
        req = _check_sample("request bytes", request_bytes)
        resp = _check_sample("response bytes", response_bytes)
        lat = _check_sample("latency s", latency_s)
        bw = _check_sample("bandwidth bps", bandwidth_bps, positive=True)
        return max(0.0, 1000.0 * (elapsed - lat - 8.0 * (req + resp) / bw))

    def observe_inferred(
        self,
        now: float,
        elapsed_s: float,
        request_bytes: int,
        response_bytes: int,
        offline_ms: float,
        latency_s: float,
        bandwidth_bps: float,
    ) -> float | None:
        compute = self.infer_compute_ms(
            elapsed_s, request_bytes, response_bytes, latency_s, bandwidth_bps
        )
        return self.observe_reported(now, compute, offline_ms)

    def observe_queue(self, now: float, depth: float) -> None:
        self.queue = _check_sample("server queue depth", depth)


class OverheadEstimator:
    """Per-input time the stage timings do not cover (preprocessing, packing, executor
    hand-offs, bookkeeping), from inputs answered on the device: the answer's latency less
    the compute the scaled profile accounts for (``SF · T_offline``), clamped at 0."""

    def __init__(self, alpha: float = 0.3) -> None:
        self._f = _Filtered(alpha)

    def observe(self, now: float, latency_ms: float, compute_ms: float) -> float:
        lat = _check_sample("answer latency ms", latency_ms)
        compute = _check_sample("answer compute ms", compute_ms)
        sample = max(0.0, lat - compute)
        self._f.update(now, sample)
        return sample

    @property
    def overhead_ms(self) -> float:
        v = self._f.value
        return 0.0 if v is None else v

    @property
    def samples(self) -> int:
        return self._f.samples


class _WindowMean:
    """Mean and sum of the last ``window`` samples (``None`` / 0 before the first)."""

    __slots__ = ("_samples",)

    def __init__(self, window: int) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def update(self, sample: float) -> None:
        self._samples.append(sample)

    @property
    def mean(self) -> float | None:
        return sum(self._samples) / len(self._samples) if self._samples else None

    @property
    def total(self) -> float:
        return sum(self._samples)


class DeviceBusyEstimator:
    """The device's busy time per compute call under a saturating stream, for the
    throughput prediction (docs/SCHEDULER.md, "device busy time").

    Under a saturating stream the device's worker alternates compute calls and hand-off
    gaps, and its period per input is the sum of both.  Only calls that *queued* for
    their slot are sampled: the worker was handed them straight from the previous call,
    so the idle gap before each is the event loop's work between two calls (answering,
    the protocol, the next frame's set-up: CPU time under the interpreter lock), not
    idleness.  Per such call it keeps:

    * the stages' real and offline times, whose **ratio of sums** is the busy scale: the
      mean stage time under load over the offline one.  SF (``DeviceScaleEstimator``) is
      median-filtered so that one slow call does not move the latency estimate, which
      makes it the typical ratio; a pipeline's rate follows the *mean* busy time, and
      calls slowed by contention are part of it.
    * its overhead, the busy time outside the stages and packing (preprocessing, exit
      checks, bookkeeping, the hand-off gap), per kind: the **head** call of each input
      (the stages before the split) and a **step** call of the local race (one stage).

    Packing time is kept apart (only uploaded inputs pay it) from every upload.  All are
    plain means over the last ``window`` samples, for the same reason as the scale."""

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError(f"device busy window must be >= 1 call, got {window}")
        self._real = _WindowMean(window)
        self._offline = _WindowMean(window)
        self._head = _WindowMean(window)
        self._step = _WindowMean(window)
        self._upload = _WindowMean(window)

    def observe_call(
        self,
        now: float,
        *,
        head: bool,
        call_ms: float,
        stages_ms: float,
        offline_ms: float,
        pack_ms: float = 0.0,
    ) -> None:
        """A call that queued for its slot kept the device busy ``call_ms`` (its run time
        and the gap before it), of which ``stages_ms`` in stages whose offline time is
        ``offline_ms`` and ``pack_ms`` packing."""
        call = _check_sample("device call ms", call_ms)
        stages = _check_sample("device call stages ms", stages_ms)
        offline = _check_sample("device call offline ms", offline_ms)
        packing = _check_sample("device call pack ms", pack_ms)
        if offline > 0.0:
            self._real.update(stages)
            self._offline.update(offline)
        (self._head if head else self._step).update(max(0.0, call - stages - packing))

    def observe_upload_work(self, now: float, busy_ms: float) -> None:
        """One upload kept the device busy ``busy_ms``: packing and the event loop's protocol
        work for it (sending the INFER, reading its answer, a CANCEL)."""
        self._upload.update(_check_sample("upload busy ms", busy_ms))

    @property
    def scale(self) -> float | None:
        """Mean real / offline stage time of the sampled calls; ``None`` before any."""
        offline = self._offline.total
        return max(self._real.total / offline, _MIN_SCALE) if offline > 0.0 else None

    @property
    def head_overhead_ms(self) -> float | None:
        """Per head call; ``None`` before a queued head call was seen."""
        return self._head.mean

    @property
    def step_overhead_ms(self) -> float:
        """Per race step call; 0 before a queued one was seen."""
        return self._step.mean or 0.0

    @property
    def upload_busy_ms(self) -> float:
        """Per uploaded input; 0 before the first upload."""
        return self._upload.mean or 0.0


@dataclass(frozen=True, slots=True)
class Estimates:
    """A snapshot of the online estimates, the scheduler's only view of the world."""

    bandwidth_bps: float
    """Uplink bandwidth B, bit/s."""
    latency_s: float
    """Round-trip latency L, seconds (counted once per remote inference)."""
    device_scale: float = 1.0
    """SF: real / offline device time."""
    server_scale: float = 1.0
    """Real / offline server time (includes queueing when compute time is not reported)."""
    server_queue: float = 0.0
    """Requests waiting at the server ahead of a new one."""
    server_up: bool = True
    """False while the server is unreachable: only device-only decisions make sense."""
    frame_overhead_ms: float = 0.0
    """Per-input time outside the profiled stages (preprocessing, packing, dispatch)."""
    busy_scale: float | None = None
    """Mean real / offline device stage time under a saturating stream
    (``DeviceBusyEstimator``); None until measured, and the throughput prediction then
    uses ``device_scale``."""
    head_overhead_ms: float | None = None
    """Device busy time per input's head call outside the stages, hand-off gap included
    (``DeviceBusyEstimator``); None until measured under a saturating stream, and the
    throughput prediction then uses ``frame_overhead_ms``."""
    step_overhead_ms: float = 0.0
    """Device busy time per call of the local race (one stage) outside the stage."""
    upload_busy_ms: float = 0.0
    """Device busy time per upload: packing and the event loop's protocol work for it."""

    def __post_init__(self) -> None:
        for name in ("bandwidth_bps", "latency_s", "device_scale", "server_scale"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or math.isnan(v) or v < 0:
                raise ValueError(f"Estimates.{name} must be a number >= 0, got {v!r}")
        if self.device_scale == 0 or self.server_scale == 0:
            raise ValueError("Estimates scale factors must be > 0")
        for name in ("server_queue", "frame_overhead_ms", "step_overhead_ms", "upload_busy_ms"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Estimates.{name} must be a finite number >= 0, got {v!r}")
        for name in ("busy_scale", "head_overhead_ms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or not math.isfinite(v) or v < 0):
                raise ValueError(f"Estimates.{name} must be None or a number >= 0, got {v!r}")
        if self.busy_scale == 0:
            raise ValueError("Estimates.busy_scale must be > 0")


@dataclass(frozen=True, slots=True)
class OnlineEstimatesConfig:
    """Settings of the online profiler; defaults chosen for a few-per-second request rate."""

    alpha: float = 0.3
    """EWMA weight of a new (median-filtered) sample: ~90% of a step after 7 samples."""
    initial_bandwidth_bps: float = 10e6
    """Prior for B until the first transfer or probe (10 Mbit/s, a modest uplink)."""
    initial_latency_s: float = 0.02
    """Prior for L until the first PING (20 ms)."""
    min_transfer_bytes: int = 4096
    """Uploads below this size do not feed the bandwidth estimate."""
    bandwidth_window: int = 8
    """Without probe trains, B is the maximum of the last this-many (median-filtered)
    upload and probe samples."""
    train_window: int = 5
    """With probe trains, B is the median of the last this-many train samples (the last
    two alone after a step)."""
    busy_window: int = 64
    """The device's busy time per call is the mean over this many recent calls
    (``DeviceBusyEstimator``)."""


class OnlineEstimates:
    """Owns the estimators of one device's view and turns them into ``Estimates``."""

    def __init__(self, profile: Profile, config: OnlineEstimatesConfig | None = None) -> None:
        self.profile = profile
        self.config = config or OnlineEstimatesConfig()
        c = self.config
        self.bandwidth = BandwidthEstimator(
            c.min_transfer_bytes, c.bandwidth_window, c.train_window
        )
        self.latency = LatencyEstimator()
        self.device = DeviceScaleEstimator(c.alpha)
        self.server = ServerTimeEstimator(c.alpha)
        self.overhead = OverheadEstimator(c.alpha)
        self.offload_overhead = OverheadEstimator(c.alpha)
        self.busy = DeviceBusyEstimator(c.busy_window)
        self.server_up = True

    # -- network ------------------------------------------------------------------------

    def observe_upload(
        self, now: float, nbytes: int, seconds: float, uploads: int = 1, *, idle: bool = True
    ) -> None:
        """``uploads`` INFERs of ``nbytes`` in all took ``seconds`` to leave the device
        (``idle``: each found the link idle, ``BandwidthEstimator.observe_transfer``)."""
        self.bandwidth.observe_transfer(now, nbytes, seconds, uploads, idle=idle)

    def observe_ping(self, now: float, rtt_s: float, probe_bytes: int = 0) -> None:
        """A PONG arrived ``rtt_s`` after its PING; ``probe_bytes`` of padding crossed the
        link with it (0 for a bare ping, which feeds the latency estimate)."""
        if probe_bytes <= 0:
            self.latency.observe_rtt(now, rtt_s)
            return
        # The recent minimum, not the all-time one: a path whose delay grew would read
        # the growth as serialisation time of the padding.
        self.bandwidth.observe_probe(now, probe_bytes, rtt_s, self.propagation_s())

    def silence_floor_s(self) -> float:
        """How long a PING must wait unanswered before its silence bounds B
        (``BandwidthEstimator.observe_silence``): ``SILENCE_MIN_S``, or four times the
        slowest recent bare round trip on a server that answers late anyway."""
        slowest = self.latency.slowest_s
        return max(SILENCE_MIN_S, SILENCE_RTT_FACTOR * (slowest or 0.0))

    def observe_silence(self, now: float, pings: Iterable[tuple[int, float]]) -> float | None:
        """The unanswered PINGs, each as (bytes ahead of it on the link, seconds since it
        was written): those silent past ``silence_floor_s`` (round trip excluded) with
        ``min_transfer_bytes`` or more ahead bound B, and the lowest bound goes to
        ``BandwidthEstimator.observe_silence``. Returns it when it replaced B. (The oldest
        PING alone may have had little ahead of it, and the ones behind the flood much.)"""
        floor, prop = self.silence_floor_s(), self.propagation_s()
        least = self.bandwidth.min_transfer_bytes
        waits = [(n, w - prop) for n, w in pings if w - prop >= floor and n >= least]
        if not waits:
            return None
        nbytes, silent = min(waits, key=lambda x: x[0] / x[1])
        return self.bandwidth.observe_silence(now, nbytes, silent)

    # -- device -------------------------------------------------------------------------

    def observe_device(self, now: float, stages: int, real_ms: float, start: int = 0) -> None:
        """The device ran stages ``[start, stages)`` (exit heads included) in ``real_ms``:
        the head before the split (``start = 0``) or a stretch of the local race after it,
        which is how SF stays measured at split 0, where the head is empty."""
        if not 0 <= start <= stages:
            raise ValueError(f"device stage range [{start}, {stages}) is empty or reversed")
        offline = self.profile.device_time_ms(stages) - self.profile.device_time_ms(start)
        self.device.observe(now, real_ms, offline)

    def observe_answer(self, now: float, exit_index: int, latency_ms: float) -> None:
        """An input was answered **on the device** at ``exit_index`` after ``latency_ms``
        (from its arrival); the device computed the stages up to that exit, so the rest of
        the time is per-input overhead.  Answers from the server say nothing about it."""
        if not 0 <= exit_index < self.profile.num_exits:
            raise ValueError(
                f"exit index {exit_index} out of range 0..{self.profile.num_exits - 1}"
            )
        stages = self.profile.exit_stages[exit_index] + 1
        compute = self.device.scale * self.profile.device_time_ms(stages)
        self.overhead.observe(now, latency_ms, compute)

    def observe_offload(self, now: float, split: int, elapsed_ms: float) -> None:
        """An input was uploaded at ``split`` ``elapsed_ms`` after its arrival (waits for a
        compute slot excluded): beyond the stages before the split (``SF · T_offline``) it
        is per-input overhead, preprocessing and packing. ``O`` comes from the device's own
        answers; this stands in while there are none, as in a stream the server answers
        alone (server-only or split without early exits), where ``O`` stayed 0."""
        if not 0 <= split <= self.profile.num_stages:
            raise ValueError(f"split {split} out of range 0..{self.profile.num_stages}")
        compute = self.device.scale * self.profile.device_time_ms(split)
        self.offload_overhead.observe(now, elapsed_ms, compute)

    def observe_call(
        self,
        now: float,
        *,
        head: bool,
        call_ms: float,
        stages_ms: float,
        stages: int,
        start: int = 0,
        pack_ms: float = 0.0,
    ) -> None:
        """A device compute call that had queued for its slot kept the device busy
        ``call_ms`` (its run time and the worker's gap before it), ``stages_ms`` of it in
        stages ``[start, stages)`` and ``pack_ms`` packing (``DeviceBusyEstimator``);
        ``head`` for an input's first call, else a step of the local race."""
        if not 0 <= start <= stages <= self.profile.num_stages:
            raise ValueError(f"device stage range [{start}, {stages}) is invalid")
        offline = self.profile.device_time_ms(stages) - self.profile.device_time_ms(start)
        self.busy.observe_call(
            now,
            head=head,
            call_ms=call_ms,
            stages_ms=stages_ms,
            offline_ms=offline,
            pack_ms=pack_ms,
        )

    def observe_upload_work(self, now: float, busy_ms: float) -> None:
        """One upload kept the device busy ``busy_ms``: packing and the event loop's protocol
        work for it (``DeviceBusyEstimator``)."""
        self.busy.observe_upload_work(now, busy_ms)

    # -- server -------------------------------------------------------------------------

    def _server_offline_ms(self, split: int, exit_index: int) -> float:
        if not 0 <= exit_index < self.profile.num_exits:
            raise ValueError(
                f"exit index {exit_index} out of range 0..{self.profile.num_exits - 1}"
            )
        stop = self.profile.exit_stages[exit_index] + 1
        if stop <= split:
            raise ValueError(f"exit {exit_index} (stage {stop - 1}) is before split {split}")
        return self.profile.server_time_ms(split, stop)

    def observe_result(
        self,
        now: float,
        split: int,
        exit_index: int,
        *,
        compute_ms: float | None = None,
        elapsed_s: float | None = None,
        request_bytes: int = 0,
        response_bytes: int = 0,
    ) -> None:
        """A RESULT for a request uploaded at ``split`` that the server answered at
        ``exit_index``: with the reported ``compute_ms`` when present, else inferred from
        ``elapsed_s`` (upload start to RESULT arrival) and the sizes."""
        offline = self._server_offline_ms(split, exit_index)
        if compute_ms is not None:
            self.server.observe_reported(now, compute_ms, offline)
        elif elapsed_s is not None:
            snap = self.snapshot(now)
            self.server.observe_inferred(
                now,
                elapsed_s,
                request_bytes,
                response_bytes,
                offline,
                self.propagation_s(),
                max(snap.bandwidth_bps, 1.0),
            )
        else:
            raise ValueError("observe_result needs compute_ms or elapsed_s")
        self.server_up = True

    def observe_queue(self, now: float, depth: float) -> None:
        self.server.observe_queue(now, depth)

    def propagation_s(self) -> float:
        """Propagation latency for inferring server time: the minimum recent RTT
        (``LatencyEstimator.propagation_s``), the prior before any PING."""
        p = self.latency.propagation_s
        return self.config.initial_latency_s if p is None else p

    def mark_server(self, now: float, up: bool) -> None:
        """The connection to the server was lost (``up=False``) or re-established."""
        self.server_up = up

    # -- snapshot -----------------------------------------------------------------------

    def bandwidth_bps(self) -> float:
        """The live B alone (``snapshot(now).bandwidth_bps`` without building a snapshot:
        a device asks for it on every event, to time its probe trains)."""
        bw = self.bandwidth.bandwidth_bps
        return self.config.initial_bandwidth_bps if bw is None else bw

    def latency_s(self) -> float:
        """The live L alone (``snapshot(now).latency_s`` without building a snapshot)."""
        lat = self.latency.latency_s
        return self.config.initial_latency_s if lat is None else lat

    def snapshot(self, now: float) -> Estimates:
        """The current estimates (priors where nothing was measured yet)."""
        return Estimates(
            bandwidth_bps=self.bandwidth_bps(),
            latency_s=self.latency_s(),
            device_scale=self.device.scale,
            server_scale=self.server.scale,
            server_queue=self.server.queue,
            server_up=self.server_up,
            frame_overhead_ms=(
                self.overhead.overhead_ms
                if self.overhead.samples
                else self.offload_overhead.overhead_ms
            ),
            busy_scale=self.busy.scale,
            head_overhead_ms=self.busy.head_overhead_ms,
            step_overhead_ms=self.busy.step_overhead_ms,
            upload_busy_ms=self.busy.upload_busy_ms,
        )
