"""The discrete-event core of ``python -m bench.sim``: a virtual clock, links, devices and
servers, all pure (no real clock, no sockets, no threads; every draw from a seeded
``random.Random``), so that one seed gives one history.

What is real and what is modelled (docs/ARCHITECTURE.md, "Simulator"):

* **Real, the project's own pure code**: each device's policy (``policy.decide(now,
  estimates)``, the scheduler or a baseline), its ``OnlineEstimates`` fed with the
  simulated observations the device runtime would make, the request deadline
  (``spinn.runtime.tracker.request_deadline``) and netshape's link pieces (trace replay,
  ``LinkSchedule`` for delay, jitter and loss).
* **Modelled**: compute (the profile's stage times × a scale, with seeded log-normal
  noise, plus per-call overheads), which exit answers an input (one uniform draw per input
  mapped through the profile's exit rates: the same input exits no later at a lower
  threshold), the link's serialisation (FIFO at the trace's rate when a message starts)
  and the server (FIFO per split, ``workers`` in parallel, dynamic batching with a
  stated batch-time model).

The device's and server's behaviour lives in ``SimDevice``/``SimServer`` methods that
take the current time and emit messages through ``Link``; they mirror
``spinn.runtime.device``/``server`` (window of ``max_in_flight`` frames, one compute
worker with heads before race continuations, local race, CANCEL, deadline fallback,
PINGs with padded probes) but are not those runtime classes, which are asyncio adapters.
Pure device/server cores of the runtime would replace these two classes one for one.
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

from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates, OnlineEstimates, OnlineEstimatesConfig
from spinn.decisions.policy import Policy
from spinn.runtime.tracker import request_deadline
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

# Sizes on the wire (docs/PROTOCOL.md): an INFER's header around its tensor, a RESULT
# (SchedulerConfig.response_bytes), a CANCEL and a bare PING/PONG.
INFER_HEADER_BYTES = 48
RESULT_BYTES = 256
CANCEL_BYTES = 16
PING_BYTES = 32


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

    def conditions(self, now: float) -> tuple[float | None, float, float, bool]:
        """(rate bit/s or None, one-way delay, loss, outage) at ``now``."""
        s = self.spec
        if s.trace is None:
            return s.rate_bps, s.delay_s, s.loss, False
        st = s.trace.at(now + s.trace_offset_s)
        rate = st.up_rate_bps if self.up else st.down_rate_bps
        if rate is not None:
            rate *= s.rate_scale
        return rate, st.delay_s * s.delay_scale, st.loss, st.outage is not None

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
    """Modelled compute of one device (ms are on the simulated device)."""

    stage_scale: float = 1.0
    """Real / profiled stage time (the profile given is already the device's)."""
    head_ms: float = 0.9
    """Per input, outside the stages: preprocessing, the call's hand-off, the answer
    (``H`` of docs/SCHEDULER.md; the defaults here are what ``bench.sim``'s calibration
    measured on the two-core development machine)."""
    step_ms: float = 0.1
    """Per call of the local race (one stage), outside the stage (``c``)."""
    upload_ms: float = 0.35
    """Per upload: packing and the protocol work for it (``K``)."""
    noise: float = 0.1
    """Sigma of the log-normal noise on every call's time."""
    path_s: float = 0.0
    """One-way time every message pays beyond the link's rate and delay (both ends'
    network stacks and event loops, a proxy in the path)."""
    max_in_flight: int = 4
    snapshot_interval_s: float = 0.0
    """Reuse the profiler's snapshot for this long (0: a fresh one per frame, as the
    runtime takes).  A fleet's schedulers re-plan once a second, and a snapshot per frame
    of a thousand devices is most of the simulation's time."""
    codec: str | None = None
    """Codec whose profiled sizes are uploaded (None: the smallest profiled)."""
    input_codec: str | None = None
    """Profile entry whose size is uploaded at split 0, where the runtime sends the frame's
    pixels (``uint8_image+zstd``, PROTOCOL.md §6.8); None: ``codec``'s."""
    ping_interval_s: float = 0.5
    probe_bytes: int = 16384
    ping_timeout_s: float = 1.5
    deadline_factor: float = 3.0
    deadline_margin_s: float = 0.1


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
    answered: float
    where: str
    """'device' (a local exit or the local race), 'server', or 'fallback' (the server was
    unreachable or late)."""
    exit: int
    split: int
    """The decision's split (a truncated network may end before it)."""
    thr_conf: float | None
    """None: no early exit."""

    @property
    def latency_ms(self) -> float:
        return 1e3 * (self.answered - self.arrived)


@dataclass
class _Frame:
    fid: int
    arrived: float
    started: float
    u: float
    split: int = 0
    """Where the device splits: the decision's split, cut at a truncated network's end."""
    decided: int = 0
    """The decision's split, as the policy gave it."""
    last: int = 0
    exit: int = 0
    thr: float | None = None
    """The decision's threshold; None: no early exit."""
    answered: bool = False
    offloaded: bool = False
    awaiting: bool = False
    """Uploaded and neither answered nor given up on."""
    next_stage: int = 0
    job_seq: int = -1
    """Sequence of the frame's live worker job; older entries in the heap are stale."""
    slot_wait_s: float = 0.0
    pushed_at: float = 0.0
    running: bool = False
    rid: int = -1


@dataclass
class _Request:
    device: SimDevice
    rid: int
    fid: int
    split: int
    stop: int
    """Stages [split, stop) end at the answering exit."""
    exit: int
    budget_s: float
    """The INFER's ``deadline_ms``: the server drops the request after this long."""
    deadline: float = math.inf
    cancelled: bool = False
    arrived: float = 0.0


class SimServer:
    """One server: requests grouped per split, ``workers`` running batches."""

    def __init__(self, loop: EventLoop, profile: Profile, model: ServerModel, seed: int) -> None:
        self.loop = loop
        self.profile = profile
        self.model = model
        self.rng = random.Random(seed)
        self.groups: dict[int, deque[_Request]] = {}
        self.free = model.workers
        self.busy_s = 0.0
        self.batches = 0
        self.batched = 0
        self._timer_at: float | None = None
        self.requests: dict[tuple[int, int], _Request] = {}

    def on_infer(self, req: _Request) -> None:
        req.arrived = self.loop.now
        req.deadline = req.arrived + req.budget_s
        self.requests[(id(req.device), req.rid)] = req
        self.groups.setdefault(req.split, deque()).append(req)
        self._dispatch()

    def on_cancel(self, device: SimDevice, rid: int) -> None:
        req = self.requests.pop((id(device), rid), None)
        if req is not None:
            req.cancelled = True

    def on_ping(self, device: SimDevice, seq: int, padding: int) -> None:
        device.downlink.send(PING_BYTES, device.on_pong, seq)

    def _dispatch(self) -> None:
        now = self.loop.now
        m = self.model
        while self.free > 0:
            # Drop what was cancelled or is past the device's deadline before it starts.
            for q in self.groups.values():
                while q and (q[0].cancelled or q[0].deadline < now):
                    self.requests.pop((id(q[0].device), q[0].rid), None)
                    q.popleft()
            ready = [q for q in self.groups.values() if q]
            if not ready:
                return
            q = min(ready, key=lambda g: g[0].arrived)
            if len(q) < m.batch_max and now < q[0].arrived + m.batch_wait_s:
                due = q[0].arrived + m.batch_wait_s
                if self._timer_at is None or due < self._timer_at:
                    self._timer_at = due
                    self.loop.at(due, self._on_timer)
                return
            batch: list[_Request] = []
            while q and len(batch) < m.batch_max:
                r = q.popleft()
                if not r.cancelled and r.deadline >= now:
                    batch.append(r)
                self.requests.pop((id(r.device), r.rid), None)
            if batch:
                self._run(batch)

    def _on_timer(self) -> None:
        self._timer_at = None
        self._dispatch()

    def _run(self, batch: list[_Request]) -> None:
        m = self.model
        self.free -= 1
        self.batches += 1
        self.batched += len(batch)
        split = batch[0].split
        stop = max(r.stop for r in batch)
        noise = math.exp(self.rng.gauss(0.0, m.noise)) if m.noise else 1.0
        t = self.loop.now + m.request_ms / 1e3
        done_at: dict[int, float] = {}
        for k in range(split, stop):
            n = sum(1 for r in batch if r.stop > k)
            t += (
                m.scale
                * noise
                * self.profile.stage_server_ms[k]
                * (1 + m.batch_cost * (n - 1))
                / 1e3
            )
            done_at[k + 1] = t
        for r in batch:
            compute_ms = 1e3 * (done_at[r.stop] - self.loop.now)
            self.loop.at(done_at[r.stop], self._answer, r, compute_ms)
        self.busy_s += t - self.loop.now
        self.loop.at(t, self._worker_free)

    def _answer(self, r: _Request, compute_ms: float) -> None:
        r.device.downlink.send(RESULT_BYTES, r.device.on_result, r.rid, r.exit, compute_ms)

    def _worker_free(self) -> None:
        self.free += 1
        self._dispatch()


class SimDevice:
    """One device: frames through a window of ``max_in_flight``, one compute worker (heads
    and fallbacks at priority 0, race continuations at 1, as ``ComputeSlots``), uploads,
    the local race, CANCEL on a local win, deadlines, PINGs — the behaviour of
    ``spinn.runtime.device`` (DESIGN.md part 7), feeding the same ``OnlineEstimates`` calls."""

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
        profiler_config: OnlineEstimatesConfig | None = None,
    ) -> None:
        self.index = index
        self.loop = loop
        self.profile = profile
        self.policy = policy
        self.model = model
        self.server = server
        self.rng = random.Random(seed)
        self.profiler = OnlineEstimates(profile, profiler_config)
        self.rate_fps = rate_fps
        self.stop_s = stop_s
        self.answers: list[Answer] = []
        self.frames_begun = 0
        self.in_flight = 0
        self.backlog: deque[_Frame] = deque()
        self._jobs: list[tuple[int, int, _Frame, int]] = []
        self._seq = itertools.count()
        self._busy = False
        self._in_work = False
        self._busy_until = -1.0
        self._frames: dict[int, _Frame] = {}
        self._rids = itertools.count(1)
        self._sent: dict[int, tuple[int, int, float]] = {}
        self._last_upload_finish = -math.inf
        self._pings: dict[int, tuple[float, int]] = {}
        self._ping_seq = itertools.count(1)
        self.server_up = server is not None and link is not None
        self.uploads = 0
        self.decisions: list[tuple[float, int, float | None]] = []
        self._snap: tuple[float, Estimates] | None = None
        self._cum_rates: dict[float | None, list[float]] = {}
        self._cum = [0.0]
        for t in profile.stage_device_ms:
            self._cum.append(self._cum[-1] + t)
        if server is not None and link is not None:
            self.uplink = Link(loop, link, random.Random(seed * 7 + 1), True, model.path_s)
            self.downlink = Link(loop, link, random.Random(seed * 7 + 2), False, model.path_s)
            loop.at(start_s, self._ping)
        # An unpaced stream fills the window at once (the runtime's source loop takes the
        # next frame whenever a window slot is free); a camera delivers at its rate.
        for _ in range(1 if rate_fps is not None else model.max_in_flight):
            loop.at(start_s, self._next_frame)

    # -- frames -------------------------------------------------------------------------

    def _next_frame(self) -> None:
        """A camera frame (paced) or the next frame of an unpaced stream."""
        now = self.loop.now
        if now >= self.stop_s:
            return
        f = _Frame(self.frames_begun, now, now, self.rng.random())
        self.frames_begun += 1
        if self.rate_fps is None:
            self._begin(f)
            return
        self.backlog.append(f)
        self._admit()
        self.loop.at(now + 1.0 / self.rate_fps, self._next_frame)

    def _admit(self) -> None:
        while self.backlog and self.in_flight < self.model.max_in_flight:
            self._begin(self.backlog.popleft())

    def _begin(self, f: _Frame) -> None:
        now = self.loop.now
        self.in_flight += 1
        f.started = now
        self._frames[f.fid] = f
        est = self._snapshot(now)
        d = self.policy.decide(now, est)
        if not self.decisions or self.decisions[-1][1:] != (d.split, d.thr_conf):
            self.decisions.append((now, d.split, d.thr_conf))
        last = self.profile.num_stages
        forced = d.final_exit
        if forced is not None and forced < self.profile.num_exits - 1:
            last = self.profile.exit_stages[forced] + 1
        else:
            forced = None
        f.decided = d.split
        f.split = min(max(d.split, 0), last)
        f.last = last
        f.thr = d.thr_conf
        f.exit = self._exit_for(f.u, d.thr_conf, forced)
        self._push(f, 0, 0)

    def _exit_for(self, u: float, thr_conf: float | None, final_exit: int | None) -> int:
        """``exit_for`` with the cumulative rates kept per threshold (called per frame)."""
        cum = self._cum_rates.get(thr_conf)
        if cum is None:
            cum = list(itertools.accumulate(self.profile.exit_rate(thr_conf)))
            cum[-1] = math.inf  # the final exit always answers
            self._cum_rates[thr_conf] = cum
        e = bisect.bisect_right(cum, u)
        return e if final_exit is None else min(e, final_exit)

    def _cum_device(self, stages: int) -> float:
        """``Profile.device_time_ms`` without its argument checks (called per frame)."""
        return self._cum[stages]

    def _snapshot(self, now: float) -> Estimates:
        cached = self._snap
        if cached is None or now - cached[0] >= self.model.snapshot_interval_s:
            cached = self._snap = (now, self.profiler.snapshot(now))
        return cached[1]

    def _finish(self, f: _Frame) -> None:
        """The frame's processing ended (the runtime releases its window slot here)."""
        self._frames.pop(f.fid, None)
        self.in_flight -= 1
        if self.rate_fps is None:
            self.loop.at(self.loop.now, self._next_frame)
        else:
            self._admit()

    def _answer(self, f: _Frame, where: str) -> None:
        f.answered = True
        f.awaiting = False
        self.answers.append(
            Answer(f.fid, self.index, f.arrived, self.loop.now, where, f.exit, f.decided, f.thr)
        )

    # -- the compute worker ---------------------------------------------------------------

    def _push(self, f: _Frame, priority: int, stage: int) -> None:
        seq = next(self._seq)
        f.job_seq = seq
        f.next_stage = stage
        f.pushed_at = self.loop.now
        heapq.heappush(self._jobs, (priority, seq, f, stage))
        if not self._busy:
            self._work()

    def _noise(self) -> float:
        s = self.model.noise
        return math.exp(self.rng.gauss(0.0, s)) if s else 1.0

    def _work(self) -> None:
        """The worker is free: run the most urgent live job (``ComputeSlots`` order)."""
        if self._in_work:
            return  # a frame admitted from inside this loop: the loop picks its job up
        self._in_work = True
        try:
            self._work_next()
        finally:
            self._in_work = False

    def _work_next(self) -> None:
        now = self.loop.now
        while self._jobs:
            _, seq, f, stage = heapq.heappop(self._jobs)
            if seq != f.job_seq:
                continue  # superseded by a re-prioritised entry
            # Queued for the slot (ComputeSlots.acquire): it waited while the previous
            # call ran and was handed the worker straight from it.
            queued = self._busy_until >= now and f.pushed_at < now
            f.slot_wait_s += now - f.pushed_at
            if f.answered:
                self._finish(f)  # the continuation finds its frame answered and returns
                continue
            self._busy = True
            f.running = True
            m = self.model
            if stage == 0:
                x = self.profile.exit_stages[f.exit]
                stop = x + 1 if x < f.split else f.split
                stages_ms = m.stage_scale * self._noise() * self._cum_device(stop)
                upload = stop == f.split and f.split < f.last and self.server_up
                call_ms = stages_ms + m.head_ms + (m.upload_ms if upload else 0.0)
                self.loop.at(now + call_ms / 1e3, self._head_done, f, stop, stages_ms, call_ms,
                             queued, upload)  # fmt: skip
            else:
                k = stage - 1
                stages_ms = m.stage_scale * self._noise() * self.profile.stage_device_ms[k]
                call_ms = stages_ms + m.step_ms
                self.loop.at(now + call_ms / 1e3, self._step_done, f, k, stages_ms, call_ms,
                             queued)  # fmt: skip
            self._busy_until = now + call_ms / 1e3
            return
        self._busy = False

    def _head_done(
        self, f: _Frame, stop: int, stages_ms: float, call_ms: float, queued: bool, upload: bool
    ) -> None:
        now = self.loop.now
        p = self.profiler
        f.running = False
        if stop > 0:
            p.observe_device(now, stop, stages_ms)
        if queued:
            p.observe_call(now, head=True, call_ms=call_ms - (self.model.upload_ms if upload else 0),
                           stages_ms=stages_ms, stages=stop)  # fmt: skip
        x = self.profile.exit_stages[f.exit]
        if x < stop:
            self._answer(f, "device")
            p.observe_answer(now, f.exit, 1e3 * (now - f.started - f.slot_wait_s))
            self._finish(f)
        else:
            if not upload and f.split < f.last:
                f.offloaded = True  # meant for the server, which is unreachable: fallback
            if upload:
                self._upload(f)
                p.observe_upload_work(now, self.model.upload_ms)
                p.observe_offload(now, f.split, 1e3 * (now - f.started - f.slot_wait_s))
            # Stage indices in jobs are 1-based: job stage s+1 runs stage s.
            self._push(f, 1 if f.awaiting else 0, f.split + 1)
        self._work()

    def _step_done(self, f: _Frame, k: int, stages_ms: float, call_ms: float, queued: bool) -> None:
        now = self.loop.now
        p = self.profiler
        f.running = False
        p.observe_device(now, k + 1, stages_ms, start=k)
        if queued:
            p.observe_call(now, head=False, call_ms=call_ms, stages_ms=stages_ms, stages=k + 1,
                           start=k)  # fmt: skip
        if f.answered:
            self._finish(f)
        elif self.profile.exit_stages[f.exit] == k:
            # A race won locally is the device's answer; a frame whose request expired or
            # whose server was unreachable is a fallback (the device stood in).
            where = "fallback" if f.offloaded and not f.awaiting else "device"
            if f.awaiting:
                self._cancel(f)
            self._answer(f, where)
            p.observe_answer(now, f.exit, 1e3 * (now - f.started - f.slot_wait_s))
            self._finish(f)
        else:
            self._push(f, 1 if f.awaiting else 0, k + 2)
        self._work()

    # -- the link -------------------------------------------------------------------------

    def _upload(self, f: _Frame) -> None:
        assert self.server is not None
        now = self.loop.now
        codec = self.model.codec
        if f.split == 0 and self.model.input_codec is not None:
            codec = self.model.input_codec
        nbytes = self.profile.packed_bytes(f.split, codec) + INFER_HEADER_BYTES
        est = self._snapshot(now)
        rid = next(self._rids)
        unanswered = sum(n for n, _, _ in self._sent.values())
        deadline = request_deadline(
            now,
            upload_bytes=unanswered + nbytes,
            download_bytes=RESULT_BYTES,
            bandwidth_bps=max(est.bandwidth_bps, 1.0),
            latency_s=est.latency_s,
            server_time_s=self.profile.server_time_ms(f.split) * est.server_scale / 1e3,
            margin_factor=self.model.deadline_factor,
            margin_s=self.model.deadline_margin_s,
        )
        stop = self.profile.exit_stages[f.exit] + 1
        # deadline_ms: half the budget, counted from receipt (spinn.runtime.device).
        req = _Request(self, rid, f.fid, f.split, stop, f.exit, 0.5 * (deadline - now))
        finish = self.uplink.send(nbytes, self.server.on_infer, req)
        self._sent[rid] = (nbytes, f.fid, now)
        # The upload's own time: from when its bytes could start (after the previous
        # upload's) to its last byte (spinn.runtime.uplink, ACK clocking).
        p = self.profiler
        p.observe_upload(now, nbytes, max(1e-9, finish - max(now, self._last_upload_finish)))
        self._last_upload_finish = finish
        f.offloaded = f.awaiting = True
        f.rid = rid
        self.uploads += 1
        self.loop.at(deadline, self._expire, f, rid)

    def _cancel(self, f: _Frame) -> None:
        assert self.server is not None
        self._sent.pop(f.rid, None)
        self.uplink.send(CANCEL_BYTES, self.server.on_cancel, self, f.rid)

    def on_result(self, rid: int, exit_index: int, compute_ms: float) -> None:
        now = self.loop.now
        sent = self._sent.pop(rid, None)
        if sent is None:
            return  # answered locally, cancelled or expired: the RESULT is late
        _, fid, _ = sent
        f = self._frames.get(fid)
        self.profiler.observe_result(now, f.split if f else 0, exit_index, compute_ms=compute_ms)
        self._mark_up(True)
        if f is None or f.answered or not f.awaiting:
            return
        self._answer(f, "server")
        # Its continuation, queued at priority 1, finds it answered and releases the slot.

    def _expire(self, f: _Frame, rid: int) -> None:
        if f.answered or f.rid != rid or not f.awaiting:
            return
        self._sent.pop(rid, None)
        f.awaiting = False
        # The frame is the device's now: its continuation becomes urgent (priority 0).
        if not f.running and f.next_stage > 0:
            self._push(f, 0, f.next_stage)

    def _mark_up(self, up: bool) -> None:
        if up != self.server_up:
            self.server_up = up
            self.profiler.mark_server(self.loop.now, up)
            self._snap = None  # reachability is never served stale

    def _ping(self) -> None:
        now = self.loop.now
        if now >= self.stop_s and not self._frames:
            return
        assert self.server is not None
        m = self.model
        if self._pings:
            oldest = min(t for t, _ in self._pings.values())
            if now - oldest > m.ping_timeout_s:
                # No PONG: the link is taken down; every request waiting is the device's.
                self._pings.clear()
                self._mark_up(False)
                for f in list(self._frames.values()):
                    if f.awaiting:
                        self._expire(f, f.rid)
        seq = next(self._ping_seq)
        idle = not self._sent
        probe = (
            m.probe_bytes if (seq % 2 == 0 and idle and self.profiler.latency.samples >= 3) else 0
        )
        self._pings[seq] = (now, probe)
        self.uplink.send(PING_BYTES + probe, self.server.on_ping, self, seq, probe)
        self.loop.at(now + m.ping_interval_s, self._ping)

    def on_pong(self, seq: int) -> None:
        sent = self._pings.pop(seq, None)
        if sent is None:
            return
        now = self.loop.now
        self.profiler.observe_ping(now, now - sent[0], sent[1])
        self._mark_up(True)


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
