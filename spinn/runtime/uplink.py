"""Upload-time samples from request answers ("ACK clocking"), pure and clock-free.

DESIGN.md part 4 estimates the bandwidth ``B`` from measured transfers.  A
device cannot see when its bytes leave the last buffer on the path (a kernel
socket buffer or a shaping middlebox absorbs them at once), but it sees when
the server answers each request.  Request ``i`` is sent at ``s_i`` and
answered (RESULT or ERROR) at ``a_i``; the server held it ``R_i`` (RESULT's
``held_ms``: queue wait, unpacking and compute) and ``L`` is the propagation
round trip (the recent minimum RTT).  Its last byte therefore left the
bottleneck at

    f_i = a_i − R_i − L

(the one-way delays up and down add up to ``L`` whichever way they split), and
its upload took

    T_i = f_i − max(s_i, f_{i−1})

* idle link (``s_i ≥ f_{i−1}``): the upload began when it was sent;
* backlogged link (``s_i < f_{i−1}``): it waited for the previous request's
  bytes, so it is timed from when they were through.

Whether the link was backlogged is decided on ``f_{i−1}``, not on the
previous *answer* ``a_{i−1}``: on a long path every request of a pipelined
stream is sent before the previous answer arrives, although the uplink is idle
between them.

An error in ``f`` is a delay (an event loop that read the frame or the answer
late), never an advance.  A delay of several answers at once bunches their
``f`` together: the first reads long and the others near 0.  Samples are
therefore summed until they hold ``min_bytes`` *and* span ``min_span_s``, so
the near-zero ones join a sample that also holds a real upload, and B's
median filter drops that one high sample.

A request refused on arrival (BUSY, a bad tensor or split) was held ``R = 0``.
A cancelled one (``bound=True``) is answered when its CANCEL, which crossed the
link after it, reaches the server, or later when a worker picks it up: ``a − L``
is only a bound on its ``f``.  It gives the upload's upper bound as a sample (a
low rate, which B's max filter discards while the link answers; where the
device wins every race, they are all B learns, and B then follows the link
down) and does not move ``f_{i−1}`` on.  The next request is then timed from
the one before and its upload reads the cancelled one's bytes too: low again.
An answer that arrives before an earlier request's (several server workers)
reads a longer upload, and that earlier request then none: low again.

A server that reports its compute time but not ``held_ms`` hides its queue
wait in the upload (``queue_known=False``): such answers are timed only when
the request left after the previous answer came back, so no queue of this
device's own requests can be ahead of it.

Where uploads are few or small the answers time nothing (an INFER under 1 KiB crosses a
500 Mbit/s link in 16 µs), so the device also sends **probe trains** (``ProbeTrains``):
padded PINGs back to back, whose arrival times at the server (PONG ``received_at``) give
the link's rate by dispersion (``spinn.decisions.online_estimates.train_dispersion``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spinn.decisions.online_estimates import TRAIN_CONFIRM_REL, BandwidthEstimator

__all__ = ["ProbeTrains", "UploadTimer", "uplink_wait_s"]


def uplink_wait_s(now: float, sent: Iterable[tuple[float, int]], bandwidth_bps: float) -> float:
    """How long bytes written at ``now`` would wait behind ``sent`` (when each unanswered
    upload was written, and its bytes), were the link a FIFO draining at
    ``bandwidth_bps`` since: what a PING sent now would measure on top of the round trip.
    The uploads an answer came back for are through and not in ``sent``."""
    if bandwidth_bps <= 0:
        return math.inf if any(n > 0 for _, n in sent) else 0.0
    free = -math.inf
    for at, nbytes in sorted(sent):
        free = max(free, at) + 8.0 * nbytes / bandwidth_bps
    return max(0.0, free - now)


@dataclass(slots=True)
class UploadTimer:
    """Turns answer times into (bytes, seconds) upload samples."""

    min_bytes: int = 4096
    """Samples below this are accumulated with the next ones."""
    min_span_s: float = 0.002
    """…and so are samples shorter than this (see the module's notes on bunching)."""
    uplink_free_at: float | None = None
    """``f`` of the latest answered request: when its last byte left the bottleneck (None
    after a reconnect: nothing is queued ahead of the next request)."""
    last_answer_at: float | None = None
    """When the latest answer arrived (None after a reconnect)."""
    sample_uploads: int = 0
    """Uploads the last sample returned holds (their timing errors add up)."""
    sample_idle: bool = True
    """Whether each upload of the last sample found the link idle (sent after the previous
    one was through). A backlogged upload is timed from the previous one's ``f``, and a
    burst of answers read late makes those differences near 0: on a 0.2 Mbit/s link five
    such uploads read 4.7 Mbit/s. Only idle samples can show a rise (``BandwidthEstimator``)."""
    _idle: bool = True
    _bytes: int = 0
    _seconds: float = 0.0
    _count: int = 0

    def answered(
        self,
        *,
        sent_at: float,
        now: float,
        nbytes: int,
        server_s: float | None,
        latency_s: float,
        queue_known: bool = True,
        bound: bool = False,
    ) -> tuple[int, float] | None:
        """A request of ``nbytes`` sent at ``sent_at`` was answered at ``now`` after the
        server held it ``server_s`` (0 for a refusal on arrival, None when unknown; its
        queue wait included unless ``queue_known`` is False). With ``bound`` the answer
        may have come late (a cancelled request): its upload is an upper bound.

        Returns an upload sample ``(bytes, seconds)`` once enough was timed, else None
        (always None when ``server_s`` is None).
        """
        prev_answer = self.last_answer_at
        self.last_answer_at = now if prev_answer is None else max(prev_answer, now)
        if server_s is None:
            return None
        through = now - latency_s - server_s
        prev = self.uplink_free_at
        if not bound:
            self.uplink_free_at = through if prev is None else max(prev, through)
        if not queue_known and prev_answer is not None and sent_at < prev_answer:
            return None  # its own earlier requests may have queued ahead of it
        upload = through - (sent_at if prev is None else max(sent_at, prev))
        if upload < 0.0 or nbytes <= 0:
            # Through before the previous one (answers out of order, or that one read
            # late): its bytes were timed with it.
            return None
        self._bytes += nbytes
        self._seconds += upload
        self._count += 1
        self._idle = self._idle and (prev is None or sent_at >= prev)
        if self._bytes < self.min_bytes or self._seconds < self.min_span_s:
            return None
        sample = (self._bytes, self._seconds)
        self.sample_uploads, self._count = self._count, 0
        self.sample_idle, self._idle = self._idle, True
        self._bytes, self._seconds = 0, 0.0
        return sample

    def reset(self) -> None:
        """A new connection: nothing is queued ahead of the next request."""
        self.uplink_free_at = self.last_answer_at = None
        self._bytes, self._seconds, self._count, self._idle = 0, 0.0, 0, True


@dataclass(slots=True)
class ProbeTrains:
    """When to send a bandwidth probe train and how large, from the live estimate B.

    A full train lasts ``train_s`` at B, so that the part of it that is timed (all but
    its first third, ``spinn.decisions.online_estimates.train_dispersion``) spreads over 20 ms at the
    server, well above the server's read jitter and a shaper's 5 ms burst, whatever the
    rate.

    Rounds begin with a **scout**, a train ``scout_ratio`` times smaller (at least
    ``min_bytes``), every ``scout_interval_s``: at the estimated rate it passes within
    the resolution; if it is timed, the link is far slower than B says (a drop), and its
    sample goes in at once with a confirming round after it.  The full train follows an
    untimed scout only when the budget allows, and never a timed one: sized for the old
    rate, 30 ms of a 100 Mbit/s link would hold a 0.2 Mbit/s link for 15 s.  At rates
    where a full train is no larger than two scouts, rounds are full trains alone.  On a
    link of 1 Gbit/s or more, or one faster than the largest train can time (loopback, a
    LAN), full trains pause for ``saturated_hold_s`` after one.

    The trains' cost is kept to ``share`` of the link by a budget in seconds of link time:
    it grows by ``share`` per second (up to one round's worth), and each train, once
    answered, is charged its bytes at the estimate it left (an untimed train, which passed
    within the resolution, costs little).  A full train goes when the budget is out of
    debt.  A round whose sample disagrees with the estimate (``needs_confirmation``: a
    step, or an outlier) is followed by a confirming round (scout and full train)
    ``confirm_gap_s`` later whatever the budget, at most ``max_confirms`` in a row (an
    untimed full train that raised the bound is not counted): B follows a step about as
    soon as a round sees it, and the debt the confirmations ran up delays the full trains
    after them.

    Pure: the runtime passes ``now`` and B and sends what ``frames`` returns.
    """

    max_frame_padding: int = 61_440
    """Padding of the largest PING of a train: a server accepts frames of 64 KiB above its
    largest activation (``spinn.runtime.server_setup.frame_limit_for``)."""
    train_s: float = 0.03
    """Duration of a full train at the estimated B."""
    share: float = 0.03
    """Fraction of the link the trains (scouts included) take, at the estimated B."""
    min_bytes: int = 6144
    """Smallest train: four frames above a shaper's one-packet burst of 1500 B."""
    max_bytes: int = 2 << 20
    """Largest train (2 MiB: 34 ms at 500 Mbit/s)."""
    min_frames: int = 4
    """PINGs per full train at least, so that its timed part holds three of them…"""
    scout_frames: int = 3
    """…and per scout, two."""
    max_ping_rate: float = 30.0
    """PINGs a second the trains send at most on average (a server allows 50, in bursts
    of 100, PROTOCOL.md §8; the bare PINGs take two)…"""
    max_ping_burst: float = 60.0
    """…and at once."""
    ping_credit: float = 60.0
    """PINGs the trains may send now."""
    ping_at: float | None = None
    """When ``ping_credit`` was last brought up to date."""
    scout_ratio: int = 16
    """A scout is this much smaller than the full train…"""
    max_scout_bytes: int = 32_768
    """…and at most this large: sized for loopback, a scout of 128 kB would hold a link
    that dropped to 200 kbit/s for 5 s. A scout is timed where it outlasts the shaper's
    burst and the resolution (about 8 ms of the new rate): a drop to a quarter of B or
    below, and any drop below 30 Mbit/s, shows at the next scout."""
    saturated_bps: float = 1e9
    """A full train that shows this rate or more…"""
    saturated_hold_s: float = 10.0
    """…or the largest train passing untimed pauses the full trains this long."""
    full_after: float = 0.0
    """No full train before this (``saturated_hold_s``)."""
    confirm_gap_s: float = 0.1
    """Wait between the answer to one train and a confirming one."""
    scout_interval_s: float = 0.3
    """Wait between rounds: a scout goes out this often (a thirtieth of the full train's
    link time: 0.6% of the link), the full train only when the budget allows."""
    max_confirms: int = 2
    """Confirming rounds in a row at most, before the budget decides again."""
    suspicion_gap_s: float = 5.0
    """Trains sent for the uploads' suspicions (``look_now``) at most one per this long:
    at 0.2 Mbit/s a 6 KiB train is 0.25 s of the link, 5% of it."""
    suspicion_at: float = -math.inf
    """When a suspicion last sent a train."""
    next_at: float = 0.0
    """Not before this."""
    in_flight: bool = False
    """A train was sent and not all of its PINGs were answered yet."""
    scouting: bool = True
    """The next (or the in-flight) train is a round's scout."""
    confirming: int = 0
    """Confirming rounds since the budget last decided (0: a regular round)."""
    credit_s: float = 0.0
    """The budget: link time the trains may still take (negative: in debt)."""
    credit_at: float | None = None
    """When the budget was last brought up to date."""
    sent_bytes: int = 0
    """Bytes of the train in flight on the wire."""
    confirm_bps: float | None = None
    """The rate the round to be confirmed showed: the confirming round is sized for it
    (after a drop to 0.5 Mbit/s, a scout sized for the old 100 Mbit/s takes 0.4 s)."""
    seen_bps: float | None = None
    """B when the trains last looked (``due_at``) or after the last train: a rise beyond
    ``TRAIN_CONFIRM_REL`` that no train showed (uploads, before the first timed train)
    brings a confirming round at once; any rise of B shrinks the
    budget's debt in proportion (``_seen``)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"probe share must be in (0, 1], got {self.share}")
        if not self.train_s > 0.0:
            raise ValueError(f"probe train duration must be > 0 s, got {self.train_s}")
        if self.max_frame_padding < 1 or min(self.min_frames, self.scout_frames) < 2:
            raise ValueError("probe trains need PINGs of >= 1 byte of padding, >= 2 a train")
        if self.scout_ratio < 1 or not 0.0 < self.max_ping_rate <= self.max_ping_burst:
            raise ValueError("probe trains need a scout ratio >= 1 and 0 < PING rate <= burst")

    def _full_bytes(self, bandwidth_bps: float) -> int:
        return int(min(max(bandwidth_bps * self.train_s / 8.0, self.min_bytes), self.max_bytes))

    def _accrue(self, now: float, bandwidth_bps: float) -> None:
        full = self._full_bytes(bandwidth_bps)
        cap = 8.0 * (full + full // self.scout_ratio) / max(bandwidth_bps, 1.0)
        if self.credit_at is None:
            self.credit_s = cap  # a new link: the first round goes at once
        else:
            self.credit_s = min(cap, self.credit_s + self.share * max(0.0, now - self.credit_at))
        self.credit_at = now

    def due(self, now: float, bandwidth_bps: float) -> bool:
        """Whether to send the train ``frames`` returns now."""
        # The tolerance absorbs the rounding of the budget's repayment time.
        return not self.in_flight and now >= self.due_at(now, bandwidth_bps) - 1e-9

    def due_at(self, now: float, bandwidth_bps: float) -> float:
        """When the next train will be due (``inf`` while one is in flight)."""
        if self.in_flight:
            return math.inf
        self._watch(now, bandwidth_bps)
        at = self.next_at
        if self.scouting and self.confirming == 0 and not self._has_scout(bandwidth_bps):
            # No scout at this rate: each round is a full train, when the budget allows.
            self._accrue(now, bandwidth_bps)
            at = max(at, now + max(0.0, -self.credit_s) / self.share)
        # PINGs are rate-limited at the server: the train waits for its PINGs' credit.
        n = len(self._plan(bandwidth_bps)[1])
        self._accrue_pings(now)
        if self.ping_credit < n:
            at = max(at, now + (n - self.ping_credit) / self.max_ping_rate)
        return at

    def _watch(self, now: float, bandwidth_bps: float) -> None:
        """A rise of B that no train showed: confirm it now (``seen_bps``)."""
        if self._seen(bandwidth_bps):
            self._confirm_now(now, None)

    def _confirm_now(self, now: float, size_bps: float | None) -> None:
        """A confirming round, sized for ``size_bps`` (None: for B), goes at once."""
        self.confirming = max(1, self.confirming)
        self.confirm_bps = size_bps
        self.next_at = min(self.next_at, now)

    def look_now(self, now: float, suspected_bps: float) -> bool:
        """Uploads suspect the link moved to ``suspected_bps``, far from B
        (``BandwidthEstimator.take_suspicion``): a confirming round sized for that rate goes
        at once, whatever the budget, unless one is in flight (it will tell) or the last
        one a suspicion sent went less than ``suspicion_gap_s`` ago (suspicions that keep
        coming, such as small uploads let through by a shaper's burst, then cost at most
        one train per gap). Returns whether it goes."""
        if self.in_flight or now < self.suspicion_at + self.suspicion_gap_s:
            return False
        self.suspicion_at = now
        self._confirm_now(now, suspected_bps)
        return True

    def _seen(self, bandwidth_bps: float) -> bool:
        """B is now ``bandwidth_bps``: returns whether it rose beyond ``TRAIN_CONFIRM_REL``
        from the B seen before (not its jitter, which would forgive the debt bit by bit).
        A debt is bytes, counted in link time at B: when B rose, it shrinks in proportion,
        whatever showed it.
        After the step trace's drop to 0.2 Mbit/s, the scout sized for the old rate and the
        confirmations left 1.5 s of debt, 50 s of budget at 3%; the rise to 50 Mbit/s, shown
        by a confirming train that read 51 (B the median, 26), then waited for it and B
        stayed at 26 for the 6 s the step had left."""
        seen, self.seen_bps = self.seen_bps, bandwidth_bps
        if seen is None or bandwidth_bps <= (1.0 + TRAIN_CONFIRM_REL) * seen:
            return False
        if self.credit_s < 0.0:
            self.credit_s *= seen / bandwidth_bps
        return True

    def _has_scout(self, bandwidth_bps: float) -> bool:
        return self._full_bytes(bandwidth_bps) >= 2 * self.min_bytes

    def _accrue_pings(self, now: float) -> None:
        if self.ping_at is not None:
            elapsed = max(0.0, now - self.ping_at)
            self.ping_credit = min(
                self.max_ping_burst, self.ping_credit + elapsed * self.max_ping_rate
            )
        self.ping_at = now

    def _plan(self, bandwidth_bps: float) -> tuple[bool, list[int]]:
        """Whether the next train is a scout, and its PINGs' padding."""
        if self.confirming and self.confirm_bps is not None:
            bandwidth_bps = self.confirm_bps
        total = self._full_bytes(bandwidth_bps)
        # Never more PINGs than three quarters of a burst the server allows.
        total = min(total, int(0.75 * self.max_ping_burst) * self.max_frame_padding)
        scout = self.scouting and self._has_scout(bandwidth_bps)
        if scout:
            total = max(self.min_bytes, min(total // self.scout_ratio, self.max_scout_bytes))
        least = self.scout_frames if scout else self.min_frames
        n = max(least, math.ceil(total / self.max_frame_padding))
        return scout, [math.ceil(total / n)] * n

    def frames(self, bandwidth_bps: float) -> list[int]:
        """The padding of each PING of the next train, for a link of ``bandwidth_bps`` (a
        confirming round's for the rate of the sample it confirms)."""
        # A full train as small as a scout goes without one.
        self.scouting, sizes = self._plan(bandwidth_bps)
        return sizes

    def sent(self, now: float, nbytes: int, pings: int) -> None:
        """The train ``frames`` returned was written at ``now``: ``pings`` PINGs,
        ``nbytes`` on the wire."""
        self.in_flight = True
        self.sent_bytes = nbytes
        self._accrue_pings(now)
        self.ping_credit -= pings

    def answered(
        self,
        now: float,
        bandwidth_bps: float,
        *,
        timed: bool,
        confirm: bool,
        estimate_bps: float | None = None,
    ) -> None:
        """Every PING of the train was answered at ``now``; ``bandwidth_bps`` is the estimate
        after it, or the rate the train itself showed if higher (what it is charged at;
        ``estimate_bps`` then gives the estimate: only a rise of B shrinks the debt, not a
        train that read high, ±30% on the loaded host). ``timed``: its rate was resolved;
        ``confirm``: its sample disagreed with the estimate (for an untimed scout: it showed
        the link faster than the estimate)."""
        self.in_flight = False
        self._seen(bandwidth_bps if estimate_bps is None else estimate_bps)
        self._accrue(now, bandwidth_bps)
        self.credit_s -= 8.0 * self.sent_bytes / max(bandwidth_bps, 1.0)
        if not self.scouting and (
            bandwidth_bps >= self.saturated_bps or (not timed and self.sent_bytes >= self.max_bytes)
        ):
            # The link is faster than matters (the largest activation crosses 1 Gbit/s in
            # 0.2 ms), or than the largest train can tell: loopback, a LAN. Full trains
            # only load both ends there (2 MiB of PINGs through the server's event loop
            # delayed RESULTs past their deadline on the loaded two-core host); scouts
            # still watch for a drop.
            self.full_after = now + self.saturated_hold_s
        self.sent_bytes = 0
        self.next_at = now + self.confirm_gap_s
        if self.scouting and not timed:
            held = self.credit_s < 0.0 or now < self.full_after
            if self.confirming == 0 and held and not confirm:
                # The link is at least as fast as B says, and the budget has no room for
                # the full train: the next scout, a while later.
                self.next_at = now + self.scout_interval_s
                return
            self.scouting = False
            self.next_at = now  # the full train, at once
            return
        # A timed scout found the link far slower than B: confirmed like a step.
        timed_scout, self.scouting = self.scouting, True
        if confirm and not timed:
            # An untimed full train raised the bound: the next is larger (costing little,
            # it is not counted against max_confirms).
            self.confirming = max(1, self.confirming)
        elif (confirm or timed_scout) and self.confirming < self.max_confirms:
            self.confirming += 1
        else:
            self.confirming = 0
            self.next_at = now + self.scout_interval_s

    def train_answered(
        self,
        now: float,
        bandwidth: BandwidthEstimator,
        arrivals: Sequence[tuple[int, float]],
        train_bytes: int,
        prior_bps: float,
    ) -> tuple[float, bool]:
        """Every PING of the train in flight was answered at ``now`` (its ``arrivals``, as
        ``spinn.decisions.online_estimates.train_dispersion`` takes them): feed ``bandwidth`` (whose
        estimate is ``prior_bps`` until it has one) and plan the next train.  Returns what
        the train showed, ``(rate, timed)`` (``timed`` False: a least rate)."""
        before = bandwidth.bandwidth_bps or prior_bps
        sample = BandwidthEstimator.train_sample(arrivals, train_bytes)
        rate, timed = sample if sample is not None else (before, False)
        if sample is not None and (timed or not self.scouting):
            bandwidth.observe_train(now, arrivals, train_bytes)
            confirm = bandwidth.needs_confirmation
        else:
            # An untimed scout is no sample; but if even it shows the link faster than B,
            # the full train goes whatever the budget.
            confirm = rate > (1.0 + TRAIN_CONFIRM_REL) * before
        # Charged at the rate the train itself showed when that is higher: a low estimate
        # must not make the trains that would correct it look dear.
        after = bandwidth.bandwidth_bps or prior_bps
        self.answered(now, max(after, rate), timed=timed, confirm=confirm, estimate_bps=after)
        if not self.confirming:
            # A stale rate would size a later round: after a drop to 0.2 Mbit/s that the
            # PINGs' silence showed, trains kept the size of a 100 Mbit/s scout (23 kB,
            # a second of the link each).
            self.confirm_bps = None
        elif confirm or timed:
            self.confirm_bps = rate
        return rate, timed

    def reset(self, now: float) -> None:
        """The link was lost: the train's answers will not come; start afresh."""
        self.in_flight = False
        self.seen_bps = None
        self.scouting = True
        self.confirming = 0
        self.sent_bytes = 0
        self.next_at = now
