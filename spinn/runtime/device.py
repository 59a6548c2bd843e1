"""The SPINN device: runs a frame stream across the device and the server.

The asyncio adapter (STYLE.md habit 4) of :class:`~spinn.runtime.device_core.DeviceCore`,
which takes every decision (the policy's ⟨split, thr_conf⟩, the race between the
server and the local stages and its CANCEL, deadlines and ``fallback``, PINGs and probe
trains, dead links and reconnects; DESIGN.md part 7, "execution engine"). Here: frames
are read from the source and paced within the ``max_in_flight`` window; the core's
``RunHead``/``RunStages`` run in compute slots by priority on the executor
(``spinn.runtime.device_compute``: preprocessing, stages, packing); messages move over
``spinn.runtime.device_link``; the clock, the timer and the link's events are fed in,
and the core's actions carried out in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from spinn.decisions.online_estimates import OnlineEstimates
from spinn.decisions.policy import Policy
from spinn.runtime.compute import ComputeSlots, configure_torch, make_executor, plan_workers
from spinn.runtime.config import DeviceConfig
from spinn.runtime.device_compute import DeviceModel
from spinn.runtime.device_core import (
    Action,
    ArmTimer,
    CancelCompute,
    CloseLink,
    ComputeCall,
    DeviceCore,
    DeviceError,
    Fatal,
    FrameDone,
    Log,
    Publish,
    Reconnect,
    RunHead,
    RunStages,
    Send,
    SendInfer,
    SendProbeTrain,
    StartFrames,
)
from spinn.runtime.device_link import ServerLink, clock
from spinn.runtime.device_policy import configured_policy
from spinn.runtime.sources import Frame, FrameSource, Pacer
from spinn.runtime.tracker import RequestTracker

__all__ = ["DeviceError", "SpinnDevice", "run_device"]

log = logging.getLogger("spinn.device")

_now = clock


_T = TypeVar("_T")
Emit = Callable[[dict[str, Any]], None]
Status = Callable[[str], None]


class SpinnDevice:
    """Runs frames through the progressive model, offloading to the server per the policy:
    the asyncio adapter of ``DeviceCore`` (reads frames, runs compute in the executor,
    moves messages, feeds the core ``now`` and events, and carries out its actions)."""

    def __init__(self, config: DeviceConfig, *, policy: Policy | None = None) -> None:
        self.config = config
        workers, threads = plan_workers(config.compute.workers, config.compute.torch_threads)
        configure_torch(threads)
        self.compute = DeviceModel(config)
        """The model and packing the worker threads run."""
        self.model, self.meta, self.profile = (
            self.compute.model,
            self.compute.meta,
            self.compute.profile,
        )
        self.core = DeviceCore(
            config,
            profile=self.profile,
            policy=configured_policy(
                config, self.profile, self.compute.codecs, self.model.num_stages, policy
            ),
            model=self.compute.shape,
            workers=workers,
            server_budget_share=config.policy.server_budget_share,
            codecs=self.compute.codecs,
        )
        self.slots = ComputeSlots(workers)
        self._executor: ThreadPoolExecutor = make_executor(workers, "spinn-device")
        self._io: ThreadPoolExecutor = make_executor(1, "spinn-source")
        self._link = ServerLink(self) if config.link.server is not None else None
        self._queues: dict[int, asyncio.Queue[Action]] = {}
        """Per frame in flight: the compute actions (and its end) its task carries out."""
        self._cancelled: set[int] = set()
        """Frames whose queued computation is not to run (``CancelCompute``)."""
        self._link_busy_ms = 0.0
        """Event-loop time spent on the server link so far (sending, reading and handling
        messages), in ms: measured here, accounted by the core."""
        self._emit: Emit = lambda record: None
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        """The core's ``StartFrames`` (or a stop): frames may be read."""
        self._timer_wake = asyncio.Event()
        self._output_error: OSError | None = None
        """Why the answers could not be written (a closed pipe): the run stops on it."""

    # -- public -----------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy deciding ⟨split, thr_conf⟩ per frame."""
        return self.core.policy

    @property
    def profiler(self) -> OnlineEstimates:
        """The online estimates (B, L, SF, server time) the policy reads."""
        return self.core.profiler

    @property
    def tracker(self) -> RequestTracker:
        """Frames in flight and their requests."""
        return self.core.tracker

    @property
    def frames_read(self) -> int:
        """Frames taken from the source (each gets one answer or one error record)."""
        return self.core.frames_read

    def request_stop(self) -> None:
        """Stop reading the source; frames in flight are still answered."""
        self._stop.set()
        self._started.set()

    async def run(
        self, source: FrameSource, emit: Emit | None = None, status: Status | None = None
    ) -> dict[str, Any]:
        """Answer every frame of ``source``; returns the summary."""
        loop = asyncio.get_running_loop()
        if emit is not None:
            self._emit = emit
        timer_task = asyncio.create_task(self._timer_loop())
        timer_task.add_done_callback(_log_task_failure)
        link_task = asyncio.create_task(self._link.run()) if self._link else None
        if link_task is not None:
            link_task.add_done_callback(_log_task_failure)
        status_task = (
            asyncio.create_task(self._status_loop(status))
            if status is not None and self.config.output.status_interval_s > 0  # 0: final line only
            else None
        )
        window = asyncio.Semaphore(self.config.source.max_in_flight)
        frames: set[asyncio.Task[None]] = set()
        pacer = Pacer(self.config.source.rate_fps)
        limit = self.config.source.limit
        iterator = iter(source) if limit is None else itertools.islice(source, limit)
        source_error: Exception | None = None
        try:
            self.act(self.core.start(_now()))
            await self._started.wait()
            self._check_fatal()
            while not self._stop.is_set():
                await window.acquire()
                if self.core.fatal is not None:
                    # Checked before a frame is read, so none is read and left unanswered.
                    window.release()
                    break
                try:
                    frame = await loop.run_in_executor(self._io, next, iterator, None)
                except Exception as exc:
                    # The frames already read are still answered before the error ends
                    # the run (raised below, after them).
                    source_error = exc
                    window.release()
                    break
                if frame is None:
                    window.release()
                    break
                wait = pacer.wait_s(_now())
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(self._process(frame, window))
                frames.add(task)
                task.add_done_callback(frames.discard)
                task.add_done_callback(_log_frame_task_failure)
            # Frames in flight finish (locally, if the server refused us) before a fatal
            # error ends the run: none is left without its answer.
            while frames:
                await asyncio.gather(*frames)
            if status is not None:
                # The last periodic line can be up to an interval old (frames 0 on a
                # short run): the final one shows what the summary below counts.
                self._show_status(status)
            self._check_fatal()
            if source_error is not None:
                raise source_error
            if self._output_error is not None:
                raise DeviceError(f"cannot write the answers: {self._output_error}")
        finally:
            for t in frames:
                t.cancel()
            if status_task is not None:
                status_task.cancel()
            timer_task.cancel()
            if self._link is not None:
                await self._link.close()
            if link_task is not None:
                link_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link_task
            source.close()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._io.shutdown(wait=False, cancel_futures=True)
        return self.core.summary(_now())

    # -- actions ------------------------------------------------------------------

    def act(self, actions: list[Action]) -> None:
        """Carry out the core's actions, in order."""
        for action in actions:
            if isinstance(action, RunHead | RunStages | FrameDone):
                queue = self._queues.get(action.frame_id)
                if queue is not None:
                    queue.put_nowait(action)
            elif isinstance(action, Publish):
                self._write(action.record)
            elif isinstance(action, Send):
                self._send(action.message)
            elif isinstance(action, SendInfer):
                nbytes = self._send(action.message)
                rid = action.message.request_id
                now = _now()
                self.act(
                    self.core.infer_written(now, action.frame_id, rid, nbytes, self._link_busy_ms)
                )
            elif isinstance(action, SendProbeTrain):
                sizes: list[int] = []
                for ping in action.pings:
                    sizes.append(self._send(ping))
                    if sizes[-1] == 0:
                        break
                self.core.train_written(sizes)
            elif isinstance(action, CancelCompute):
                self._cancelled.add(action.frame_id)
            elif isinstance(action, Log):
                log.log(action.level, action.msg, *action.args, exc_info=action.exc_info)
            elif isinstance(action, ArmTimer):
                self._timer_wake.set()
            elif isinstance(action, StartFrames):
                self._started.set()
            elif isinstance(action, CloseLink):
                if self._link is not None:
                    self._link.close_link(action.reason)
            elif isinstance(action, Fatal):
                self.request_stop()
            elif isinstance(action, Reconnect):
                if self._link is not None:
                    self._link.reconnect_delay = action.delay_s

    def _send(self, message: Any) -> int:
        """Write one message to the server: its framed size, 0 where it did not go."""
        with self.link_work():
            return 0 if self._link is None else self._link.send(message)

    def _link_up(self) -> bool:
        return self._link is not None and self._link.up

    def _queued_bytes(self) -> int:
        return 0 if self._link is None else self._link.queued_bytes()

    # -- frames -------------------------------------------------------------------

    def _check_fatal(self) -> None:
        if self.core.fatal is not None:
            raise DeviceError(self.core.fatal)

    async def _process(self, frame: Frame, window: asyncio.Semaphore) -> None:
        """One frame: hand it to the core, then run what the core asks until it is done."""
        fid = frame.index
        queue: asyncio.Queue[Action] = asyncio.Queue()
        self._queues[fid] = queue
        try:
            try:
                self.act(
                    self.core.frame_arrived(
                        _now(),
                        fid,
                        label=frame.label,
                        origin=frame.origin,
                        error=frame.error or None,
                        link_up=self._link_up(),
                    )
                )
            except Exception as exc:
                self._failed(frame, exc)
            while True:
                action = await queue.get()
                if isinstance(action, FrameDone):
                    return
                try:
                    await self._compute(frame, action)
                except Exception as exc:
                    self._failed(frame, exc)
        finally:
            self._queues.pop(fid, None)
            self._cancelled.discard(fid)
            window.release()

    def _failed(self, frame: Frame, exc: Exception) -> None:
        fid, label, origin = frame.index, frame.label, frame.origin
        self.act(self.core.frame_failed(_now(), fid, exc, label=label, origin=origin))

    async def _compute(self, frame: Frame, action: Action) -> None:
        """Run a ``RunHead`` or ``RunStages`` in a compute slot and report it to the core."""
        loop = asyncio.get_running_loop()
        fid = frame.index
        t0 = _now()
        assert isinstance(action, RunHead | RunStages)
        async with self.slots.slot(action.priority) as queued:
            waited = _now() - t0
            if fid in self._cancelled:
                self.act(self.core.compute_skipped(_now(), fid))
                return
            if isinstance(action, RunHead):
                head, timing = await loop.run_in_executor(
                    self._executor,
                    self._worker_call,
                    self.compute.run_head,
                    frame,
                    action,
                )
            else:
                assert isinstance(action, RunStages)
                step, timing = await loop.run_in_executor(
                    self._executor, self._worker_call, self.compute.run_stages, action
                )
        now = _now()
        call = ComputeCall(*timing, queued=queued, waited_s=waited)
        if not isinstance(action, RunHead):
            answer, activation, stop, stages_ms = step
            self.act(
                self.core.stages_done(
                    now,
                    fid,
                    call,
                    answer=answer,
                    activation=activation,
                    stop=stop,
                    stages_ms=stages_ms,
                )
            )
            return
        answer, activation, packed, stages_ms, reached, pack_ms = head
        if packed is not None and (codec := self.core.recode_to(packed.codec)) is not None:
            with self.link_work():
                packed = self.compute.recode(packed, codec)
        self.act(
            self.core.head_done(
                now,
                fid,
                call,
                answer=answer,
                activation=activation,
                packed=packed,
                stages_ms=stages_ms,
                reached=reached,
                pack_ms=pack_ms,
                link_up=self._link_up(),
                queued_bytes=self._queued_bytes(),
            )
        )

    # -- worker threads ------------------------------------------------------------

    def _worker_call(
        self, fn: Callable[..., _T], *args: Any
    ) -> tuple[_T, tuple[int, float, float, float]]:
        """Worker thread: ``fn(*args)``, and which worker ran it, when, and the link's busy
        time when it ended (``ComputeCall``: the core turns them into busy time)."""
        start = time.perf_counter()
        try:
            result = fn(*args)
        finally:
            end = time.perf_counter()
        return result, (threading.get_ident(), start, end, self._link_busy_ms)

    @contextlib.contextmanager
    def link_work(self) -> Iterator[None]:
        """Times event-loop work on the server link (sending, reading and handling
        messages): part of the device's busy time per upload, not of the compute calls'
        gaps (docs/SCHEDULER.md, "device busy time")."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._link_busy_ms += (time.perf_counter() - t0) * 1e3

    def _write(self, record: dict[str, Any]) -> None:
        """Emit one answer record. A sink that fails (stdout piped into a program that
        exited) stops the run, reported as the sink's failure: it is not the server link's
        (whose handler would otherwise see an OSError) and no later answer could be seen."""
        if self._output_error is not None:
            return
        try:
            self._emit(record)
        except OSError as exc:
            self._output_error = exc
            log.error("cannot write the answers (%s): stopping", exc)
            self.request_stop()

    # -- timers ---------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Calls the core's ``timer`` when it is due (deadlines, PINGs, probe trains)."""
        while True:
            at = self.core.next_timer(_now())
            self._timer_wake.clear()
            timeout = None if at is None else max(0.0, at - _now())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout)
            try:
                self.act(self.core.timer(_now(), self._queued_bytes()))
            except Exception:
                # One failure must not end deadline fallbacks for the rest of the run.
                log.exception("timer failed")

    async def _status_loop(self, status: Status) -> None:
        while True:
            await asyncio.sleep(self.config.output.status_interval_s)
            self._show_status(status)

    def _show_status(self, status: Status) -> None:
        status(self.core.status_line(_now(), None if self._link is None else self._link.up))


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("server link task failed", exc_info=task.exception())


def _log_frame_task_failure(task: asyncio.Task[None]) -> None:
    # _process answers every failure with an error record; anything reaching here is a bug.
    if not task.cancelled() and task.exception() is not None:
        log.error("frame task failed", exc_info=task.exception())


def _stderr_status() -> Status:
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if tty:
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


async def run_device(
    config: DeviceConfig,
    source: FrameSource,
    *,
    out: Any = None,
    policy: Policy | None = None,
    show_status: bool = True,
) -> dict[str, Any]:
    """Run ``source`` through device and server; JSON lines to ``out`` (default stdout).

    Prints the summary as one JSON line on stderr at the end and returns it.
    SIGINT/SIGTERM stop reading the source; frames in flight are still answered.
    """
    sink = out if out is not None else sys.stdout
    device = SpinnDevice(config, policy=policy)

    def emit(record: dict[str, Any]) -> None:
        sink.write(json.dumps(record) + "\n")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, device.request_stop)
    try:
        summary = await device.run(source, emit, _stderr_status() if show_status else None)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        try:
            sink.flush()
        except OSError as exc:
            if device._output_error is None:
                raise DeviceError(f"cannot write the answers: {exc}") from exc
        if device._output_error is not None and sink is sys.stdout:
            # A closed pipe: nothing more can reach it, and the exit's flush must not
            # print a second error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if show_status and sys.stderr.isatty():
        sys.stderr.write("\n")
    sys.stderr.write("summary " + json.dumps(summary) + "\n")
    sys.stderr.flush()
    return summary
