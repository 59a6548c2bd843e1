"""Upload-time samples from request answers ("ACK clocking"), pure and clock-free.

DESIGN.md part 4 estimates the bandwidth ``B`` from measured transfers.  A
device cannot see when its bytes leave the last buffer on the path (a kernel
socket buffer or a shaping middlebox absorbs them at once), but it sees when
the server answers each request.  For request ``i`` sent at ``s_i`` and
answered (RESULT or ERROR) at ``a_i``, with the previous answer at ``a_{i-1}``:

* idle link (``s_i ≥ a_{i-1}``): upload = ``a_i − s_i − L − compute_i``;
* backlogged link (``s_i < a_{i-1}``): the uplink was busy with earlier
  requests until ``a_{i-1}``, so upload = ``a_i − a_{i-1} − compute_i``
  (answers leave the server at the rate the uplink delivers requests).

An answer whose server time is unknown (``compute_s=None``: a refused or
expired request, which reports no compute time) gives no sample; it only moves
``a_{i-1}`` on.

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
    last_answer_at: float | None = None
    """When the previous request was answered (None after a reconnect)."""
    _bytes: int = 0
    _seconds: float = 0.0

    def answered(
        self,
        *,
        sent_at: float,
        now: float,
        nbytes: int,
        compute_s: float | None,
        latency_s: float,
    ) -> tuple[int, float] | None:
        """A request of ``nbytes`` sent at ``sent_at`` was answered at ``now``.

        Returns an upload sample ``(bytes, seconds)`` once enough bytes were
        timed, else None (always None when ``compute_s`` is None: the server time is
        unknown).
        """
        prev = self.last_answer_at
        self.last_answer_at = now if prev is None else max(prev, now)
        if compute_s is None:
            return None
        if prev is not None and sent_at < prev:
            upload = now - prev - compute_s
        else:
            upload = now - sent_at - latency_s - compute_s
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
        self.last_answer_at = None
        self._bytes, self._seconds = 0, 0.0
