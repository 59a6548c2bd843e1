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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UploadTimer"]


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
    _bytes: int = 0
    _seconds: float = 0.0

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
        if self._bytes < self.min_bytes or self._seconds < self.min_span_s:
            return None
        sample = (self._bytes, self._seconds)
        self._bytes, self._seconds = 0, 0.0
        return sample

    def reset(self) -> None:
        """A new connection: nothing is queued ahead of the next request."""
        self.uplink_free_at = self.last_answer_at = None
        self._bytes, self._seconds = 0, 0.0
