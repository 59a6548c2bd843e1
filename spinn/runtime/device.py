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
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from spinn.decisions.policy import Policy
from spinn.runtime.compute import ComputeSlots, configure_torch, make_executor, plan_workers
from spinn.runtime.config import DeviceConfig
from spinn.runtime.device_compute import DeviceModel, HeadOutput, StagesOutput
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

__all__ = ["DeviceError", "Emit", "SpinnDevice", "Status"]

log = logging.getLogger("spinn.device")

_now = clock


_T = TypeVar("_T")
Emit = Callable[[dict[str, Any]], None]
"""Where the answer records go."""
Status = Callable[[str], None]
"""Where the status lines go."""


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
        self.profile = self.compute.profile
        stages = self.compute.model.num_stages
        self.core = DeviceCore(
            config,
            profile=self.profile,
            policy=configured_policy(config, self.profile, self.compute.codecs, stages, policy),
            model=self.compute.shape,
            workers=workers,
            codecs=self.compute.codecs,
        )
        self.slots = ComputeSlots(workers)
        self._executor: ThreadPoolExecutor = make_executor(workers, "spinn-device")
        self._io: ThreadPoolExecutor = make_executor(1, "spinn-source")
        self._link = ServerLink(self) if config.link.server is not None else None
        self._queues: dict[int, asyncio.Queue[RunHead | RunStages | FrameDone]] = {}
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
        self.output_error: OSError | None = None
        """Why the answers could not be written (a closed pipe): the run stops on it."""

    # -- public -----------------------------------------------------------------

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
        timer_task.add_done_callback(_log_failure("timer"))
        link_task = asyncio.create_task(self._link.run()) if self._link else None
        if link_task is not None:
            link_task.add_done_callback(_log_failure("server link"))
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
                frame = None
                # A fatal error is looked at before a frame is read: none is left unanswered.
                if self.core.fatal is None:
                    try:
                        frame = await loop.run_in_executor(self._io, next, iterator, None)
                    except Exception as exc:
                        # The frames already read are still answered before the error ends
                        # the run (raised below, after them).
                        source_error = exc
                if frame is None:
                    window.release()
                    break
                wait = pacer.wait_s(_now())
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(self._process(frame, window))
                frames.add(task)
                task.add_done_callback(frames.discard)
                task.add_done_callback(_log_failure("frame"))
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
            if self.output_error is not None:
                raise DeviceError(f"cannot write the answers: {self.output_error}")
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
                nbytes, rid = self._send(action.message), action.message.request_id
                busy_ms = self._link_busy_ms
                self.act(self.core.infer_written(_now(), action.frame_id, rid, nbytes, busy_ms))
            elif isinstance(action, SendProbeTrain):
                self.core.train_written([self._send(ping) for ping in action.pings])
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
        queue: asyncio.Queue[RunHead | RunStages | FrameDone] = asyncio.Queue()
        self._queues[fid] = queue
        try:
            try:
                now = _now()
                # The link is looked at once the decision is taken (the policy saw it).
                decision = None if frame.error else self.core.decide(now)
                self.act(
                    self.core.frame_arrived(
                        now,
                        fid,
                        label=frame.label,
                        origin=frame.origin,
                        error=frame.error or None,
                        decision=decision,
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

    async def _compute(self, frame: Frame, action: RunHead | RunStages) -> None:
        """Run a ``RunHead`` or ``RunStages`` in a compute slot and report it to the core."""
        fid = frame.index
        t0 = _now()
        async with self.slots.slot(action.priority) as queued:
            waited = _now() - t0
            if fid in self._cancelled:
                self.act(self.core.compute_skipped(_now(), fid))
                return
            work: Callable[[], HeadOutput | StagesOutput] = (
                functools.partial(self.compute.run_head, frame, action)
                if isinstance(action, RunHead)
                else functools.partial(self.compute.run_stages, action)
            )
            loop = asyncio.get_running_loop()
            out, timing = await loop.run_in_executor(self._executor, self._worker_call, work)
        now = _now()
        call = ComputeCall(*timing, queued=queued, waited_s=waited)
        if isinstance(out, StagesOutput):
            self.act(self.core.stages_done(now, fid, call, **out._asdict()))
            return
        if out.packed is not None and (codec := self.core.recode_to(out.packed.codec)):
            with self.link_work():
                out = out._replace(packed=self.compute.recode(out.packed, codec))
        up, queued_bytes = self._link_up(), self._queued_bytes()
        self.act(
            self.core.head_done(
                now, fid, call, **out._asdict(), link_up=up, queued_bytes=queued_bytes
            )
        )

    # -- worker threads ------------------------------------------------------------

    def _worker_call(self, fn: Callable[[], _T]) -> tuple[_T, tuple[int, float, float, float]]:
        """Worker thread: ``fn()``, and which worker ran it, when, and the link's busy time
        when it ended (``ComputeCall``: the core turns them into busy time)."""
        start = time.perf_counter()
        try:
            result = fn()
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
        if self.output_error is not None:
            return
        try:
            self._emit(record)
        except OSError as exc:
            self.output_error = exc
            log.error("cannot write the answers (%s): stopping", exc)
            self.request_stop()

    # -- timers ---------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Calls the core's ``timer`` when it is due (deadlines, PINGs, probe trains)."""
        while True:
            timeout = self.core.timer_delay(_now())
            self._timer_wake.clear()
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


def _log_failure(what: str) -> Callable[[asyncio.Task[None]], None]:
    """A task's done callback that logs its failure (a frame task's is a bug: ``_process``
    answers every failure with an error record)."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task failed", what, exc_info=task.exception())

    return done
