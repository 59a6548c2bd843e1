"""The device's decisions, sans I/O: ``DeviceCore``.

Like ``protocol.Connection`` and aioquic's ``QuicConnection`` (STYLE.md), the core never
touches a socket, a thread or a clock. The asyncio adapter (``spinn.runtime.device``) feeds
it ``now`` and what happened — a frame arrived, a compute call finished, a message came
from the server, the link went up or down, the timer fired — and carries out the actions
each call returns, in order: send a message, run stages ``[a, b)`` of frame ``f`` at
priority ``p``, give up a queued computation, publish an answer record, log a line,
reconnect after a delay, close the link. ``next_timer`` says when to call ``timer`` next.

Per frame (DESIGN.md part 7, "execution engine"):

1. ``policy.decide`` gives ⟨split, thr_conf⟩ from the live estimates (``frame_arrived``).
2. ``RunHead``: the device runs stages ``[0, split)`` checking each exit, and packs the
   activation when the frame may go out; a confident exit answers locally.
3. Otherwise ``SendInfer`` with a deadline from the estimates (``request_deadline``).
4. ``RunStages`` of ``[split, S)``, one stage a call, while the server works (priority 1:
   stages of new frames go first). The first answer wins; a local win CANCELs the
   request, a server win cancels the queued stage (``CancelCompute``).
5. A RESULT later than its deadline, an ERROR for the request, an implausible RESULT or a
   lost connection hands the frame to the local side: answered as ``fallback``.

The core also times the link: bare PINGs for the latency L, probe trains for the
bandwidth B (``uplink.ProbeTrains``), upload times from answer times
(``uplink.UploadTimer``), and declares the link dead when PINGs go unanswered; and it
picks the server to connect to next (``failover.ServerRotation``).

It imports nothing of asyncio, socket, threading, time or torch
(``tests/runtime/test_pure_cores.py`` enforces it): the activations it hands back and
forth are opaque to it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol import (
    Auth,
    Bye,
    Cancel,
    Challenge,
    Error,
    ErrorCode,
    Infer,
    Ping,
    Pong,
    ProtocolError,
    Result,
)
from protocol.auth import device_proof
from protocol.description import Description
from protocol.tensor import DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, PackedTensor
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import OnlineEstimates, ServerTimeEstimator
from spinn.decisions.policy import Decision, Policy
from spinn.model.exits import ExitRule
from spinn.runtime.actions import Log, error_text, fitted_error
from spinn.runtime.backoff import Backoff
from spinn.runtime.failover import ServerRotation
from spinn.runtime.run_summary import DeviceStats, median_or_none
from spinn.runtime.server_description import CheckpointFacts, mismatches
from spinn.runtime.tracker import Answer, FramePhase, RequestTracker, request_deadline
from spinn.runtime.uplink import ProbeTrains, UploadTimer, uplink_wait_s

if TYPE_CHECKING:
    from spinn.runtime.config import DeviceConfig

__all__ = [
    "FATAL_CODES",
    "Action",
    "ArmTimer",
    "CancelCompute",
    "CloseLink",
    "ComputeCall",
    "DeviceCore",
    "DeviceError",
    "Fatal",
    "FLUSH_S",
    "FrameDone",
    "LocalExit",
    "Log",
    "ModelShape",
    "Plan",
    "Publish",
    "Reconnect",
    "RunHead",
    "RunStages",
    "Send",
    "SendInfer",
    "SendProbeTrain",
    "StartFrames",
    "recode_target",
]


# Bytes of a PING frame besides its padding (msgpack envelope; a generous bound).
_PING_ENVELOPE = 128
# Bare PINGs sent 0.1 s apart on a new connection, before the regular interval: L is a
# median of five, and the first round trip of a connection is slow.
_QUICK_PINGS = 4
# A bare PING times L only if the uploads ahead of it would hold it this long at most
# (at B, spinn.runtime.uplink.uplink_wait_s), or this share of L if more.
_CLEAN_QUEUE_S = 0.001
_CLEAN_QUEUE_SHARE = 0.1
# Request errors the server sends as soon as the INFER arrives (PROTOCOL.md §8).
_ANSWERED_ON_ARRIVAL = (ErrorCode.BUSY, ErrorCode.BAD_TENSOR, ErrorCode.BAD_SPLIT)
FATAL_CODES = (ErrorCode.MODEL_MISMATCH, ErrorCode.VERSION, ErrorCode.UNAUTHENTICATED)
"""Errors that refuse this device for good (the run ends once its frames are answered)."""
FLUSH_S = 1.0
"""At the end of a run, how long the BYE may take to leave: a server that does not read
cannot hold the exit."""


def recode_target(codec: str, link_codec: str, accepted: Sequence[str]) -> str | None:
    """The codec a tensor packed with ``codec`` must be re-coded to for a link that packs
    with ``link_codec`` and whose server accepted ``accepted``; None: it goes as it is.

    Both rare, after a reconnection to a different server: pixels for a server without
    uint8_image go as the float input (PROTOCOL.md §6.8), never sparse_uintb (the
    normalised input is negative in places); sparse_uintb for a server without it, and a
    tensor packed with dictionaries the server lacks, go as sparse_int8 (§6.9, §6.7)."""
    if codec == IMAGE_CODEC:
        if IMAGE_CODEC in accepted:
            return None
        return "sparse_int8" if link_codec == LOSSY_CODEC else link_codec
    if codec in (LOSSY_CODEC, DICT_CODEC) and link_codec != codec:
        return "sparse_int8"
    return None


class DeviceError(RuntimeError):
    """The device cannot run: bad configuration or a server that refuses this model."""


# -- what the core needs to know of the model -------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The parts of the progressive model the decisions read (``spinn.model.progressive``)."""

    num_stages: int
    """S: valid splits are 0..S."""
    exit_stages: tuple[int, ...]
    """Stage read by each exit, ascending; the last is S−1."""
    num_classes: int
    """Classes of the classifier."""
    class_names: tuple[str, ...] = ()
    """Names of the classes (the checkpoint's), empty if it has none."""
    facts: CheckpointFacts | None = None
    """What the checkpoint says that a server's description must repeat (input, classes,
    split shapes); None: WELCOMEs are not checked."""

    @property
    def num_exits(self) -> int:
        """E, the number of exits."""
        return len(self.exit_stages)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one decision means for one frame's execution."""

    split: int
    """Device runs stages [0, split)."""
    last: int
    """Stages end here: S, or after the forced exit of a truncated network."""
    rule: ExitRule
    """The device's exit rule (``Decision.exit_rule``)."""
    wire_thr: float
    """Threshold sent in INFER."""
    forced_exit: int | None
    """Exit that always answers at the end of a truncated network."""
    wire_early_exits: bool = True
    """INFER's early_exits: False asks the server for its final exit only."""
    bits: int | None = None
    """sparse_uintb width of the upload (``Decision.bits``); None: lossless."""


@dataclass(frozen=True, slots=True)
class LocalExit:
    """An exit that answered on the device: its index and top-k classes."""

    exit_index: int
    """Exit that answered."""
    classes: tuple[int, ...]
    """Top-k class indices, most probable first."""
    probs: tuple[float, ...]
    """Their softmax probabilities."""


@dataclass(frozen=True, slots=True)
class ComputeCall:
    """How one compute call went on its worker, as the adapter measured it (its clock)."""

    worker: int
    """Which worker ran it (a thread id): busy time is accounted per worker."""
    started: float
    """When the call began."""
    ended: float
    """When it ended."""
    link_busy_ms: float
    """The event loop's time on the server link so far, read when the call ended."""
    queued: bool
    """Whether the call had queued for its slot (``ComputeSlots.acquire``)."""
    waited_s: float
    """Time spent waiting for the slot (queueing behind other frames)."""


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write one message to the server (dropped when the link is down)."""

    message: Cancel | Ping | Pong | Error | Auth


@dataclass(frozen=True, slots=True)
class SendInfer:
    """Write this INFER, then report its framed size with ``DeviceCore.infer_written``."""

    frame_id: int
    message: Infer


@dataclass(frozen=True, slots=True)
class SendProbeTrain:
    """Write these padded PINGs back to back, then report their framed sizes with
    ``DeviceCore.train_written`` (0 for one that could not be written)."""

    pings: tuple[Ping, ...]


@dataclass(frozen=True, slots=True)
class RunHead:
    """Preprocess frame ``frame_id`` and run stages ``[0, plan.split)`` at priority 0; pack
    the activation at the split when ``pack`` (the frame may go to the server). Report with
    ``DeviceCore.head_done``."""

    frame_id: int
    plan: Plan
    bandwidth_bps: float
    """The live B, for the packer's zstd decision (paper §4.3)."""
    pack: bool
    codec: str = "sparse_int8"
    """The codec to pack the activation with: the device's first that the server took."""
    pixels: bool = False
    """At split 0, send the frame's pixels (``uint8_image``, PROTOCOL.md §6.8): the server
    takes them."""

    @property
    def priority(self) -> int:
        """A head runs first: a new frame's stages go before a race's continuation."""
        return 0


@dataclass(frozen=True, slots=True)
class RunStages:
    """Run stages ``[start, stop)`` of frame ``frame_id`` from ``activation`` at ``priority``
    (lower first); report with ``DeviceCore.stages_done``."""

    frame_id: int
    start: int
    stop: int
    priority: int
    plan: Plan
    activation: Any


@dataclass(frozen=True, slots=True)
class CancelCompute:
    """Frame ``frame_id`` has its answer: a computation of it that has not started yet is
    not run (report it with ``DeviceCore.compute_skipped``)."""

    frame_id: int


@dataclass(frozen=True, slots=True)
class FrameDone:
    """Frame ``frame_id`` is answered (or failed) and nothing of it runs any more: its
    place in the window is free."""

    frame_id: int


@dataclass(frozen=True, slots=True)
class Publish:
    """Write one answer (or error) record of a frame."""

    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Close the connection to the server, saying why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """The server refused this device for good: stop reading frames, answer the ones read,
    then end the run with this error."""

    message: str


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """The next timer may be earlier than the one armed: ask ``next_timer`` again."""


@dataclass(frozen=True, slots=True)
class StartFrames:
    """Start reading frames (``DeviceCore.start``)."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Connect to ``DeviceCore.server_address`` after ``delay_s`` seconds."""

    delay_s: float


Action = (
    Send
    | SendInfer
    | SendProbeTrain
    | RunHead
    | RunStages
    | CancelCompute
    | FrameDone
    | Publish
    | Log
    | CloseLink
    | Fatal
    | ArmTimer
    | Reconnect
    | StartFrames
)


# -- state ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sent:
    """An INFER the server has not answered (RESULT or ERROR) yet, answered here or not."""

    split: int
    nbytes: int
    sent_at: float


@dataclass(slots=True)
class _Frame:
    """One frame in flight, beside its ``RequestTracker`` record."""

    frame_id: int
    begun: float
    plan: Plan
    label: int | None
    origin: str | None
    waited_s: float = 0.0
    """Time spent waiting for compute slots (queueing, not per-input overhead)."""
    computing: bool = True
    """A computation was asked for and not reported yet."""
    activation: Any = None
    """The activation at ``stage``, for the local race."""
    stage: int = 0
    """The next stage to run locally."""
    pack_ms: float = 0.0
    """Packing time of the head (busy time per upload)."""


@dataclass(slots=True)
class _Pinger:
    """PINGs of the current connection: L, probe trains, the dead-link check."""

    pings: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    """Unanswered PINGs in the order sent (the first is the oldest): when sent, their
    padding, and the bytes they had to wait behind on the link when written, their own
    padding included (the silence bound, ``OnlineEstimates.observe_silence``)."""
    padding: int = 0
    """The padding of the unanswered PINGs, in bytes: still on the link, as far as this
    end knows (the dead-link allowance and ``_unanswered_bytes`` count it)."""
    clean: set[int] = field(default_factory=set)
    """Bare PINGs sent with no probe train ahead of them: only these time L."""
    train: dict[int, int] = field(default_factory=dict)
    """The probe train in flight: its PINGs' seq → size on the wire, in the order sent."""
    train_arrivals: dict[int, tuple[int | None, float]] = field(default_factory=dict)
    """Per answered PING of the train: the server's bytes read and clock when it arrived."""
    train_pending: tuple[float, tuple[Ping, ...]] | None = None
    """A train handed to the adapter and not reported yet: when, and its PINGs."""
    next_bare: float = 0.0
    bare_sent: int = 0
    heard_at: float = 0.0
    """When the server last sent anything."""
    active: bool = False
    """Between WELCOME and the link's end or the dead-link verdict."""

    def sent(self, seq: int, now: float, padding: int, ahead: int) -> None:
        """PING ``seq`` goes out at ``now`` with ``padding``, behind ``ahead`` bytes."""
        self.pings[seq] = (now, padding, ahead)
        self.padding += padding

    def answered(self, seq: int) -> tuple[float, int, int] | None:
        """PING ``seq``'s PONG came: its record (None: not one of this connection's)."""
        sent = self.pings.pop(seq, None)
        if sent is not None:
            self.padding -= sent[1]
        return sent


class DeviceCore:
    """The decisions of one device: frames, the race, the link's timing; see the module."""

    def __init__(
        self,
        config: DeviceConfig,
        *,
        profile: Profile,
        policy: Policy,
        model: ModelShape,
        workers: int = 1,
        codecs: Sequence[str] = ("sparse_int8",),
    ) -> None:
        self.config = config
        self.profile = profile
        self.policy = policy
        self.model = model
        self.codecs = tuple(codecs)
        """Activation codecs the device packs with, preferred first; the last is what every
        server takes (PROTOCOL.md §5.2)."""
        self.accepted: tuple[str, ...] = ()
        """The codecs the server accepted in its WELCOME (none while the link is down)."""
        self.has_server = config.link.server is not None
        self.profiler = OnlineEstimates(profile)
        if not self.has_server:
            self.profiler.mark_server(0.0, False)
        self.tracker = RequestTracker()
        self.stats = DeviceStats()
        # The busy-time accounting reads one worker's gaps between calls as hand-off work;
        # with several workers the gaps overlap and the sum is no longer the device's time.
        self.measure_busy = workers == 1
        self.decision: Decision = policy.decide(0.0, self.profiler.snapshot(0.0))
        """The latest decision (the summary's split and thr_conf)."""
        self.frames_read = 0
        """Frames that arrived (each gets one answer or one error record)."""
        self.errors = 0
        """Frames answered with an error record instead of a classification."""
        self.connects = 0
        """Successful (re)connections so far."""
        self.probe_bytes_sent = 0
        """Bytes of probe trains written (framed), for the summary's probe overhead."""
        self._frames: dict[int, _Frame] = {}
        self._sent: dict[int, _Sent] = {}
        self._upload_timer = UploadTimer()
        self._server_ms_reported: list[float] = []
        self._server_ms_inferred: list[float] = []
        self._job_end: dict[int, tuple[float, float]] = {}
        """Per worker: when its last compute call ended, and the link's busy ms then."""
        self._link_ms_at_upload = 0.0
        self._writing: tuple[int, float, float] | None = None
        """The INFER handed to the adapter and not reported yet: request id, when, deadline."""
        self.fatal: str | None = None
        """Why the server refused this device for good (``Fatal``); None while it has not."""
        self._ping = _Pinger()
        self._ping_seq = 0
        self._trains = ProbeTrains(
            max_frame_padding=max(1, config.link.probe_bytes), share=config.link.probe_share
        )
        backoff = Backoff(
            config.link.reconnect_base_s,
            config.link.reconnect_cap_s,
            random.Random(config.link.seed),
        )
        self.rotation: ServerRotation | None = (
            ServerRotation(config.link.server_addresses, backoff) if self.has_server else None
        )
        self._connected_at = 0.0
        self._answers_on_link = 0
        self._hints_given: set[str] = set()
        self._same_failures: tuple[str, int] = ("", 0)
        self._actions: list[Action] = []
        self._rearm = False
        """Something moved the next timer earlier (``ArmTimer``)."""
        self._hold_until: float | None = None
        """Until when the first frame waits for the first connection (``start``)."""

    def start(self, now: float) -> list[Action]:
        """The run begins. Without a server the frames start at once (``StartFrames``);
        with one, once the first connection is up or ``link.connect_timeout_s`` has
        passed, so that a healthy server is used from frame 0."""
        if not self.has_server:
            return [StartFrames()]
        self._hold_until = now + self.config.link.connect_timeout_s
        self._rearm = True
        return self._drain()

    def _release_frames(self) -> None:
        if self._hold_until is not None:
            self._hold_until = None
            self._actions.append(StartFrames())

    # -- frames -------------------------------------------------------------------------

    def plan(self, decision: Decision) -> Plan:
        """What one decision means for one frame's execution; DeviceError for an exit the
        model lacks."""
        last = self.model.num_stages
        forced = decision.final_exit
        num_exits = self.model.num_exits
        if forced is not None:
            if not 0 <= forced < num_exits:
                raise DeviceError(f"policy chose exit {forced}; the model has {num_exits}")
            if forced == num_exits - 1:
                forced = None
            else:
                # Edgent's right-sized network (spinn.decisions.policy.Decision.final_exit) ends here.
                last = self.model.exit_stages[forced] + 1
        split = min(max(decision.split, 0), last)
        rule = decision.exit_rule
        wire_thr, wire_early_exits = rule.to_wire()  # the protocol's form (PROTOCOL.md §5.3)
        if forced is not None and split < last:
            exits_after = [e for e, k in enumerate(self.model.exit_stages) if k >= split]
            if exits_after and exits_after[0] == forced:
                # The truncation exit is the server's first: threshold 0 makes it answer.
                wire_thr, wire_early_exits = ExitRule(0.0).to_wire()
        return Plan(split, last, rule, wire_thr, forced, wire_early_exits, decision.bits)

    def decide(self, now: float) -> Decision:
        """The policy's ⟨split, thr_conf⟩ for the next frame read, from the live estimates
        (one call per frame: it counts the frame); a change of split or reason is logged
        (with the next actions)."""
        self.frames_read += 1
        decision = self.policy.decide(now, self.profiler.snapshot(now))
        if decision.reason != self.decision.reason or decision.split != self.decision.split:
            self._log(
                logging.INFO,
                "decision: split %d %s (%s)",
                decision.split,
                decision.exit_rule.describe(),
                decision.reason,
            )
        self.decision = decision
        return decision

    def frame_arrived(
        self,
        now: float,
        frame_id: int,
        *,
        label: int | None = None,
        origin: str | None = None,
        error: str | None = None,
        decision: Decision | None = None,
        link_up: bool = False,
    ) -> list[Action]:
        """A frame enters (``error``: the source could not read it). ``decision``: what
        ``decide`` gave for it (None: decided here); ``link_up``: whether the server was
        connected and writable once it was decided (the adapters look at the link after
        ``decide``: a link seen down then makes the frame ``fallback``). Raises DeviceError
        where the decision cannot run (``plan``): report that frame with ``frame_failed``."""
        if error is not None:
            # The source could not read it: its answer is this error record.
            self.frames_read += 1
            self._log(logging.WARNING, "frame %d: %s", frame_id, error)
            self._fail(frame_id, f"SourceError: {error}", label, origin)
            self._actions.append(FrameDone(frame_id))
            return self._drain()
        if decision is None:
            decision = self.decide(now)
        plan = self.plan(decision)
        self.tracker.begin(frame_id, now, plan.split, decision.thr_conf)
        self._frames[frame_id] = _Frame(frame_id, now, plan, label, origin)
        if self.has_server and not link_up:
            # Decided while the server is unreachable (the policy saw server_up=False):
            # whatever answers this frame is the device standing in for the server.
            self.tracker.server_unavailable(frame_id)
        bandwidth = self.profiler.bandwidth_bps()
        pack = plan.split < plan.last and self.has_server
        pixels = IMAGE_CODEC in self.accepted
        self._actions.append(RunHead(frame_id, plan, bandwidth, pack, self.pack_codec, pixels))
        return self._drain()

    def head_done(
        self,
        now: float,
        frame_id: int,
        call: ComputeCall,
        *,
        answer: LocalExit | None,
        activation: Any,
        packed: PackedTensor | None,
        stages_ms: float,
        reached: int,
        pack_ms: float,
        link_up: bool,
        queued_bytes: int = 0,
    ) -> list[Action]:
        """The head of a frame ran: ``answer`` if an exit answered, else the activation at
        the split (``packed`` for the link, as the link's codec needs it now). ``link_up``
        and ``queued_bytes`` (written, not yet handed to the kernel) describe the link."""
        frame, call_ms = self._computed(frame_id, call)
        self.profiler.observe_device(now, reached, stages_ms)
        if call.queued and self.measure_busy:
            # The device's busy time under a saturating stream, hand-off gap included
            # (spinn.decisions.online_estimates.DeviceBusyEstimator; docs/SCHEDULER.md, "device busy time").
            self.profiler.observe_call(
                now,
                head=True,
                call_ms=call_ms,
                stages_ms=stages_ms,
                stages=reached,
                pack_ms=pack_ms,
            )
        if answer is not None:
            self._local(now, frame, answer)
            return self._drain()
        frame.activation, frame.stage, frame.pack_ms = activation, frame.plan.split, pack_ms
        if self.has_server and self.tracker.phase(frame_id) is FramePhase.LOCAL:
            if link_up and packed is not None:
                self._offload(now, frame, packed, queued_bytes)
                return self._drain()
            self.tracker.server_unavailable(frame_id)
        # Without a configured server (device-only run) the rest is plain local compute.
        self._next_step(frame)
        return self._drain()

    def infer_written(
        self, now: float, frame_id: int, request_id: int, nbytes: int, link_busy_ms: float
    ) -> list[Action]:
        """The INFER of ``SendInfer`` went out as ``nbytes`` framed bytes (0: the link was
        down, it did not go)."""
        frame = self._frames[frame_id]
        assert self._writing is not None and self._writing[0] == request_id, (
            "not the INFER asked for"
        )
        _, sent_at, deadline = self._writing
        self._writing = None
        if nbytes == 0:
            # The link died between the decision and the write (a reset seen by the
            # transport first): the device stands in for the server, answered as fallback.
            self.tracker.server_unavailable(frame_id)
        else:
            self.tracker.offloaded(frame_id, request_id, sent_at, deadline, nbytes)
            self._sent[request_id] = _Sent(frame.plan.split, nbytes, sent_at)
            self._rearm = True  # a new deadline
        # One upload: its packing plus the link work since the previous upload is the
        # device's busy time per upload (docs/SCHEDULER.md, "device busy time").
        with contextlib.suppress(ValueError):
            self.profiler.observe_upload_work(
                now, frame.pack_ms + link_busy_ms - self._link_ms_at_upload
            )
        self._link_ms_at_upload = link_busy_ms
        # Arrival to upload, beyond the stages: the per-input overhead O of an uploaded
        # input (docs/SCHEDULER.md), less the head's wait for its slot.
        with contextlib.suppress(ValueError):
            self.profiler.observe_offload(
                sent_at, frame.plan.split, max(0.0, now - frame.begun - frame.waited_s) * 1e3
            )
        self._next_step(frame)
        return self._drain()

    def stages_done(
        self,
        now: float,
        frame_id: int,
        call: ComputeCall,
        *,
        answer: LocalExit | None,
        activation: Any,
        stop: int,
        stages_ms: float,
    ) -> list[Action]:
        """Stages of the local race ran (``RunStages``) up to ``stop``."""
        frame, call_ms = self._computed(frame_id, call)
        start = frame.stage
        # The race's stages keep SF measured where the head is short or empty (split 0;
        # docs/SCHEDULER.md, "what the predictions do not see").
        self.profiler.observe_device(now, stop, stages_ms, start=start)
        if call.queued and self.measure_busy:
            self.profiler.observe_call(
                now, head=False, call_ms=call_ms, stages_ms=stages_ms, stages=stop, start=start
            )
        if answer is not None:
            self._local(now, frame, answer)
            return self._drain()
        frame.activation, frame.stage = activation, stop
        self._next_step(frame)
        return self._drain()

    def compute_skipped(self, now: float, frame_id: int) -> list[Action]:
        """A computation asked for was not run (``CancelCompute``)."""
        frame = self._frames.get(frame_id)
        if frame is not None:
            frame.computing = False
            self._next_step(frame)
        return self._drain()

    def frame_failed(
        self,
        now: float,
        frame_id: int,
        error: Exception | str,
        *,
        label: int | None = None,
        origin: str | None = None,
    ) -> list[Action]:
        """The frame cannot be answered: its processing raised ``error`` (a bad image, a
        bug). Every input gets exactly one answer or an explicit error record, never
        silently dropped: it gets an error record instead, unless it was answered
        already."""
        if isinstance(error, Exception):
            self._actions.append(Log(logging.ERROR, "frame %d failed", (frame_id,), error))
            error = f"{type(error).__name__}: {error}"
        frame = self._frames.pop(frame_id, None)
        if frame is not None:
            label, origin = frame.label, frame.origin
        if not self.tracker.is_answered(frame_id):
            self._fail(frame_id, error, label, origin)
        self._actions.append(FrameDone(frame_id))
        return self._drain()

    def _fail(self, frame_id: int, error: str, label: int | None, origin: str | None) -> None:
        cancel = self.tracker.fail(frame_id)
        self.errors += 1
        record: dict[str, Any] = {"frame": frame_id, "where": "error", "error": error}
        if label is not None:
            record["label"] = label
        if origin:
            record["origin"] = origin
        self._actions.append(Publish(record))
        if cancel is not None and self.has_server:
            self._actions.append(Send(Cancel(cancel)))

    def _next_step(self, frame: _Frame) -> None:
        """Ask for the frame's next stage, or wait for the server, or end the frame."""
        fid = frame.frame_id
        if self.tracker.is_answered(fid):
            self._done(frame)
            return
        if frame.stage >= frame.plan.last:
            message = f"frame {fid}: no exit answered after the last stage"
            self._log(logging.ERROR, "frame %d failed: %s", fid, message)
            self._frames.pop(fid, None)
            self._fail(fid, f"RuntimeError: {message}", frame.label, frame.origin)
            self._actions.append(FrameDone(fid))
            return
        phase = self.tracker.phase(fid)
        if phase is FramePhase.OFFLOADED and not self.config.policy.continue_locally:
            return  # the server's answer, or its failure, moves the frame on
        # A frame the server will not answer is urgent; a race continuation is not.
        priority = 1 if phase is FramePhase.OFFLOADED else 0
        frame.computing = True
        k = frame.stage
        self._actions.append(RunStages(fid, k, k + 1, priority, frame.plan, frame.activation))

    def _done(self, frame: _Frame) -> None:
        if not frame.computing:
            self._frames.pop(frame.frame_id, None)
            self._actions.append(FrameDone(frame.frame_id))

    def _resume(self, frame_id: int | None) -> None:
        """The server will not answer this frame: the local side finishes it."""
        frame = None if frame_id is None else self._frames.get(frame_id)
        if frame is not None and not frame.computing:
            self._next_step(frame)

    def _computed(self, frame_id: int, call: ComputeCall) -> tuple[_Frame, float]:
        """A computation of the frame came back: its record, and the call's busy time."""
        frame = self._frames[frame_id]
        frame.computing = False
        frame.waited_s += call.waited_s
        return frame, self._call_busy_ms(call)

    def _call_busy_ms(self, call: ComputeCall) -> float:
        """A call's busy time in ms: its own run time plus the gap since its worker's
        previous call ended, less the event loop's link work in that span (counted per
        upload instead). Kept only for calls that queued for their slot: the worker was
        handed it straight from the previous one, and the gap was hand-off work, not
        idleness (``spinn.decisions.online_estimates.DeviceBusyEstimator``)."""
        link = call.link_busy_ms
        prev_end, prev_link = self._job_end.get(call.worker, (call.started, link))
        self._job_end[call.worker] = (call.ended, link)
        return max(0.0, (call.ended - prev_end) * 1e3 - (link - prev_link))

    def _offload(self, now: float, frame: _Frame, packed: PackedTensor, queued_bytes: int) -> None:
        est = self.profiler.snapshot(now)
        rid = self.tracker.new_request_id()
        split = frame.plan.split
        server_ms = self.profile.server_time_ms(split) * est.server_scale
        unanswered = queued_bytes + sum(s.nbytes for s in self._sent.values())
        deadline = request_deadline(
            now,
            upload_bytes=unanswered + packed.nbytes,
            download_bytes=_result_bytes(self.config.output.top_k),
            bandwidth_bps=max(est.bandwidth_bps, 1.0),
            latency_s=est.latency_s,
            server_time_s=server_ms / 1e3,
            margin_factor=self.config.policy.deadline_factor,
            margin_s=self.config.policy.deadline_margin_s,
        )
        self._writing = (rid, now, deadline)
        message = Infer(
            rid,
            split,
            frame.plan.wire_thr,
            packed,
            deadline_ms=1e3 * (deadline - now) * self.config.policy.server_budget_share,
            early_exits=frame.plan.wire_early_exits,
        )
        self._actions.append(SendInfer(frame.frame_id, message))

    # -- answers ------------------------------------------------------------------------

    def _local(self, now: float, frame: _Frame, exit_: LocalExit) -> None:
        answer, cancel = self.tracker.local_answer(
            frame.frame_id, now, exit_.exit_index, exit_.classes, exit_.probs
        )
        if answer is not None:
            # The whole answer came from the device: latency less the scaled stage times is
            # the per-input overhead the predictions add (docs/SCHEDULER.md). Waits for a
            # compute slot are queueing behind other frames, which the predictions exclude
            # (a paced input does not wait): they are left out.
            with contextlib.suppress(ValueError):
                self.profiler.observe_answer(
                    now, answer.exit_index, max(0.0, answer.latency_s - frame.waited_s) * 1e3
                )
            self._publish(answer, now)
        # The answer is out before the CANCEL: a failing write can only lose the CANCEL
        # (the server then answers a request nobody awaits), never the answer.
        if cancel is not None and self.has_server:
            # Its _Sent record stays: a RESULT that crossed the CANCEL still measures the link.
            self._actions.append(Send(Cancel(cancel)))
        self._done(frame)

    def implausible(self, result: Result) -> str | None:
        """What makes this RESULT impossible for the model served, or None: such an answer
        is refused like an ERROR for its request, and the frame finishes locally."""
        exits = self.model.exit_stages
        if not 0 <= result.exit_index < len(exits):
            return f"exit {result.exit_index}, but the model has exits 0..{len(exits) - 1}"
        sent = self._sent.get(result.request_id)
        if sent is not None and exits[result.exit_index] < sent.split:
            return f"exit {result.exit_index}, which lies before the split {sent.split}"
        n = self.model.num_classes
        if any(not 0 <= c < n for c in result.classes):
            return f"classes {list(result.classes)}, but the model has classes 0..{n - 1}"
        return None

    def _on_result(self, now: float, result: Result) -> None:
        problem = self.implausible(result)
        if problem is not None:
            self._sent.pop(result.request_id, None)
            self._log(
                logging.WARNING, "server answered request %d with %s", result.request_id, problem
            )
            self._resume(self.tracker.abandon(result.request_id))
            return
        sent = self._sent.pop(result.request_id, None)
        if sent is not None:
            self._measure_result(now, sent, result)
        answer = self.tracker.server_result(
            result.request_id, now, result.exit_index, result.classes, result.probs
        )
        if answer is not None:
            self._publish(answer, now)
            frame = self._frames.get(answer.frame_id)
            if frame is not None:
                if frame.computing:
                    self._actions.append(CancelCompute(answer.frame_id))
                self._done(frame)

    def _measure_result(self, now: float, sent: _Sent, result: Result) -> None:
        elapsed = now - sent.sent_at
        response_bytes = _result_bytes(len(result.classes))
        with contextlib.suppress(ValueError):
            self.profiler.observe_result(
                now,
                sent.split,
                result.exit_index,
                compute_ms=result.compute_ms,
                elapsed_s=elapsed,
                request_bytes=sent.nbytes,
                response_bytes=response_bytes,
            )
        # Both figures are kept so a run can compare them (the summary prints both).
        est = self.profiler.snapshot(now)
        if self.profiler.latency.samples:  # L is still the prior before the first PONG
            self._server_ms_inferred.append(
                ServerTimeEstimator.infer_compute_ms(
                    elapsed,
                    sent.nbytes,
                    response_bytes,
                    self.profiler.propagation_s(),
                    max(est.bandwidth_bps, 1.0),
                )
            )
        if result.compute_ms is not None:
            self._server_ms_reported.append(result.compute_ms)
        # Upload time from the answer time (spinn.runtime.uplink), less the time the server
        # held the request: all of it (held_ms), else its compute alone (a server that does
        # not send held_ms: its queue wait is then unknown). Without either the server time
        # hides in it: PING probes only.
        held_ms = result.compute_ms if result.held_ms is None else result.held_ms
        self._time_upload(
            sent,
            now,
            None if held_ms is None else held_ms / 1e3,
            queue_known=result.held_ms is not None,
        )

    def _time_upload(
        self,
        sent: _Sent,
        now: float,
        server_s: float | None,
        *,
        queue_known: bool = True,
        bound: bool = False,
    ) -> None:
        if not self.profiler.latency.samples:
            return  # L is still the prior: nothing to subtract yet
        # L is the propagation RTT: queueing in front of the uplink is upload time.
        sample = self._upload_timer.answered(
            sent_at=sent.sent_at,
            now=now,
            nbytes=sent.nbytes,
            server_s=server_s,
            latency_s=self.profiler.propagation_s(),
            queue_known=queue_known,
            bound=bound,
        )
        if sample is not None:
            uploads = self._upload_timer.sample_uploads
            before = self.profiler.bandwidth_bps()
            idle = self._upload_timer.sample_idle
            self.profiler.observe_upload(now, sample[0], sample[1], uploads, idle=idle)
            # A suspicion is taken whether or not a train can look now: the one in flight,
            # or the next regular one, will tell.
            suspected = self.profiler.bandwidth.take_suspicion()
            if (
                suspected is not None
                and self.config.link.probe_bytes > 0
                and self._trains.look_now(now, suspected)
            ):
                self._rearm = True
                self._log(
                    logging.DEBUG,
                    "uploads read %.3g bit/s against B %.3g (%d bytes in %.4f s, %d "
                    "uploads): a probe train looks now",
                    suspected,
                    before,
                    sample[0],
                    sample[1],
                    uploads,
                )

    def _on_request_error(self, now: float, error: Error) -> None:
        assert error.request_id is not None
        sent = self._sent.pop(error.request_id, None)
        if sent is not None:
            # A refusal (BUSY, a bad tensor or split) is answered on arrival: it clocks the
            # uplink like a RESULT. A cancelled or expired request is answered when the
            # CANCEL reaches it or a worker picks it up: a bound (spinn.runtime.uplink).
            if error.code in _ANSWERED_ON_ARRIVAL:
                self._time_upload(sent, now, 0.0)
            elif error.code is ErrorCode.CANCELLED:
                self._time_upload(sent, now, 0.0, bound=True)
        fid = self.tracker.abandon(error.request_id)
        if error.code in (ErrorCode.CANCELLED, ErrorCode.BUSY):
            # Expected under load and after CANCEL; the frame finishes locally.
            self._log(
                logging.DEBUG,
                "request %d: %s: %s",
                error.request_id,
                error.code.name,
                error.message,
            )
        else:
            self._log(
                logging.WARNING, "server refused request %d: %s", error.request_id, error.message
            )
        self._resume(fid)

    def _publish(self, answer: Answer, now: float) -> None:
        frame = self._frames.get(answer.frame_id)
        label = frame.label if frame is not None else None
        self.stats.record(answer, now, label)
        self.stats.cancels = self.tracker.cancels
        record: dict[str, Any] = {
            "frame": answer.frame_id,
            "class": answer.classes[0],
            "confidence": round(answer.probs[0], 6),
            "exit": answer.exit_index,
            "where": answer.where.value,
            "latency_ms": round(answer.latency_s * 1e3, 3),
            "bytes_sent": answer.bytes_sent,
            "split": answer.split,
            "thr_conf": answer.thr_conf,
        }
        names = self.model.class_names
        if names and 0 <= answer.classes[0] < len(names):
            record["class_name"] = names[answer.classes[0]]
        if label is not None:
            record["label"] = label
        if frame is not None and frame.origin:
            record["origin"] = frame.origin
        self._actions.append(Publish(record))

    # -- the link -----------------------------------------------------------------------

    @property
    def pack_codec(self) -> str:
        """The codec to pack with now: the device's first that the server accepted (the
        last, which every server takes, while not connected)."""
        return next((c for c in self.codecs if c in self.accepted), self.codecs[-1])

    def recode_to(self, codec: str) -> str | None:
        """The codec a head packed with ``codec`` must be re-coded to for the link as it is
        now (``recode_target``); None: it goes as it is."""
        return recode_target(codec, self.pack_codec, self.accepted)

    @property
    def server_address(self) -> tuple[str, int]:
        """The server to connect to now."""
        assert self.rotation is not None, "a device-only core never connects"
        return self.rotation.current

    def link_up(
        self,
        now: float,
        *,
        server_name: str = "?",
        reports_compute_time: bool = True,
        max_frame_bytes: int | None = None,
        accepted: Sequence[str] | None = None,
        description: Description | None = None,
    ) -> list[Action]:
        """WELCOME arrived: the link is up. ``accepted``: its codecs (packing follows
        them); ``max_frame_bytes``: the server's frame limit where its description states
        one (PROTOCOL.md §5.12); ``description``: the server's description of its model, refused
        (``Fatal``, the link stays down) where it disagrees with the checkpoint."""
        if self._refused(description):
            return self._drain()
        if accepted is not None:
            self.accepted = tuple(accepted)
        host, port = self.server_address
        self._same_failures = ("", 0)
        self._connected_at = now
        self._answers_on_link = 0
        self.connects += 1
        self.profiler.mark_server(now, True)
        self._log(
            logging.INFO,
            "connected to %s:%d (%s), compute time %sreported, packing with %s",
            host,
            port,
            server_name,
            "" if reports_compute_time else "NOT ",
            self.pack_codec,
        )
        if self.config.link.probe_bytes == 0 and not reports_compute_time:
            # Uploads are timed only against a reported server time (runtime.uplink).
            self._hint_once(
                "does not report its compute time and --probe-bytes is 0: the bandwidth "
                "is not measured (its estimate stays at the prior)"
            )
        # A probe PING within the server's frame limit where it states one; --probe-bytes'
        # default fits any server's (64 KiB above its activations).
        padding = self.config.link.probe_bytes
        if max_frame_bytes is not None:
            padding = min(padding, max_frame_bytes - _PING_ENVELOPE)
        self._trains.max_frame_padding = max(1, padding)
        self._ping = _Pinger(next_bare=now, heard_at=now, active=True)
        self._rearm = True
        self._trains.reset(now)
        self._ping_step(now, 0)
        self._release_frames()
        return self._drain()

    def _refused(self, description: Description | None) -> bool:
        """A server whose self-description (PROTOCOL.md §5.12) disagrees with this
        device's checkpoint is refused for good, each difference named: the same model id
        and weights with another input, class list or split shapes would answer wrongly
        without an error. False: no refusal (a version-1 server says nothing more)."""
        if description is None or self.model.facts is None:
            return False
        problems = mismatches(description, self.model.facts)
        if not problems:
            return False
        message = "server describes its model unlike this checkpoint: " + "; ".join(problems)
        self._actions.append(Send(fitted_error(ErrorCode.MODEL_MISMATCH, message)))
        self._give_up(message)
        return True

    def handshake(
        self, now: float, event: Any, *, token: bytes | None = None, nonce: bytes = b""
    ) -> list[Action]:
        """What the server's handshake gave before WELCOME (``link_up`` takes that): a
        message, or the ``ProtocolError`` its bytes raised. A CHALLENGE is answered with
        the device's proof of ``token`` over both nonces (``nonce``: its HELLO's; the
        connection checked the server's proof already, PROTOCOL.md §10). Anything else
        fails the connect (``connect_failed``'s actions, then ``CloseLink``: the adapter
        drops this connection): an ERROR is the server's refusal; an UNAUTHENTICATED
        error, a wrong token or a server that skips authentication, is answered with an
        ERROR first."""
        if isinstance(event, Challenge):
            # The connection refuses a CHALLENGE itself where this end has no token.
            assert token is not None, "a CHALLENGE reached a device without a token"
            self._actions.append(Send(Auth(device_proof(token, nonce, event.nonce))))
            return self._drain()
        if isinstance(event, ProtocolError):
            why = error_text(event)
            mismatch = event.code is ErrorCode.UNAUTHENTICATED
            if mismatch:
                self._actions.append(Send(fitted_error(event.code, why)))
            actions = self.connect_failed(now, why, token_mismatch=mismatch)
        elif isinstance(event, Error):
            why = f"server error {event.code.name}: {event.message}"
            actions = self.connect_failed(now, why, refused=event)
        else:
            why = f"unexpected {type(event).__name__} during the handshake"
            actions = self.connect_failed(now, why)
        return [*actions, CloseLink(why)]

    def bad_data(self, now: float, error: ProtocolError) -> list[Action]:
        """The server's bytes broke the protocol on a link that was up (``error``, from
        the connection): the server is told what was wrong in a fatal ERROR, and the link
        closes (its frames finish locally at ``link_down``)."""
        self._actions.append(Send(fitted_error(error.code, error_text(error))))
        self._close(f"bad data from server: {error}")
        return self._drain()

    def heard(self, now: float) -> None:
        """Bytes arrived from the server (the dead-link check)."""
        self._ping.heard_at = now

    def receive(self, now: float, message: Any, *, wall_time: float = 0.0) -> list[Action]:
        """A message from the server (``wall_time``: the wall clock, for a PONG's
        ``received_at``)."""
        if isinstance(message, Result):
            self._answers_on_link += 1
            self._on_result(now, message)
        elif isinstance(message, Pong):
            self._on_pong(now, message)
        elif isinstance(message, Ping):
            self._actions.append(Send(Pong.reply_to(message, wall_time)))
        elif isinstance(message, Error):
            if message.request_id is not None:
                self._answers_on_link += 1
                self._on_request_error(now, message)
            else:
                if message.code in FATAL_CODES:
                    self._give_up(f"server refused this device: {message.message}")
                self._close(f"server error {message.code.name}: {message.message}")
        elif isinstance(message, Bye):
            self._close(f"server said bye ({message.reason})")
        return self._drain()

    def _close(self, reason: str) -> None:
        self._ping.active = False
        self._actions.append(CloseLink(reason))

    def link_down(self, now: float, reason: str, *, stopping: bool = False) -> list[Action]:
        """The connection ended (``stopping``: the device closed it to finish the run)."""
        self.accepted = ()
        self._ping = _Pinger()
        self._trains.reset(now)
        self.profiler.mark_server(now, False)
        if stopping:
            self._log(logging.INFO, "server link closed: %s", reason)
        else:
            self._log(logging.WARNING, "server link down: %s", reason)
        self._sent.clear()
        self._upload_timer.reset()
        for fid in self.tracker.server_lost():
            self._resume(fid)
        up_s = now - self._connected_at
        assert self.rotation is not None
        host, port = self.server_address
        delay = self.rotation.connection_lost(up_s, self._answers_on_link)
        if delay > 0 and not stopping and self.fatal is None:
            # Dropped at once, unanswered: a crash-looping server is backed off.
            self._log(
                logging.INFO,
                "link to %s:%d lasted %.2f s and answered nothing; next try in %.2f s",
                host,
                port,
                up_s,
                delay,
            )
        self._actions.append(Reconnect(delay))
        return self._drain()

    def connect_failed(
        self,
        now: float,
        why: str,
        *,
        refused: Error | None = None,
        token_mismatch: bool = False,
        untrusted: bool = False,
        not_tls: bool = False,
        closed_in_handshake: bool = False,
        timed_out: bool = False,
    ) -> list[Action]:
        """Connecting to ``server_address`` failed (``why``): retry (``Reconnect``) or give
        up (``Fatal``). What the adapter saw: ``refused``, the server's ERROR in the
        handshake; ``token_mismatch``, the server's proof of the token did not match
        (PROTOCOL.md §10); ``untrusted``, its TLS certificate failed verification;
        ``not_tls``, its reply to the TLS ClientHello was no TLS record;
        ``closed_in_handshake``, it closed the connection before WELCOME; ``timed_out``,
        no WELCOME within ``connect_timeout_s`` (``why`` is then said for it)."""
        if timed_out:
            why = (
                f"no answer within {self.config.link.connect_timeout_s:g} s (connect and handshake)"
            )
        host, port = self.server_address
        assert self.rotation is not None
        if refused is not None and refused.code in FATAL_CODES:
            self._give_up(f"server refused this device: {refused.message}")
            return self._drain()
        if token_mismatch:
            # Only a device with a token gets here (a server that requires one refuses a
            # HELLO without a nonce itself). The server proves the token first: a proof
            # that does not match is far more often a token file out of date on one end
            # than an impostor. Not transient either way.
            self._give_up(
                f"token authentication failed: {why}; the device's and the server's "
                "tokens differ, or the server uses none (compare their --token-file)"
            )
            return self._drain()
        if untrusted:
            # Not a passing fault: this server cannot be trusted until reconfigured.
            self._give_up(f"TLS: server {host}:{port} not trusted: {why}")
            return self._drain()
        # Several servers: the next one is tried at once; backoff only after a whole
        # round failed (spinn.runtime.failover).
        delay = self.rotation.connect_failed()
        self._log(
            logging.INFO,
            "server %s:%d unreachable (%s); next try in %.2f s",
            host,
            port,
            why,
            delay,
        )
        hint = self._misconfiguration(not_tls=not_tls, closed_in_handshake=closed_in_handshake)
        if hint is None:
            self._same_failures = ("", 0)
        else:
            # These read like a restarting server, so the device keeps retrying (and
            # answering locally) but says once what the likely cause is...
            self._hint_once(hint, (host, port))
            # ...and gives up when it keeps failing the same way (unless told not to): the
            # frames already read are still answered.
            last, count = self._same_failures
            count = count + 1 if last == hint else 1
            self._same_failures = (hint, count)
            if not self.config.link.retry_forever and count >= self.config.link.misconfig_tries:
                self._give_up(
                    f"server {host}:{port} {hint} (the handshake failed this way {count} "
                    "times in a row; --retry-forever keeps trying)"
                )
                return self._drain()
        self._actions.append(Reconnect(delay))
        return self._drain()

    def _misconfiguration(self, *, not_tls: bool, closed_in_handshake: bool) -> str | None:
        """The likely cause of a failed connect that a wrong flag on either end explains,
        said of the server; None: nothing points at one."""
        if not_tls:
            # The first bytes back are no TLS record: the server speaks the plain protocol.
            return (
                "does not answer in TLS: is the server using TLS? If not, start the device "
                "without --tls/--tls-ca (or the server with --tls-cert/--tls-key)"
            )
        if not closed_in_handshake:
            return None
        if not self.config.link.use_tls:
            # A TLS server cannot read the plain HELLO as a TLS ClientHello and closes.
            return (
                "closes connections during the handshake: is the server using TLS? If so, "
                "start the device with --tls or --tls-ca"
            )
        if self.config.link.tls_cert is None:
            # A server that requires client certificates ends the TLS session of a device
            # without one right after the handshake; under uvloop that reads as a plain close.
            return (
                "closes TLS connections during the handshake: if it requires client "
                "certificates, give this device one with --tls-cert/--tls-key"
            )
        return None

    def _give_up(self, message: str) -> None:
        """The server refused this device for good: ``Fatal`` (once the frames read are
        answered, the run ends with ``message``)."""
        self.fatal = message
        self._actions.append(Fatal(message))

    def _hint_once(self, hint: str, address: tuple[str, int] | None = None) -> None:
        """Log ``hint`` about the server as a warning, the first time only."""
        if hint not in self._hints_given:
            self._hints_given.add(hint)
            host, port = address or self.server_address
            self._log(logging.WARNING, "server %s:%d %s", host, port, hint)

    # -- timers -------------------------------------------------------------------------

    def next_timer(self, now: float) -> float | None:
        """When ``timer`` should run next (None: only after another event)."""
        at = self.tracker.next_deadline()
        if self._hold_until is not None:
            at = self._hold_until if at is None else min(at, self._hold_until)
        if self._ping.active:
            wake = self._ping.next_bare
            if self._ping.pings and self.config.link.probe_bytes > 0:
                # When the oldest PING's silence begins to bound B; once it has begun, the
                # PINGs' own cadence looks again.
                oldest, _, _ = next(iter(self._ping.pings.values()))
                silent_at = oldest + self.profiler.propagation_s() + self.profiler.silence_floor_s()
                if silent_at > now:
                    wake = min(wake, silent_at)
            if self.config.link.probe_bytes > 0 and self.profiler.latency.samples:
                bw = self.profiler.bandwidth_bps()
                wake = min(wake, self._trains.due_at(now, bw))
            at = wake if at is None else min(at, wake)
        return at

    def timer_delay(self, now: float) -> float | None:
        """How long from ``now`` until ``timer`` should run (``next_timer``; 0: it is
        due; None: only after another event)."""
        at = self.next_timer(now)
        return None if at is None else max(0.0, at - now)

    def timer(self, now: float, queued_bytes: int = 0) -> list[Action]:
        """Time passed: expire late requests, send PINGs and probe trains that are due,
        and judge the link (``queued_bytes``: written and not yet handed to the kernel)."""
        if self._hold_until is not None and now >= self._hold_until:
            self._log(
                logging.WARNING, "server not reachable yet: starting locally, offload resumes later"
            )
            self._release_frames()
        for exp in self.tracker.expire(now):
            self._log(
                logging.INFO, "request %d missed its deadline: finishing locally", exp.request_id
            )
            # The frame resumes before the CANCEL write, so it finishes locally even if the
            # write fails.
            self._resume(exp.frame_id)
            if self.has_server:
                self._actions.append(Send(Cancel(exp.request_id)))
        if self._ping.active:
            self._ping_step(now, queued_bytes)
        return self._drain()

    def _ping_step(self, now: float, queued_bytes: int) -> None:
        cfg = self.config
        p = self._ping
        if p.pings:
            oldest, _, _ = next(iter(p.pings.values()))
            # Bytes queued before the PING delay it, and the padding of probes in flight:
            # allow for them at the live B. Uploads sent after the oldest PING queue behind
            # it and cannot hold it back: counting them too let a device streaming into a
            # black hole grow its allowance faster than time passed, never calling it dead.
            unanswered = queued_bytes + sum(
                s.nbytes for s in self._sent.values() if s.sent_at <= oldest
            )
            allowance = cfg.link.ping_timeout_s + 8.0 * (unanswered + p.padding) / max(
                self.profiler.bandwidth_bps(), 1.0
            )
            # A link that keeps answering is alive, however slow: after a drop, bytes queued
            # at the old rate (uploads, a probe) hold the PINGs back for long.
            if now - oldest > allowance and now - p.heard_at > cfg.link.ping_timeout_s:
                self._close(
                    f"closed by the device: no PONG for {now - oldest:.2f} s (allowed "
                    f"{allowance:.2f} s) and nothing heard for "
                    f"{now - p.heard_at:.2f} s, the server is taken as unreachable"
                )
                return
            if cfg.link.probe_bytes > 0:
                # Without trains B comes from uploads alone, and nothing would lift a
                # silence's bound again.
                self._judge_silence(now)
        if now >= p.next_bare:
            self._ping_seq += 1
            p.sent(self._ping_seq, now, 0, self._unanswered_bytes(queued_bytes))
            queued = uplink_wait_s(
                now,
                ((x.sent_at, x.nbytes) for x in self._sent.values()),
                self.profiler.bandwidth_bps(),
            )
            if not self._trains.in_flight and queued <= max(
                _CLEAN_QUEUE_S, _CLEAN_QUEUE_SHARE * self.profiler.latency_s()
            ):
                # One sent behind a train's padding would time the train, not L; one sent
                # behind uploads still on the link, the uplink's queue: at 0.2 Mbit/s with
                # split 8's uploads L read 243 ms for an 11 ms path, and the device went
                # device-only (no uploads left to show the link rising).
                p.clean.add(self._ping_seq)
            self._actions.append(Send(Ping(self._ping_seq, now, b"")))
            p.bare_sent += 1
            quick = p.bare_sent < _QUICK_PINGS
            p.next_bare = now + (
                min(0.1, cfg.link.ping_interval_s) if quick else cfg.link.ping_interval_s
            )
        # Trains begin once a bare PING came back: the first round trip of a connection is
        # slow (both ends warm up).
        if cfg.link.probe_bytes > 0 and self.profiler.latency.samples and p.train_pending is None:
            bw = self.profiler.bandwidth_bps()
            if self._trains.due(now, bw):
                pings = []
                ahead = self._unanswered_bytes(queued_bytes)
                for padding in self._trains.frames(bw):
                    self._ping_seq += 1
                    ahead += padding
                    p.sent(self._ping_seq, now, padding, ahead)
                    pings.append(Ping(self._ping_seq, now, bytes(padding)))
                p.train_pending = (now, tuple(pings))
                self._actions.append(SendProbeTrain(tuple(pings)))

    def _unanswered_bytes(self, queued_bytes: int) -> int:
        """Bytes on their way to the server now: not yet handed to the kernel, uploads and
        PING padding not answered."""
        return queued_bytes + sum(s.nbytes for s in self._sent.values()) + self._ping.padding

    def _judge_silence(self, now: float) -> None:
        """Unanswered PINGs that waited long behind bytes on the link: a bound on B
        (``OnlineEstimates.observe_silence``). PINGs, not uploads: the server answers a
        PING from its event loop, an upload after its queue and compute."""
        p = self._ping
        waits = [(ahead, now - sent) for sent, _, ahead in p.pings.values()]
        bound = self.profiler.observe_silence(now, waits)
        if bound is not None:
            self._rearm = True  # trains are planned from the new B
            self._log(
                logging.INFO,
                "no PONG for %.2f s: the link is slower than %.3g bit/s",
                max(w for _, w in waits),
                bound,
            )

    def train_written(self, sizes: Sequence[int]) -> None:
        """The framed sizes of the PINGs of ``SendProbeTrain``, in order (a 0, or fewer
        than sent: the link went down, and the train is void)."""
        p = self._ping
        if p.train_pending is None:
            return
        now, pings = p.train_pending
        p.train_pending = None
        for ping, size in zip(pings, sizes, strict=False):
            if size == 0:
                return  # the link went down: link_down resets the trains
            p.train[ping.seq] = size
        if len(sizes) < len(pings):
            return
        total = sum(p.train.values())
        self.probe_bytes_sent += total
        self._trains.sent(now, total, len(p.train))

    def _on_pong(self, now: float, pong: Pong) -> None:
        p = self._ping
        sent = p.answered(pong.seq)
        if sent is not None and pong.seq in p.train:
            self._train_answered(now, pong)
        elif sent is not None and pong.seq in p.clean:
            p.clean.discard(pong.seq)
            self.profiler.observe_ping(now, now - sent[0])

    def _train_answered(self, now: float, pong: Pong) -> None:
        p = self._ping
        p.train_arrivals[pong.seq] = (pong.received_bytes, pong.received_at)
        if len(p.train_arrivals) < len(p.train):
            return
        answers = [p.train_arrivals[seq] for seq in p.train]
        total = sum(p.train.values())
        if all(n is not None for n, _ in answers):
            arrivals = [(int(n or 0), t) for n, t in answers]
        else:
            # A server that does not count its reads: the frames' ends, a chunk coarser.
            arrivals = list(
                zip(itertools.accumulate(p.train.values()), (t for _, t in answers), strict=True)
            )
        p.train.clear()
        p.train_arrivals.clear()
        self._rearm = True  # the next train is planned from this one
        profiler = self.profiler
        try:
            rate, timed = self._trains.train_answered(
                now, profiler.bandwidth, arrivals, total, profiler.config.initial_bandwidth_bps
            )
        except ValueError as exc:  # offsets that go backwards: a server to ignore
            self._log(logging.WARNING, "probe train not timed: %s", exc)
            bw = profiler.bandwidth_bps()
            self._trains.answered(now, bw, timed=True, confirm=False)  # round over
            return
        self._log(
            logging.DEBUG,
            "probe train of %d bytes: %s %.3g bit/s; B %.3g bit/s",
            total,
            "timed at" if timed else "at least",
            rate,
            profiler.bandwidth_bps(),
        )

    # -- reports ------------------------------------------------------------------------

    def status_line(self, now: float, server_up: bool | None) -> str:
        """The live status line (``server_up`` None: device-only)."""
        est = self.profiler.snapshot(now)
        return self.stats.status_line(
            now,
            split=self.decision.split,
            thr_conf=self.decision.thr_conf,
            bandwidth_bps=est.bandwidth_bps,
            latency_s=est.latency_s,
            server_up=server_up,
        )

    def summary(self, now: float) -> dict[str, Any]:
        """The run's summary (one JSON object)."""
        summary = self.stats.summary(now)
        summary["cancels"] = self.tracker.cancels
        summary["deadline_expired"] = self.tracker.expired
        summary["lost_connection_frames"] = self.tracker.lost
        summary["server_connects"] = self.connects
        summary["frames_read"] = self.frames_read
        summary["errors"] = self.errors
        # Frames begun and never answered: 0 unless the run was interrupted.
        summary["unanswered"] = self.tracker.in_flight
        est = self.profiler.snapshot(now)
        summary["estimates"] = {
            "bandwidth_bps": round(est.bandwidth_bps, 1),
            # Uploads and probes timed; 0: bandwidth_bps is still the prior.
            "bandwidth_samples": self.profiler.bandwidth.samples,
            "latency_ms": round(est.latency_s * 1e3, 3),
            # Bytes of bandwidth probe trains written (framed), for their overhead.
            "probe_bytes": self.probe_bytes_sent,
            "probe_trains": self.profiler.bandwidth.train_samples,
            "device_scale": round(est.device_scale, 4),
            "server_scale": round(est.server_scale, 4),
        }
        summary["server_time_ms"] = {
            "reported_mean": _mean(self._server_ms_reported),
            "inferred_mean": _mean(self._server_ms_inferred),
            "reported_median": median_or_none(self._server_ms_reported),
            "inferred_median": median_or_none(self._server_ms_inferred),
            "samples": len(self._server_ms_inferred),
        }
        summary["split"] = self.decision.split
        summary["thr_conf"] = self.decision.thr_conf
        return summary

    # -- internals ----------------------------------------------------------------------

    def _log(self, level: int, msg: str, *args: Any) -> None:
        self._actions.append(Log(level, msg, args))

    def _drain(self) -> list[Action]:
        if self._rearm:
            self._rearm = False
            self._actions.append(ArmTimer())
        out, self._actions = self._actions, []
        return out


def _result_bytes(classes: int) -> int:
    """A RESULT's size on the wire with ``classes`` classes, estimated: its envelope, and
    an index and a probability per class."""
    return 64 + 16 * classes


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
