"""The discrete-event core of ``python -m bench.sim``: a virtual clock, links, devices and
servers, all pure (no real clock, no sockets, no threads; every draw from a seeded
``random.Random``), so that one seed gives one history.

What is real and what is modelled (docs/ARCHITECTURE.md, "Simulator"):

* **Real, the runtime's own pure code**: each device is a ``spinn.runtime.device_core.
  DeviceCore`` and each server a ``spinn.runtime.server_core.ServerCore``, the objects the
  asyncio runtime drives: the policy call and plan, ``OnlineEstimates``, request
  deadlines, the race and its CANCEL, fallback, PINGs and probe trains, the dead-link
  check and reconnects on the device; the handshake, admission and BUSY, the queue,
  dynamic batching, CANCEL and deadlines on the server.  ``SimDevice`` and ``SimServer``
  are their adapters on the virtual clock: they feed them ``now`` and events and carry out
  every action they return, as the asyncio adapters do.  Between them travel the
  protocol's own frames (``protocol.Connection`` at the device's end), carried by
  netshape's pure link pieces (trace replay, ``LinkSchedule`` for delay, jitter and loss).
* **Modelled**: compute (the profile's stage times × a scale, with seeded log-normal
  noise, plus per-call overheads; a server batch of n costs ``1 + β(n − 1)`` times one
  sample, β stated), which exit answers an input (one uniform draw per input mapped
  through the profile's exit rates: the same input exits no later at a lower threshold;
  the server's compute sees the same draw), the activations (the profiled packed size of
  the codec the core packs with as payload, no content), the link's serialisation (FIFO
  at the trace's rate when a message starts), and each end's one core where the model
  gives its event loop's CPU time (``DeviceModel.loop_ms``; the server's ``request_ms``):
  the loop and the worker's CPU take it in turn.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Result,
    Role,
    Welcome,
)
from protocol.tensor import DICT_CODEC, IMAGE_CODEC, PackedTensor
from spinn.decisions.offline_profile import Profile
from spinn.decisions.policy import Policy
from spinn.runtime.config import DeviceConfig, LinkConfig, ServerConfig
from spinn.runtime.device_core import (
    Action,
    ArmTimer,
    CancelCompute,
    CloseLink,
    ComputeCall,
    DeviceCore,
    Fatal,
    FrameDone,
    LocalExit,
    ModelShape,
    Publish,
    Reconnect,
    RunHead,
    RunStages,
    Send,
    SendInfer,
    SendProbeTrain,
    StartFrames,
)
from spinn.runtime.server_core import Action as ServerAction
from spinn.runtime.server_core import Close, Outcome, RunBatch, ServedModel, ServerCore, Stopped
from spinn.runtime.server_core import Send as ServerSend
from tools.netshape.config import DirectionConfig
from tools.netshape.model import LinkSchedule
from tools.netshape.trace import Trace

__all__ = [
    "Answer",
    "DeviceModel",
    "EventLoop",
    "Link",
    "LinkSpec",
    "ServerModel",
    "SimDevice",
    "SimServer",
    "exit_for",
    "figures",
    "percentile",
]

# Sizes on the wire (docs/PROTOCOL.md): an INFER's header around its tensor, a RESULT with
# the top-k the device asks for (DeviceCore's own estimate, 64 + 16·k), an ERROR, a
# CANCEL, a bare PING/PONG, the handshake's HELLO and WELCOME (a description).
TOP_K = 5
ERROR_BYTES = 64
HELLO_BYTES = 256
FIN_BYTES = 40
SIM_DICTIONARIES = "0" * 64
"""The zstd dictionaries' hash both ends of the simulation name (``sparse_int8_zdict``
is taken where the device offers it)."""
_CLASS_NAMES = tuple(f"class {i}" for i in range(10))
# What an answer says (its classes are not modelled: the exit is).
_CLASSES = tuple(range(TOP_K))
_PROBS = (0.9, 0.04, 0.03, 0.02, 0.01)


class EventLoop:
    """A virtual clock and a heap of timed callbacks; ties run in scheduling order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def run(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn(*args)
        self.now = max(self.now, until)

    def drain(self, limit: float) -> None:
        """Run until nothing is left to do (or ``limit``): every frame begun gets its answer."""
        self.run(limit)


@dataclass(frozen=True)
class LinkSpec:
    """One device's access link: a fixed rate and delay, or a netshape trace."""

    rate_bps: float | None
    """Rate in bit/s both ways (None: unlimited); ignored with a trace."""
    delay_s: float
    """One-way delay; ignored with a trace."""
    jitter_s: float = 0.0
    loss: float = 0.0
    trace: Trace | None = None
    trace_offset_s: float = 0.0
    """Where in the (looped) trace this link starts: devices of a fleet are out of phase."""
    rate_scale: float = 1.0
    """Multiplies the trace's rates: a device with a better or worse radio."""
    delay_scale: float = 1.0


class Link:
    """One direction of one link: FIFO serialisation at the current rate, then netshape's
    delay/jitter/loss (``LinkSchedule``: in order, a lost segment stalls the direction).
    A message sent during a trace outage is lost (a black hole: the sender is not told)."""

    def __init__(
        self, loop: EventLoop, spec: LinkSpec, rng: random.Random, up: bool, path_s: float = 0.0
    ) -> None:
        self.loop = loop
        self.spec = spec
        self.up = up
        self.path_s = path_s
        self.free_at = 0.0
        self.schedule = LinkSchedule(rng)
        self._configs: dict[tuple[float, float], DirectionConfig] = {}
        self.bytes_sent = 0
        self.dropped = 0
        self._held: tuple[float, float, tuple[float | None, float, float, bool]] | None = None
        """A step trace's conditions and the span of time they hold for."""

    def conditions(self, now: float) -> tuple[float | None, float, float, bool]:
        """(rate bit/s or None, one-way delay, loss, outage) at ``now``."""
        s = self.spec
        if s.trace is None:
            return s.rate_bps, s.delay_s, s.loss, False
        held = self._held
        if held is not None and held[0] <= now < held[1]:
            return held[2]
        trace = s.trace
        t = now + s.trace_offset_s
        st = trace.at(t)
        rate = st.up_rate_bps if self.up else st.down_rate_bps
        if rate is not None:
            rate *= s.rate_scale
        cond = (rate, st.delay_s * s.delay_scale, st.loss, st.outage is not None)
        if trace.interpolation == "step":
            # A step trace holds each row until the next: looked up once per row (a fleet's
            # links send hundreds of thousands of messages).
            begin, end = _step_span(trace, t)
            self._held = (begin - s.trace_offset_s, end - s.trace_offset_s, cond)
        return cond

    def _config(self, delay: float, loss: float) -> DirectionConfig:
        key = (delay, loss)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = DirectionConfig(delay_s=delay, jitter_s=self.spec.jitter_s, loss=loss)
            if len(self._configs) > 4096:
                self._configs.clear()
            self._configs[key] = cfg
        return cfg

    def send(self, nbytes: int, deliver: Callable[..., None], *args: Any) -> float:
        """Queue ``nbytes``; ``deliver(*args)`` runs when they arrive (never, when lost to
        an outage).  Returns when the last byte left the bottleneck."""
        now = self.loop.now
        rate, delay, loss, outage = self.conditions(now)
        start = max(now, self.free_at)
        finish = start + (8.0 * nbytes / rate if rate else 0.0)
        self.free_at = finish
        self.bytes_sent += nbytes
        if outage:
            self.dropped += 1
            return finish
        fate = self.schedule.fate(nbytes, finish, self._config(delay, loss))
        if fate.lost:
            self.free_at = max(self.free_at, fate.resume_at)
        self.loop.at(fate.due + self.path_s, deliver, *args)
        return finish


def _step_span(trace: Trace, t: float) -> tuple[float, float]:
    """The span of replay time around ``t`` over which a step trace's row at ``t`` holds
    (``Trace.at``'s rule: before the first row the first row holds; a looping trace
    repeats with its last row's time as period; without looping the last row holds)."""
    times = [p.time_s for p in trace.points]
    base, local = 0.0, t
    if trace.loop:
        base = (t // trace.duration_s) * trace.duration_s
        local = t - base
    i = bisect.bisect_right(times, local) - 1
    if i < 0:
        return base, base + times[0]
    if i + 1 < len(times):
        return base + times[i], base + times[i + 1]
    return base + times[i], math.inf  # the last row of a trace that does not loop


def exit_for(profile: Profile, u: float, thr_conf: float | None, final_exit: int | None) -> int:
    """The exit that answers an input whose draw is ``u`` in [0, 1): the first exit whose
    cumulative rate at ``thr_conf`` exceeds ``u`` (the profile's exit rates, Profile look-up
    rule), cut at ``final_exit`` (Edgent's truncated network always answers there)."""
    rates = profile.exit_rate(thr_conf)
    acc = 0.0
    e = len(rates) - 1
    for i, r in enumerate(rates):
        acc += r
        if u < acc:
            e = i
            break
    return e if final_exit is None else min(e, final_exit)


@dataclass(frozen=True)
class DeviceModel:
    """Modelled compute of one device (ms are on the simulated device), and the device
    settings the simulation gives its ``DeviceCore`` (``spinn.runtime.device.DeviceConfig``)."""

    stage_scale: float = 1.0
    """Real / profiled stage time (the profile given is already the device's)."""
    head_ms: float = 0.9
    """Per input, outside the stages: preprocessing, the call's hand-off, the answer
    (``H`` of docs/SCHEDULER.md; the defaults here are what ``bench.sim``'s calibration
    measured on the two-core development machine)."""
    step_ms: float = 0.1
    """Per call of the local race (one stage), outside the stage (``c``)."""
    upload_ms: float = 0.35
    """Per upload: packing and the protocol work for it (``K``), inside the head's call."""
    noise: float = 0.1
    """Sigma of the log-normal noise on every call's time."""
    loop_ms: float = 0.0
    """Per frame, the device's event loop (one thread, beside the compute worker, on the
    same core): the frame's arrival, the policy call, the hand-offs to the worker and
    the link, the answer; frames wait for it in turn.  0: the loop and the core are not
    modelled."""
    loop_result_ms: float = 0.0
    """The loop's work on a RESULT or ERROR from the server (read, decode, the estimates,
    the answer) beyond ``loop_ms``."""
    cpu_share: float = 1.0
    """Share of a stage's time the device's core is busy (``1 / slowdown`` for
    ``bench.paper``'s emulated slower device, whose worker sleeps the rest).  With
    ``loop_ms`` the event loop and the worker's calls take the one core in turn."""
    path_s: float = 0.0
    """One-way time every message pays beyond the link's rate and delay (both ends'
    network stacks and event loops, a proxy in the path)."""
    max_in_flight: int = 4
    codec: str | None = None
    """The codec the device prefers (``sparse_int8`` after it, which every server takes;
    None: ``sparse_int8`` alone): the core packs with the first the server took, and the
    profile's size for it is uploaded (its smallest where it has none)."""
    input_codec: str | None = None
    """Profile entry whose size is uploaded at split 0 where the device sends the frame's
    pixels (``uint8_image+zstd``, PROTOCOL.md §6.8) and the server takes them; None: the
    device does not offer them."""
    ping_interval_s: float = 0.5
    probe_bytes: int = LinkConfig.probe_bytes
    """Padding of a probe train's PINGs (``LinkConfig.probe_bytes``; 0: no trains)."""
    ping_timeout_s: float = 1.5
    deadline_factor: float = 3.0
    deadline_margin_s: float = 0.1
    connect_timeout_s: float = 2.0

    def config(self, server: bool, seed: int) -> DeviceConfig:
        """The ``DeviceConfig`` a simulated device's core runs with."""
        return DeviceConfig.from_fields(
            server=("sim", 1) if server else None,
            max_in_flight=self.max_in_flight,
            ping_interval_s=self.ping_interval_s,
            probe_bytes=self.probe_bytes,
            ping_timeout_s=self.ping_timeout_s,
            deadline_factor=self.deadline_factor,
            deadline_margin_s=self.deadline_margin_s,
            connect_timeout_s=self.connect_timeout_s,
            top_k=TOP_K,
            status_interval_s=0.0,
            seed=seed,
        )


@dataclass(frozen=True)
class ServerModel:
    """Modelled compute of one server."""

    scale: float = 1.0
    """Real / profiled server stage time."""
    request_ms: float = 0.3
    """Per batch, outside the stages: unpacking, framing, the worker's hand-off."""
    workers: int = 1
    batch_max: int = 1
    batch_wait_s: float = 0.002
    batch_cost: float = 0.3
    """A batch of n costs (1 + batch_cost·(n − 1)) × one sample's stage time (stated,
    not measured: CPU convolutions of small activations scale sub-linearly)."""
    noise: float = 0.1


@dataclass
class Answer:
    """One answered frame."""

    frame: int
    device: int
    arrived: float
    """When the frame arrived (a paced camera's frame may wait for the window)."""
    answered: float
    where: str
    """'device' (a local exit or the local race), 'server', or 'fallback' (the server was
    unreachable or late), as the core's answer record says."""
    exit: int
    split: int
    """The decision's split (a truncated network may end before it)."""
    thr_conf: float | None
    """None: no early exit."""

    @property
    def latency_ms(self) -> float:
        return 1e3 * (self.answered - self.arrived)


# -- the server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Welcome:
    """The handshake is through: WELCOME arrived at the device."""

    server_name: str
    codecs: tuple[str, ...]
    """The codecs the server took."""


@dataclass(eq=False, slots=True)
class _Peer:
    """One connection to the server, with the device end's protocol state machine (which
    frames the device's messages and reads the server's bytes)."""

    device: SimDevice
    epoch: int
    """The device's connection number: bytes of an older connection are void."""
    client: Connection
    closed: bool = False


def _stand_in(tensor: PackedTensor) -> Any:
    """The server core's ``decode``: the activation's content is not modelled (the input's
    draw stands for it, ``SimDevice.input_exit``)."""
    return tensor


class SimServer:
    """One server: the runtime's own ``ServerCore`` (handshake, admission and BUSY, the
    queue, dynamic batching, CANCEL, deadlines, PONGs with the bytes read) on the virtual
    clock, fed the bytes that reach it over each device's modelled link.  This class is
    its adapter, as ``spinn.runtime.server`` is the asyncio one: it carries out the
    actions (``Send`` through the device's downlink, ``Close``, ``RunBatch`` on modelled
    workers) and calls the core's timers.  The batch's compute is modelled
    (``ServerModel``), its answers come from the inputs' draws."""

    def __init__(
        self,
        loop: EventLoop,
        profile: Profile,
        model: ServerModel,
        seed: int,
        *,
        max_connections: int = 4096,
    ) -> None:
        self.loop = loop
        self.profile = profile
        self.model = model
        self.rng = random.Random(seed)
        config = ServerConfig.from_fields(
            batch_max=model.batch_max,
            batch_wait_ms=1e3 * model.batch_wait_s,
            report_compute=True,
            server_name=f"sim-{seed}",
            # A fleet's devices all connect to it (a deployment sizes these to its fleet).
            max_connections=max_connections,
            max_handshakes=max_connections,
        )
        served = ServedModel(
            profile.model_id,
            profile.weights_sha256,
            tuple(tuple(profile.splits[s].shape) for s in range(profile.num_stages)),
            dictionaries_sha256=SIM_DICTIONARIES,
        )
        self.core = ServerCore(config, served, workers=model.workers, decode=_stand_in)
        self.busy_s = 0.0
        self.batches = 0
        self.batched = 0
        self._peers: dict[int, _Peer] = {}
        self._cids = itertools.count(1)
        self._timers: dict[int, float] = {}
        self._wake_at: float | None = None
        self._first_exit_at = [
            next((e for e, k in enumerate(profile.exit_stages) if k >= s), profile.num_exits - 1)
            for s in range(profile.num_stages + 1)
        ]

    # -- what the devices call (at the time their bytes arrive) --------------------------

    def connect(self, device: SimDevice, epoch: int, hello: Hello) -> int:
        """A device's connection reached the server, its HELLO with it: a new connection."""
        cid = next(self._cids)
        peer = _Peer(device, epoch, Connection(Role.DEVICE))
        self._peers[cid] = peer
        now = self.loop.now
        self._act(self.core.connection_made(cid, (f"device-{device.index}", epoch), now))
        self.receive(cid, peer.client.send(hello))
        return cid

    def frame(self, cid: int, message: Any) -> bytes:
        """The bytes of ``message`` from the device on connection ``cid``, framed by the
        device end's state machine (b"" for a connection gone)."""
        peer = self._peers.get(cid)
        if peer is None or peer.closed:
            return b""
        return peer.client.send(message)

    def receive(self, cid: int, data: bytes) -> None:
        """Bytes from connection ``cid`` arrived (b"": the device closed it)."""
        if cid not in self._peers:
            return
        now = self.loop.now
        self._act(self.core.data_received(cid, data, now))
        while self.core.wants_turn(cid):
            self._act(self.core.resume(cid, now))
        self._arm_peer(cid)

    # -- the core's actions ---------------------------------------------------------------

    def _act(self, actions: list[ServerAction]) -> None:
        for a in actions:
            if isinstance(a, ServerSend):
                self._send(a.cid, b"".join(a.data))
            elif isinstance(a, RunBatch):
                self._run(a)
            elif isinstance(a, Close):
                self._close(a.cid, a.reason)
            # Log, Record: not kept (the counters are the simulation's output).
        at = self.core.next_wakeup()
        if at is not None and (self._wake_at is None or at < self._wake_at):
            self._wake_at = at
            self.loop.at(at, self._on_wakeup, at)

    def _send(self, cid: int, data: bytes) -> None:
        peer = self._peers.get(cid)
        if peer is not None and not peer.closed and peer.device.downlink is not None:
            peer.device.downlink.send(len(data), self._to_device, peer, data)

    def _to_device(self, peer: _Peer, data: bytes) -> None:
        """The server's bytes arrived at the device: its end's state machine reads them."""
        client = peer.client
        client.receive_data(data)
        while True:
            event = client.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            if isinstance(event, Welcome):
                peer.device.deliver(peer.epoch, _Welcome(event.server_name, event.codecs))
            else:
                peer.device.deliver(peer.epoch, event)

    def _close(self, cid: int, reason: str) -> None:
        """The core closes a connection: the device learns of it after the link's delay."""
        peer = self._peers.pop(cid, None)
        self._timers.pop(cid, None)
        if peer is not None:
            peer.closed = True
            if peer.device.downlink is not None:
                peer.device.downlink.send(ERROR_BYTES, peer.device.server_closed, peer.epoch,
                                          reason)  # fmt: skip
        self._act(self.core.connection_closed(cid, self.loop.now))

    def _run(self, batch: RunBatch) -> None:
        """A worker runs the batch: stages [split, stop) of each job, a batch of n costing
        (1 + batch_cost·(n − 1)) × one sample per stage."""
        m = self.model
        now = self.loop.now
        split = batch.split
        stops = []
        for job in batch.jobs:
            peer = self._peers.get(job.cid)
            drawn = peer.device.input_exit(job.request_id) if peer is not None else 0
            exit_ = max(drawn, self._first_exit_at[split])
            stops.append((exit_, self.profile.exit_stages[exit_] + 1))
        stop = max(s for _, s in stops)
        noise = math.exp(self.rng.gauss(0.0, m.noise)) if m.noise else 1.0
        t = m.request_ms / 1e3
        stage_ms = self.profile.stage_server_ms
        for k in range(split, stop):
            n = sum(1 for _, s in stops if s > k)
            t += m.scale * noise * stage_ms[k] * (1 + m.batch_cost * (n - 1)) / 1e3
        self.batches += 1
        self.batched += len(batch.jobs)
        self.busy_s += t
        self.loop.at(now + t, self._batch_done, batch, stops, 1e3 * t)

    def _batch_done(self, batch: RunBatch, stops: list[tuple[int, int]], ms: float) -> None:
        results: list[Outcome | Stopped] = [
            Stopped(stop - batch.split)
            if job.cancelled
            else Outcome(exit_, _CLASSES, _PROBS, ms, stop - batch.split)
            for job, (exit_, stop) in zip(batch.jobs, stops, strict=True)
        ]
        self._act(self.core.compute_done(batch, results, None, self.loop.now))

    # -- timers ----------------------------------------------------------------------------

    def _on_wakeup(self, at: float) -> None:
        if at != self._wake_at:
            return
        self._wake_at = None
        self._act(self.core.wakeup(self.loop.now))

    def _arm_peer(self, cid: int) -> None:
        at = self.core.deadline(cid, self.loop.now)
        if at is not None and cid not in self._timers:
            self._timers[cid] = at
            self.loop.at(at, self._on_peer_timer, cid)

    def _on_peer_timer(self, cid: int) -> None:
        self._timers.pop(cid, None)
        now = self.loop.now
        at = self.core.deadline(cid, now)
        if at is None:
            return
        if at > now:
            self._timers[cid] = at  # the deadline moved on (the peer was active)
            self.loop.at(at, self._on_peer_timer, cid)
            return
        self._act(self.core.timer_fired(cid, now))
        if cid in self._peers:
            self._arm_peer(cid)


# -- the device ---------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Job:
    """One compute call asked for by the core."""

    fid: int
    action: RunHead | RunStages
    pushed_at: float
    queued: bool
    """The worker was busy when it was asked for (``ComputeSlots.acquire`` queued)."""
    skipped: bool = False


class SimDevice:
    """One device: the runtime's own ``DeviceCore`` (policy, online profiler, the plan,
    deadlines, the race and its CANCEL, PINGs and probe trains, the dead-link check,
    reconnects) on the virtual clock.  This class only carries out its actions as
    ``spinn.runtime.device`` does: a window of ``max_in_flight`` frames, one compute
    worker taking the most urgent call first (heads and fallbacks at priority 0, race
    continuations at 1, as ``ComputeSlots``), modelled compute, the modelled link."""

    def __init__(
        self,
        index: int,
        loop: EventLoop,
        profile: Profile,
        policy: Policy,
        model: DeviceModel,
        link: LinkSpec | None,
        server: SimServer | None,
        seed: int,
        *,
        rate_fps: float | None = None,
        start_s: float = 0.0,
        stop_s: float = math.inf,
    ) -> None:
        self.index = index
        self.loop = loop
        self.profile = profile
        self.model = model
        self.server = server if link is not None else None
        self.rng = random.Random(seed)
        has_server = self.server is not None
        shape = ModelShape(profile.num_stages, tuple(profile.exit_stages), len(_CLASS_NAMES))
        # The codecs it packs with, preferred first (the last is what every server takes),
        # and the split-0 pixels where it sends them (spinn.runtime.device_compute).
        codecs = tuple(dict.fromkeys((*((model.codec,) if model.codec else ()), "sparse_int8")))
        self.core = DeviceCore(model.config(has_server, seed), profile=profile, policy=policy,
                               model=shape, codecs=codecs)  # fmt: skip
        offered = (*codecs, IMAGE_CODEC) if model.input_codec is not None else codecs
        # Version 1: a WELCOME without the server's description (the device knows its model).
        self._hello = Hello(1, profile.model_id, profile.weights_sha256, offered,
                            device_name=f"sim-{index}",
                            dictionaries_sha256=SIM_DICTIONARIES if DICT_CODEC in codecs else "")  # fmt: skip
        self.rate_fps = rate_fps
        self.stop_s = stop_s
        self.answers: list[Answer] = []
        self.errors: list[dict[str, Any]] = []
        self.frames_begun = 0
        self.in_flight = 0
        self.uploads = 0
        self.infer_bytes = 0
        """Bytes of the INFERs written (their tensors and headers)."""
        self.backlog: deque[int] = deque()
        self._arrived: dict[int, float] = {}
        self._exit: dict[int, int] = {}
        """Per frame in flight: the exit that answers it under its plan (its input's draw)."""
        self._rid_exit: dict[int, int] = {}
        """Per request on the link: its input's exit."""
        self._jobs: list[tuple[int, int, _Job]] = []
        self._queued: dict[int, _Job] = {}
        self._seq = itertools.count()
        self._busy = False
        self._job_end = 0.0
        self._cum = list(itertools.accumulate(profile.stage_device_ms, initial=0.0))
        self._cum_rates: dict[float | None, list[float]] = {}
        self._packed: dict[tuple[int, str], PackedTensor] = {}
        self._timer_at: float | None = None
        self._cpu_free = 0.0
        """When the device's core is through with the work given it: the event loop's
        (``_on_loop``) and the CPU part of the worker's calls (``_work``)."""
        self._depth = 0
        self._started = False
        self._rearm = False
        self._stopped = False
        self.connected = False
        self._epoch = 0
        self._cid = 0
        self.uplink: Link | None = None
        self.downlink: Link | None = None
        if self.server is not None and link is not None:
            self.uplink = Link(loop, link, random.Random(seed * 7 + 1), True, model.path_s)
            self.downlink = Link(loop, link, random.Random(seed * 7 + 2), False, model.path_s)
        loop.at(start_s, self._run)

    def _run(self) -> None:
        """The run begins as the runtime's (``SpinnDevice.run``): the core says when the
        frames start (``DeviceCore.start``: at once without a server, else at the first
        WELCOME or after the connect timeout), and the link connects."""
        self._act(self.core.start(self.loop.now))
        self._connect()

    def _start(self) -> None:
        """``StartFrames``: an unpaced stream fills the window at once (the runtime's
        source loop takes the next frame whenever a window slot is free); a camera
        delivers at its rate."""
        if self._started:
            return
        self._started = True
        for _ in range(1 if self.rate_fps is not None else self.model.max_in_flight):
            self._next_frame()

    # -- frames -------------------------------------------------------------------------

    def _next_frame(self) -> None:
        """A camera frame (paced) or the next frame of an unpaced stream."""
        now = self.loop.now
        if now >= self.stop_s:
            return
        fid = self.frames_begun
        self.frames_begun += 1
        self._arrived[fid] = now
        if self.rate_fps is None:
            self._begin(fid)
            return
        self.backlog.append(fid)
        self._admit()
        self.loop.at(now + 1.0 / self.rate_fps, self._next_frame)

    def _admit(self) -> None:
        while self.backlog and self.in_flight < self.model.max_in_flight:
            self._begin(self.backlog.popleft())

    def _begin(self, fid: int) -> None:
        self.in_flight += 1
        self._exit[fid] = -1  # drawn once its plan is known (RunHead)
        self._on_loop(self.model.loop_ms, self._frame_arrived, fid)

    def _frame_arrived(self, fid: int) -> None:
        # As the runtime's SpinnDevice: the decision first, then the link looked at.
        decision = self.core.decide(self.loop.now)
        self._act(self.core.frame_arrived(self.loop.now, fid, decision=decision,
                                          link_up=self.connected))  # fmt: skip

    def _on_loop(self, ms: float, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` once the device's event loop did ``ms`` of work for it, after
        the work its core had before (in turn); at once where it has none."""
        if ms <= 0.0 and self._cpu_free <= self.loop.now:
            fn(*args)
            return
        self._cpu_free = max(self.loop.now, self._cpu_free) + ms / 1e3
        self.loop.at(self._cpu_free, fn, *args)

    def input_exit(self, rid: int) -> int:
        """The exit that answers request ``rid``'s input (the modelled server's compute
        sees the same input as the device's)."""
        return self._rid_exit.get(rid, self.profile.num_exits - 1)

    def _exit_for(self, u: float, thr_conf: float | None, final_exit: int | None) -> int:
        """``exit_for`` with the cumulative rates kept per threshold (called per frame)."""
        cum = self._cum_rates.get(thr_conf)
        if cum is None:
            cum = list(itertools.accumulate(self.profile.exit_rate(thr_conf)))
            cum[-1] = math.inf  # the final exit always answers
            self._cum_rates[thr_conf] = cum
        e = bisect.bisect_right(cum, u)
        return e if final_exit is None else min(e, final_exit)

    # -- the core's actions ---------------------------------------------------------------

    def _act(self, actions: list[Action]) -> None:
        """Carry out the core's actions in order (each may return more), then re-arm its
        timer where one asked (``ArmTimer``: ``next_timer`` once, after the last of them)."""
        self._depth += 1
        try:
            self._carry_out(actions)
        finally:
            self._depth -= 1
        if not self._depth and self._rearm:
            self._arm()

    def _carry_out(self, actions: list[Action]) -> None:
        now = self.loop.now
        for a in actions:
            if isinstance(a, RunHead | RunStages):
                self._submit(a)
            elif isinstance(a, Publish):
                self._publish(a.record)
            elif isinstance(a, FrameDone):
                self._frame_done(a.frame_id)
            elif isinstance(a, Send):
                self._send(a.message)
            elif isinstance(a, SendInfer):
                self._send_infer(a)
            elif isinstance(a, CancelCompute):
                job = self._queued.pop(a.frame_id, None)
                if job is not None:
                    job.skipped = True
                    self._act(self.core.compute_skipped(now, a.frame_id))
            elif isinstance(a, SendProbeTrain):
                self.core.train_written([self._send(ping) for ping in a.pings])
            elif isinstance(a, CloseLink):
                self._link_lost(a.reason)
            elif isinstance(a, Reconnect):
                if not self._stopped:
                    self.loop.at(now + a.delay_s, self._connect)
            elif isinstance(a, ArmTimer):
                self._rearm = True
            elif isinstance(a, StartFrames):
                self._start()
            elif isinstance(a, Fatal):
                raise RuntimeError(f"simulated device {self.index}: {a.message}")
            # Log: not kept (the records and counters are the simulation's output).

    def _arm(self) -> None:
        self._rearm = False
        if self._stopped:
            return
        at = self.core.next_timer(self.loop.now)
        if at is not None and (self._timer_at is None or at < self._timer_at):
            self._timer_at = at
            self.loop.at(at, self._on_timer, at)

    def _on_timer(self, at: float) -> None:
        if at != self._timer_at:
            return  # re-armed earlier since
        self._timer_at = None
        if self._over():
            # The run is over: the device stops (its PINGs with it).
            self._stopped = True
            return
        self._rearm = True  # the timer's own work moves the next one
        self._act(self.core.timer(self.loop.now))

    def _over(self) -> bool:
        """No frame will come and none is in flight."""
        return self.loop.now >= self.stop_s and self.in_flight == 0 and not self.backlog

    def _publish(self, record: dict[str, Any]) -> None:
        fid = record["frame"]
        if record["where"] == "error":
            self.errors.append(record)
            return
        self.answers.append(Answer(fid, self.index, self._arrived[fid], self.loop.now,
                                   record["where"], record["exit"], record["split"],
                                   record["thr_conf"]))  # fmt: skip

    def _frame_done(self, fid: int) -> None:
        """The frame's processing ended (the runtime releases its window slot here)."""
        self.in_flight -= 1
        self._arrived.pop(fid, None)
        self._exit.pop(fid, None)
        if self.rate_fps is None:
            self.loop.at(self.loop.now, self._next_frame)
        else:
            self._admit()

    # -- the compute worker ---------------------------------------------------------------

    def _submit(self, action: RunHead | RunStages) -> None:
        now = self.loop.now
        fid = action.frame_id
        if isinstance(action, RunHead):
            plan = action.plan
            thr = plan.rule.thr_conf
            self._exit[fid] = self._exit_for(self.rng.random(), thr, plan.forced_exit)
            priority = 0
        else:
            priority = action.priority
        job = _Job(fid, action, now, self._busy)
        self._queued[fid] = job
        heapq.heappush(self._jobs, (priority, next(self._seq), job))
        if not self._busy:
            self._work()

    def _noise(self) -> float:
        s = self.model.noise
        return math.exp(self.rng.gauss(0.0, s)) if s else 1.0

    def _work(self) -> None:
        """The worker is free: run the most urgent call asked for (``ComputeSlots`` order)."""
        now = self.loop.now
        while self._jobs:
            _, _, job = heapq.heappop(self._jobs)
            if job.skipped:
                continue
            del self._queued[job.fid]
            m = self.model
            a = job.action
            x = self.profile.exit_stages[self._exit[job.fid]]
            if isinstance(a, RunHead):
                split = a.plan.split
                stop = x + 1 if x < split else split
                stages_ms = m.stage_scale * self._noise() * self._cum[stop]
                pack_ms = m.upload_ms if a.pack and stop == split else 0.0
                call_ms = stages_ms + m.head_ms + pack_ms
            else:
                stop = a.stop
                stop = x + 1 if a.start <= x < stop else stop
                stages_ms = m.stage_scale * self._noise() * (self._cum[stop] - self._cum[a.start])
                pack_ms = 0.0
                call_ms = stages_ms + m.step_ms
            self._busy = True
            start = now
            if m.loop_ms > 0.0:
                # One core for the worker and the event loop: the call's CPU part waits
                # for the loop's work before it; the rest (the emulated slower device's
                # sleep) leaves the core to the loop.
                start = max(now, self._cpu_free)
                cpu_ms = call_ms - (1.0 - m.cpu_share) * stages_ms
                self._cpu_free = start + cpu_ms / 1e3
            end = start + call_ms / 1e3
            self._job_end = end
            self.loop.at(end, self._call_done, job, now, stop, stages_ms, pack_ms, x < stop)
            return
        self._busy = False

    def _call_done(self, job: _Job, started: float, stop: int, stages_ms: float,
                   pack_ms: float, exited: bool) -> None:  # fmt: skip
        now = self.loop.now
        core = self.core
        fid = job.fid
        call = ComputeCall(0, started, now, 0.0, job.queued, started - job.pushed_at)
        answer = LocalExit(self._exit[fid], _CLASSES, _PROBS) if exited else None
        a = job.action
        self._busy = False
        if isinstance(a, RunHead):
            packed = None if answer is not None or not a.pack else self._packed_at(a)
            if packed is not None and (codec := core.recode_to(packed.codec)) is not None:
                # Re-coded for a server that took less than the one packed for (as the
                # runtime's DeviceModel.recode): the profiled size of the codec it goes as.
                packed = self._stand_in(a.plan.split, codec, codec)
            actions = core.head_done(now, fid, call, answer=answer, activation=None,
                                     packed=packed, stages_ms=stages_ms, reached=stop,
                                     pack_ms=pack_ms, link_up=self.connected)  # fmt: skip
        else:
            actions = core.stages_done(now, fid, call, answer=answer, activation=None, stop=stop,
                                       stages_ms=stages_ms)  # fmt: skip
        self._act(actions)
        if not self._busy:
            self._work()

    def _packed_at(self, head: RunHead) -> PackedTensor:
        """A stand-in for the activation the head packs: the size the profile measured
        for the codec the core chose (the frame's pixels at split 0 where the server takes
        them), no content (the draw of the input stands for it)."""
        split = head.plan.split
        if head.pixels and split == 0 and self.model.input_codec is not None:
            return self._stand_in(split, IMAGE_CODEC, self.model.input_codec)
        return self._stand_in(split, head.codec, head.codec)

    def _stand_in(self, split: int, codec: str, entry: str) -> PackedTensor:
        """A tensor packed with ``codec`` at ``split`` whose size is the profile's
        ``entry`` (its smallest where it has none)."""
        p = self._packed.get((split, codec))
        if p is None:
            sizes = self.profile.splits[split].bytes
            n = sizes[entry] if entry in sizes else self.profile.packed_bytes(split)
            shape = (1, *self.profile.splits[split].shape)
            p = self._packed[split, codec] = PackedTensor(codec, False, shape, 1.0, 0, bytes(n))
        return p

    # -- the link -------------------------------------------------------------------------

    def _send(self, message: Any) -> int:
        """Write one message on the connection: its framed size, 0 when there is none."""
        if not self.connected or self.uplink is None or self.server is None:
            return 0
        data = self.server.frame(self._cid, message)
        if data:
            self.uplink.send(len(data), self.server.receive, self._cid, data)
        return len(data)

    def _send_infer(self, a: SendInfer) -> None:
        msg = a.message
        if self.connected:
            self._rid_exit[msg.request_id] = self._exit[a.frame_id]
        nbytes = self._send(msg)
        if nbytes:
            self.uploads += 1
            self.infer_bytes += nbytes
        self._act(self.core.infer_written(self.loop.now, a.frame_id, msg.request_id, nbytes, 0.0))

    def deliver(self, epoch: int, message: Any) -> None:
        """A message from the server arrived (void if its connection is gone)."""
        if epoch != self._epoch or self._stopped:
            return
        now = self.loop.now
        if isinstance(message, _Welcome):
            self.connected = True
            self._act(self.core.link_up(now, server_name=message.server_name,
                                        accepted=message.codecs))  # fmt: skip
            return
        # The loop reads the connection's messages in order, a RESULT's work with it.
        ms = self.model.loop_result_ms if isinstance(message, Result | Error) else 0.0
        self._on_loop(ms, self._receive, epoch, message)

    def _receive(self, epoch: int, message: Any) -> None:
        if epoch != self._epoch or self._stopped:
            return
        now = self.loop.now
        self.core.heard(now)
        if isinstance(message, Result | Error) and message.request_id is not None:
            self._rid_exit.pop(message.request_id, None)
        if isinstance(message, Error) and message.request_id is None and not self.connected:
            # Refused in the handshake (BUSY, a mismatch): the connect failed, as the
            # runtime's ServerLink reports it (the close that follows is void, and so is
            # the core's CloseLink: the link never came up).
            self._epoch += 1
            self._hang_up()
            self._act(self.core.handshake(now, message))
            return
        self._act(self.core.receive(now, message, wall_time=now))

    def server_closed(self, epoch: int, reason: str) -> None:
        """The server closed the connection (its close reached the device): read after
        the messages that arrived before it, as a stream is (a RESULT or a refusal just
        ahead of the close is not lost)."""
        if epoch != self._epoch or self._stopped:
            return
        self._on_loop(0.0, self._closed, epoch, reason)

    def _closed(self, epoch: int, reason: str) -> None:
        if epoch != self._epoch or self._stopped:
            return
        self._epoch += 1
        if self.connected:
            self.connected = False
            self._rid_exit.clear()
            self._act(self.core.link_down(self.loop.now, reason))
        else:
            # Closed before WELCOME with no ERROR: what a TLS server does to a plain HELLO.
            now = self.loop.now
            self._act(self.core.connect_failed(now, reason, closed_in_handshake=True))

    def _connect(self) -> None:
        """Connect: HELLO out, WELCOME back (both through the link), or a timeout."""
        if self._stopped or self.connected or self.server is None or self.uplink is None:
            return
        if self._over():
            self._stopped = True
            return
        self._epoch += 1
        epoch = self._epoch
        self._cid = 0
        self.uplink.send(HELLO_BYTES, self._hello_arrived, epoch)
        self.loop.at(self.loop.now + self.model.connect_timeout_s, self._connect_timeout, epoch)

    def _hello_arrived(self, epoch: int) -> None:
        if epoch == self._epoch and self.server is not None:
            self._cid = self.server.connect(self, epoch, self._hello)

    def _hang_up(self) -> None:
        """Close this end of the connection: the server reads its end (when it arrives)."""
        if self._cid and self.server is not None and self.uplink is not None:
            self.uplink.send(FIN_BYTES, self.server.receive, self._cid, b"")
        self._cid = 0

    def _connect_timeout(self, epoch: int) -> None:
        if epoch != self._epoch or self.connected or self._stopped:
            return
        self._epoch += 1  # a late WELCOME is void
        self._hang_up()
        self._act(self.core.connect_failed(self.loop.now, "timed out", timed_out=True))

    def _link_lost(self, reason: str) -> None:
        """The core closed the link (the dead-link check, a server's ERROR or BYE)."""
        if not self.connected:
            return
        self.connected = False
        self._epoch += 1
        self._hang_up()
        self._rid_exit.clear()
        self._act(self.core.link_down(self.loop.now, reason))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank), NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


def figures(answers: Sequence[Answer], t0: float, t1: float) -> dict[str, Any]:
    """Throughput and latency of the answers given in [t0, t1] (the harness's window)."""
    steady = [a for a in answers if t0 <= a.answered <= t1]
    lat = [a.latency_ms for a in steady]
    where: dict[str, int] = {}
    for a in steady:
        where[a.where] = where.get(a.where, 0) + 1
    return {
        "answered": len(steady),
        "fps": len(steady) / max(t1 - t0, 1e-9),
        "latency_ms_mean": sum(lat) / len(lat) if lat else math.nan,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "where": where,
    }
