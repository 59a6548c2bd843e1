"""Upload-time samples from request answers ("ACK clocking"), pure and clock-free.

DESIGN.md part 4 estimates the bandwidth ``B`` from measured transfers.  A
device cannot see when its bytes leave the last buffer on the path (a kernel
socket buffer or a shaping middlebox absorbs them at once), but it sees when
the server answers each request.  Request ``i`` is sent at ``s_i`` and
answered (RESULT or ERROR) at ``a_i``; the server held it ``R_i`` (its
reported queue wait and compute time) and ``L`` is the round-trip latency.
Its last byte therefore left the bottleneck at

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

A request refused at once (BUSY) was held ``R = 0``.  One whose holding time
is unknown (cancelled, expired: ``server_s=None``) gives no sample, and its
``f`` is only bounded, ``f ≤ a − L``: a request sent before that bound may
have waited behind it for an unknown time, so it gives no sample either.

Small requests are summed until ``min_bytes`` so that each sample handed to
the bandwidth estimator is large enough to time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UploadTimer"]

# Below this an upload time is noise (event-loop scheduling), not a transfer.
_RESOLUTION_S = 1e-6


@dataclass(slots=True)
class UploadTimer:
    """Turns answer times into (bytes, seconds) upload samples."""

    min_bytes: int = 4096
    """Samples below this are accumulated with the next ones."""
    uplink_free_at: float | None = None
    """``f`` of the latest answered request: when its last byte left the bottleneck (None
    after a reconnect: nothing is queued ahead of the next request)."""
    unknown_until: float | None = None
    """Bound on ``f`` of requests answered with an unknown holding time: a request sent
    before it may have queued behind one of them."""
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
    ) -> tuple[int, float] | None:
        """A request of ``nbytes`` sent at ``sent_at`` was answered at ``now`` after the
        server held it ``server_s`` (queue wait and compute; 0 for a refusal, None when
        unknown).

        Returns an upload sample ``(bytes, seconds)`` once enough bytes were timed, else
        None (always None when ``server_s`` is None).
        """
        if server_s is None:
            bound = now - latency_s
            self.unknown_until = (
                bound if self.unknown_until is None else max(self.unknown_until, bound)
            )
            return None
        through = now - latency_s - server_s
        prev = self.uplink_free_at
        self.uplink_free_at = through if prev is None else max(prev, through)
        if self.unknown_until is not None and sent_at < self.unknown_until:
            return None  # it may have queued behind a request whose time is unknown
        upload = through - (sent_at if prev is None else max(sent_at, prev))
        if upload <= _RESOLUTION_S or nbytes <= 0:
            # Compute-bound or faster than the clock resolves: nothing to learn here.
            return None
        self._bytes += nbytes
        self._seconds += upload
        if self._bytes < self.min_bytes:
            return None
        sample = (self._bytes, self._seconds)
        self._bytes, self._seconds = 0, 0.0
        return sample

    def reset(self) -> None:
        """A new connection: nothing is queued ahead of the next request."""
        self.uplink_free_at = self.unknown_until = None
        self._bytes, self._seconds = 0, 0.0
