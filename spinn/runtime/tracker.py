"""Per-device request bookkeeping: every frame gets exactly one answer.

Pure logic, no I/O and no clock (STYLE.md habits 3 and 4): the asyncio device
adapter feeds it events with ``now`` and acts on what it returns.

The race it arbitrates (DESIGN.md part 7, "execution engine"): after uploading
the activation at the split, the device keeps computing locally.  Whichever of
the server's RESULT and the local continuation produces an answer first wins;
if the local side wins while the server still owes a RESULT, the request must be
CANCELled.  A request whose RESULT is later than its deadline, or whose
connection was lost, is abandoned: the local side finishes it and the answer is
labelled ``fallback``.  A RESULT for an abandoned or answered request is stale
and ignored, so no frame is ever answered twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Answer",
    "Expired",
    "FramePhase",
    "RequestTracker",
    "TrackerError",
    "Where",
    "request_deadline",
]


class Where(enum.StrEnum):
    """Which side produced a frame's answer."""

    DEVICE = "device"
    """A device-side exit answered while the server was usable (or never needed)."""
    SERVER = "server"
    """The server's RESULT arrived first."""
    FALLBACK = "fallback"
    """The server was needed but down, late or lost: the device finished the frame itself."""


class FramePhase(enum.Enum):
    """Life of a frame inside the tracker."""

    LOCAL = "local"
    """Being computed on the device; nothing sent."""
    OFFLOADED = "offloaded"
    """INFER sent; the server's RESULT is awaited while the device continues locally."""
    ABANDONED = "abandoned"
    """The server was needed but is not awaited any more; the device finishes alone."""


class TrackerError(RuntimeError):
    """Illegal use of the tracker by the runtime (a bug, never peer input)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The one answer of one frame."""

    frame_id: int
    """Frame index from the source."""
    where: Where
    """Which side answered."""
    exit_index: int
    """Exit that answered (0-based; the last exit is the backbone's classifier)."""
    classes: tuple[int, ...]
    """Top-k class indices, most probable first."""
    probs: tuple[float, ...]
    """Softmax probabilities of ``classes``."""
    latency_s: float
    """Seconds from the frame entering the tracker to its answer."""
    bytes_sent: int
    """Bytes put on the wire for this frame (framed INFER; 0 if not offloaded)."""
    split: int
    """Split used for this frame."""
    thr_conf: float | None
    """Exit threshold used for this frame; None: no early exit."""
    request_id: int | None
    """Request id of the INFER, if one was sent."""


@dataclass(frozen=True, slots=True)
class Expired:
    """An offloaded request whose deadline passed: CANCEL it and finish locally."""

    frame_id: int
    """Frame that is now finished on the device."""
    request_id: int
    """Request to CANCEL on the server."""


@dataclass(slots=True)
class _Record:
    frame_id: int
    started_at: float
    split: int
    thr_conf: float | None
    phase: FramePhase = FramePhase.LOCAL
    request_id: int | None = None
    sent_at: float | None = None
    deadline: float | None = None
    bytes_sent: int = 0


def request_deadline(
    now: float,
    *,
    upload_bytes: int,
    download_bytes: int,
    bandwidth_bps: float,
    latency_s: float,
    server_time_s: float,
    margin_factor: float = 2.0,
    margin_s: float = 0.05,
) -> float:
    """Latest time a RESULT is still worth waiting for.

    The expected response time is the round trip ``2·L`` plus the transfer of
    both messages at ``B`` plus the server's compute time (DESIGN.md part 4:
    ``T_response = T_server + L + D/B`` per direction).  The deadline scales
    that by ``margin_factor`` and adds ``margin_s`` so that ordinary jitter
    does not trigger a fallback, while a stalled link or a dead server does.
    """
    if bandwidth_bps <= 0:
        raise ValueError(f"bandwidth_bps must be > 0, got {bandwidth_bps}")
    if margin_factor < 1.0:
        raise ValueError(f"margin_factor must be >= 1, got {margin_factor}")
    expected = (
        2.0 * max(latency_s, 0.0)
        + 8.0 * (upload_bytes + download_bytes) / bandwidth_bps
        + max(server_time_s, 0.0)
    )
    return now + margin_factor * expected + margin_s


class RequestTracker:
    """Frames in flight on one device, and the rules that give each one answer."""

    def __init__(self) -> None:
        self._records: dict[int, _Record] = {}
        self._by_request: dict[int, int] = {}
        self._last_frame_id = -1
        self._next_request_id = 1
        self.answered = 0
        """Frames answered so far."""
        self.cancels = 0
        """CANCELs the tracker asked for (local win or deadline)."""
        self.expired = 0
        """Requests abandoned because their deadline passed."""
        self.lost = 0
        """Requests abandoned because the connection was lost."""
        self.failed = 0
        """Frames that ended with an error instead of an answer."""

    # -- frames -----------------------------------------------------------------

    def begin(self, frame_id: int, now: float, split: int, thr_conf: float | None) -> None:
        """A frame enters the device pipeline.  Frame ids must increase."""
        if frame_id <= self._last_frame_id:
            raise TrackerError(f"frame {frame_id} began after frame {self._last_frame_id}")
        self._last_frame_id = frame_id
        self._records[frame_id] = _Record(frame_id, now, split, thr_conf)

    def offloaded(
        self, frame_id: int, request_id: int, now: float, deadline: float, bytes_sent: int
    ) -> None:
        """INFER ``request_id`` for this frame was written to the connection."""
        rec = self._live(frame_id)
        if rec.phase is not FramePhase.LOCAL:
            raise TrackerError(f"frame {frame_id} offloaded twice")
        if request_id in self._by_request:
            raise TrackerError(f"request id {request_id} reused")
        rec.phase = FramePhase.OFFLOADED
        rec.request_id = request_id
        rec.sent_at = now
        rec.deadline = deadline
        rec.bytes_sent += bytes_sent
        self._by_request[request_id] = frame_id

    def server_unavailable(self, frame_id: int) -> None:
        """The policy wanted to offload this frame but the server is down."""
        rec = self._live(frame_id)
        if rec.phase is FramePhase.OFFLOADED:
            raise TrackerError(f"frame {frame_id} is offloaded; use server_lost")
        rec.phase = FramePhase.ABANDONED

    def new_request_id(self) -> int:
        """A request id never used before on this device."""
        rid = self._next_request_id
        self._next_request_id += 1
        return rid

    # -- the race -------------------------------------------------------------

    def server_result(
        self,
        request_id: int,
        now: float,
        exit_index: int,
        classes: tuple[int, ...],
        probs: tuple[float, ...],
    ) -> Answer | None:
        """A RESULT arrived.  Returns the answer, or None if it is stale."""
        frame_id = self._by_request.pop(request_id, None)
        if frame_id is None:
            return None
        rec = self._records.get(frame_id)
        if rec is None or rec.phase is not FramePhase.OFFLOADED:
            return None
        return self._answer(rec, Where.SERVER, now, exit_index, classes, probs)

    def local_answer(
        self,
        frame_id: int,
        now: float,
        exit_index: int,
        classes: tuple[int, ...],
        probs: tuple[float, ...],
    ) -> tuple[Answer | None, int | None]:
        """The device produced an answer.  Returns (answer or None if already
        answered, request id to CANCEL or None)."""
        rec = self._records.get(frame_id)
        if rec is None:
            if frame_id > self._last_frame_id:
                raise TrackerError(f"frame {frame_id} was never begun")
            return None, None
        cancel: int | None = None
        if rec.phase is FramePhase.OFFLOADED:
            assert rec.request_id is not None
            cancel = rec.request_id
            self._by_request.pop(cancel, None)
            self.cancels += 1
        where = Where.FALLBACK if rec.phase is FramePhase.ABANDONED else Where.DEVICE
        return self._answer(rec, where, now, exit_index, classes, probs), cancel

    def expire(self, now: float) -> list[Expired]:
        """Abandon offloaded requests whose deadline is ``<= now``."""
        out: list[Expired] = []
        for rec in self._records.values():
            if (
                rec.phase is FramePhase.OFFLOADED
                and rec.deadline is not None
                and rec.deadline <= now
            ):
                assert rec.request_id is not None
                rec.phase = FramePhase.ABANDONED
                self._by_request.pop(rec.request_id, None)
                out.append(Expired(rec.frame_id, rec.request_id))
        self.expired += len(out)
        self.cancels += len(out)
        return out

    def abandon(self, request_id: int) -> int | None:
        """The server refused or failed this request (ERROR with its id): finish locally.

        Returns the frame id, or None if the request is no longer awaited."""
        frame_id = self._by_request.pop(request_id, None)
        if frame_id is None:
            return None
        rec = self._records.get(frame_id)
        if rec is None or rec.phase is not FramePhase.OFFLOADED:
            return None
        rec.phase = FramePhase.ABANDONED
        return frame_id

    def fail(self, frame_id: int) -> int | None:
        """The frame cannot be answered (its processing failed): it leaves the tracker and
        is reported as an error instead.  Returns the request id to CANCEL, if any.

        A frame that failed before it began is accepted (nothing to forget)."""
        rec = self._records.pop(frame_id, None)
        if rec is None:
            if frame_id <= self._last_frame_id:
                raise TrackerError(f"frame {frame_id} is already answered")
            # Never begun: later frames must still have larger ids.
            self._last_frame_id = frame_id
            self.failed += 1
            return None
        self.failed += 1
        cancel: int | None = None
        if rec.phase is FramePhase.OFFLOADED and rec.request_id is not None:
            if self._by_request.pop(rec.request_id, None) is not None:
                cancel = rec.request_id
                self.cancels += 1
        return cancel

    def server_lost(self) -> list[int]:
        """The connection died: every offloaded frame is finished locally."""
        out: list[int] = []
        for rec in self._records.values():
            if rec.phase is FramePhase.OFFLOADED:
                rec.phase = FramePhase.ABANDONED
                out.append(rec.frame_id)
        self._by_request.clear()
        self.lost += len(out)
        return out

    # -- queries ----------------------------------------------------------------

    def is_answered(self, frame_id: int) -> bool:
        """True once the frame has its answer (the local side can stop)."""
        return frame_id <= self._last_frame_id and frame_id not in self._records

    def phase(self, frame_id: int) -> FramePhase | None:
        """Phase of an unanswered frame, None once answered."""
        rec = self._records.get(frame_id)
        return None if rec is None else rec.phase

    def sent_at(self, request_id: int) -> float | None:
        """When the INFER of an awaited request was sent (None if not awaited)."""
        frame_id = self._by_request.get(request_id)
        if frame_id is None:
            return None
        return self._records[frame_id].sent_at

    def next_deadline(self) -> float | None:
        """Earliest deadline among awaited requests, for the adapter's timer."""
        deadlines = [
            rec.deadline
            for rec in self._records.values()
            if rec.phase is FramePhase.OFFLOADED and rec.deadline is not None
        ]
        return min(deadlines) if deadlines else None

    @property
    def in_flight(self) -> int:
        """Frames begun and not yet answered."""
        return len(self._records)

    @property
    def awaiting_server(self) -> int:
        """Requests whose RESULT is still awaited."""
        return len(self._by_request)

    # -- internals --------------------------------------------------------------

    def _live(self, frame_id: int) -> _Record:
        rec = self._records.get(frame_id)
        if rec is None:
            raise TrackerError(f"frame {frame_id} is not in flight")
        return rec

    def _answer(
        self,
        rec: _Record,
        where: Where,
        now: float,
        exit_index: int,
        classes: tuple[int, ...],
        probs: tuple[float, ...],
    ) -> Answer:
        del self._records[rec.frame_id]
        self.answered += 1
        return Answer(
            frame_id=rec.frame_id,
            where=where,
            exit_index=exit_index,
            classes=classes,
            probs=probs,
            latency_s=now - rec.started_at,
            bytes_sent=rec.bytes_sent,
            split=rec.split,
            thr_conf=rec.thr_conf,
            request_id=rec.request_id,
        )
