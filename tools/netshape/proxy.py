"""The asyncio adapter: a TCP proxy that applies the link model of :mod:`tools.netshape.model`.

Each accepted client gets an upstream connection and two pipes, "up" (client -> upstream) and
"down" (upstream -> client). A pipe has two stages joined by a byte-counted queue:

* the read stage reads a chunk, waits for the direction's token bucket (the bottleneck,
  shared by all connections as an access link is) and stamps the chunk with its due time
  (delay, jitter, loss stall: :class:`~tools.netshape.model.LinkSchedule`);
* the write stage waits for the due time and for the outage gate, then writes the chunk
  (sliced if asked), honouring ``limit_bytes``.

Bytes are never dropped or reordered: a "lost" segment only stalls its chunk, as a TCP
retransmission would. docs/NETSHAPE.md describes the model, the outage modes and the stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, TypeVar

from tools.netshape.config import (
    DIRECTIONS,
    OUTAGE_MODES,
    DirectionConfig,
    ShapeConfig,
    coerce_direction_fields,
)
from tools.netshape.model import (
    LinkSchedule,
    OutagePlan,
    OutageSchedule,
    RateMeter,
    TokenBucket,
    slice_sizes,
)
from tools.netshape.trace import Trace, TraceState

__all__ = ["NetShape", "run"]

log = logging.getLogger("netshape")

T = TypeVar("T")


def run(main: Awaitable[T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


class _LimitReached(Exception):
    """A direction passed its limit_bytes: the connection is closed (toxiproxy limit_data)."""


_EOF = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


# uvloop's clock and timers count whole milliseconds, so the proxy keeps its own clock
# (time.monotonic, as plain asyncio does) and a timer that fires early is re-armed for the
# rest; a wake-up within this margin of the deadline counts as on time, so the waits never spin.
_TIMER_SLACK_S = 0.0004


class _Sleeper:
    """Sleep until an absolute time.monotonic() deadline, wakeable early on a settings change."""

    __slots__ = ("_loop", "_fut")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fut: asyncio.Future[bool] | None = None

    async def until(self, deadline: float) -> None:
        """Return at ``deadline`` or at the next :meth:`wake`, whichever is first."""
        loop = self._loop
        while (left := deadline - time.monotonic()) > _TIMER_SLACK_S:
            fut: asyncio.Future[bool] = loop.create_future()
            self._fut = fut
            handle = loop.call_later(left, _resolve, fut, False)
            try:
                woken = await fut
            finally:
                handle.cancel()
                self._fut = None
            if woken:
                return

    def wake(self) -> None:
        """End the current sleep now."""
        if self._fut is not None:
            _resolve(self._fut, True)


class _ChunkQueue:
    """FIFO of (due, chunk) between the two stages of a pipe, with its size in bytes."""

    __slots__ = ("_loop", "_items", "nbytes", "_get_waiter", "_space_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[float, bytes] | None] = deque()
        self.nbytes = 0
        self._get_waiter: asyncio.Future[None] | None = None
        self._space_waiter: asyncio.Future[None] | None = None

    def put(self, item: tuple[float, bytes] | None) -> None:
        self._items.append(item)
        if item is not None:
            self.nbytes += len(item[1])
        if self._get_waiter is not None:
            _wake(self._get_waiter)

    async def get(self) -> tuple[float, bytes] | None:
        while not self._items:
            self._get_waiter = self._loop.create_future()
            try:
                await self._get_waiter
            finally:
                self._get_waiter = None
        return self._items.popleft()

    def release(self, nbytes: int) -> None:
        self.nbytes -= nbytes
        if self._space_waiter is not None:
            _wake(self._space_waiter)

    async def wait_space(self, limit: int) -> None:
        while self.nbytes >= limit:
            self._space_waiter = self._loop.create_future()
            try:
                await self._space_waiter
            finally:
                self._space_waiter = None


class _DirectionState:
    """Live settings and counters of one direction, shared by all connections."""

    def __init__(self, name: str, config: DirectionConfig, now: float) -> None:
        self.name = name
        self.config = config
        self.bucket: TokenBucket | None = None
        self.meter = RateMeter(1.0)
        self.bytes = 0
        self.chunks = 0
        self.stalls = 0
        self.bytes_during_outage = 0
        self.pipes: set[_Pipe] = set()
        self.configure(config, now)

    def configure(self, config: DirectionConfig, now: float) -> None:
        self.config = config
        rate = config.rate_bytes_per_s
        if rate is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(rate, config.effective_burst, now)
        else:
            self.bucket.configure(rate, config.effective_burst, now)
        for pipe in self.pipes:
            pipe.sleeper.wake()

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "chunks": self.chunks,
            "stalls": self.stalls,
            "rate_bps": self.config.rate_bps,
            "measured_bps": self.meter.bits_per_s(now),
            "pipes": len(self.pipes),
            "buffered_bytes": sum(p.queue.nbytes for p in self.pipes),
            "bytes_during_outage": self.bytes_during_outage,
            "config": self.config.to_dict(),
        }


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    # uvloop leaves a closed transport's socket object with fd -1, and setsockopt on it
    # raises ValueError ("negative file descriptor"): an end that is gone needs no RST.
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError, ValueError):
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Nagle would hold small writes back and add delay the proxy did not configure.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of one connection: read stage -> queue -> write stage."""

    def __init__(
        self,
        proxy: NetShape,
        state: _DirectionState,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seed_key: str,
    ) -> None:
        self.proxy = proxy
        self.state = state
        self.reader = reader
        self.writer = writer
        loop = asyncio.get_running_loop()
        self.sleeper = _Sleeper(loop)
        self.due_sleeper = _Sleeper(loop)
        self.queue = _ChunkQueue(loop)
        self.schedule = LinkSchedule(random.Random(f"{seed_key}:link"))
        self.slice_rng = random.Random(f"{seed_key}:slice")
        self.passed = 0

    async def read_stage(self) -> None:
        proxy, state = self.proxy, self.state
        read_size = proxy.config.read_size
        max_buffer = proxy.config.max_buffer_bytes
        # Whether the previous chunk went through the bucket with nothing (outage, full
        # buffer, loss stall) in between: then a read that returns at once found bytes that
        # queued behind it, and the link counts as busy (TokenBucket, "backlogged").
        backlog = False
        while True:
            if not proxy._gate.is_set():
                backlog = False
                await proxy._gate.wait()
            if self.queue.nbytes >= max_buffer:
                backlog = False
                await self.queue.wait_space(max_buffer)
            cfg = state.config
            n = read_size if cfg.rate_bps is None else min(read_size, cfg.effective_burst)
            started = time.monotonic()
            data = await self.reader.read(n)
            if not data:
                self.queue.put(_EOF)
                return
            now = time.monotonic()
            bucket = state.bucket
            backlog = backlog and now - started < _TIMER_SLACK_S
            if bucket is not None:
                ticket = bucket.take(len(data), now, backlogged=backlog)
                backlog = True
                # Re-read the bucket after each wake: a live update may change its rate, or
                # make the direction unlimited (a new bucket then owes this chunk nothing).
                while state.bucket is bucket and (
                    (ready := bucket.ready_at(now, ticket)) - now > _TIMER_SLACK_S
                ):
                    await self.sleeper.until(ready)
                    now = time.monotonic()
            fate = self.schedule.fate(len(data), now, state.config)
            self.queue.put((fate.due, data))
            if fate.lost:
                state.stalls += 1
                backlog = False
                await asyncio.sleep(fate.resume_at - now)

    async def write_stage(self) -> None:
        proxy, state, writer = self.proxy, self.state, self.writer
        while True:
            item = await self.queue.get()
            if item is _EOF:
                if state.config.slow_close_s > 0:
                    await asyncio.sleep(state.config.slow_close_s)
                await proxy._gate.wait()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            due, data = item
            await self.due_sleeper.until(due)
            cfg = state.config
            sizes = slice_sizes(len(data), cfg, self.slice_rng)
            offset = 0
            for index, size in enumerate(sizes):
                if not proxy._gate.is_set():
                    await proxy._gate.wait()
                piece = data[offset : offset + size] if len(sizes) > 1 else data
                offset += size
                limit = cfg.limit_bytes
                if limit is not None and self.passed + len(piece) > limit:
                    piece = piece[: limit - self.passed]
                if piece:
                    writer.write(piece)
                    self.passed += len(piece)
                    state.bytes += len(piece)
                    state.meter.add(len(piece), time.monotonic())
                    if proxy._mode is not None:
                        state.bytes_during_outage += len(piece)
                    await writer.drain()
                if limit is not None and self.passed >= limit:
                    raise _LimitReached
                if cfg.slice_delay_s > 0 and index + 1 < len(sizes):
                    await asyncio.sleep(cfg.slice_delay_s)
            state.chunks += 1
            self.queue.release(len(data))


class _Connection:
    """A proxied client connection and its upstream connection."""

    def __init__(
        self,
        proxy: NetShape,
        cid: int,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.cid = cid
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.pipes: list[_Pipe] = []
        self.finished = False

    def _writers(self) -> list[asyncio.StreamWriter]:
        writers = [self.client_writer]
        if self.upstream_writer is not None:
            writers.append(self.upstream_writer)
        return writers

    def _finish(self) -> None:
        self.finished = True
        for pipe in self.pipes:
            pipe.state.pipes.discard(pipe)
        task = self.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    def reset(self) -> None:
        """Send RST to both ends and drop the connection."""
        if self.finished:
            return
        try:
            for writer in self._writers():
                # One end failing must not leave the other open or the pipes registered.
                with contextlib.suppress(Exception):
                    _set_linger_zero(writer)
                writer.transport.abort()
        finally:
            self._finish()

    def close(self) -> None:
        """Close both ends gracefully (FIN after buffered bytes)."""
        if self.finished:
            return
        try:
            for writer in self._writers():
                writer.close()
        finally:
            self._finish()

    async def run(self) -> None:
        proxy = self.proxy
        try:
            if proxy.config.connect_delay_s > 0:
                await asyncio.sleep(proxy.config.connect_delay_s)
            # In a black hole nothing gets through, not even the upstream handshake.
            await proxy._gate.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    *proxy.upstream, limit=proxy.config.read_size * 2
                )
            except OSError as exc:
                log.info("connection %d: upstream %s: %s", self.cid, proxy.upstream, exc)
                proxy._upstream_failures += 1
                self.reset()
                return
            self.upstream_writer = up_writer
            if self.finished:  # reset or closed while connecting
                up_writer.transport.abort()
                return
            _set_nodelay(self.client_writer)
            _set_nodelay(up_writer)
            seed = proxy.config.seed
            up = _Pipe(
                proxy,
                proxy._dirs["up"],
                self.client_reader,
                up_writer,
                f"netshape:{seed}:{self.cid}:up",
            )
            down = _Pipe(
                proxy,
                proxy._dirs["down"],
                up_reader,
                self.client_writer,
                f"netshape:{seed}:{self.cid}:down",
            )
            self.pipes = [up, down]
            for pipe in self.pipes:
                pipe.state.pipes.add(pipe)
            await self._pump()
        except asyncio.CancelledError:
            if not self.finished:
                self.reset()
        finally:
            if not self.finished:
                self.close()
            proxy._connections.discard(self)

    async def _pump(self) -> None:
        tasks = {
            asyncio.ensure_future(coro)
            for pipe in self.pipes
            for coro in (pipe.read_stage(), pipe.write_stage())
        }
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                # Retrieve every finished stage's exception before acting on the first: two
                # stages can fail in one wake-up (a broken pipe seen by both directions), and
                # an unretrieved one is logged as "Task exception was never retrieved".
                failures = [t.exception() for t in done if not t.cancelled()]
                # A reached byte limit is a deliberate close: it wins over a simultaneous
                # error, whatever order the set of finished stages came in.
                failures.sort(key=lambda exc: not isinstance(exc, _LimitReached))
                for exc in failures:
                    if exc is None:
                        continue
                    if isinstance(exc, _LimitReached):
                        self.close()
                        return
                    if isinstance(exc, OSError):
                        # A reset or broken pipe on one side is passed on as a reset.
                        log.debug("connection %d: %r", self.cid, exc)
                        self.reset()
                        return
                    log.error("connection %d failed", self.cid, exc_info=exc)
                    self.reset()
                    return
            self.close()
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)


class NetShape:
    """A shaping TCP proxy on loopback, used as an async context manager.

    >>> async with NetShape(ShapeConfig(up=DirectionConfig(rate_bps=5e6)),
    ...                     upstream=("127.0.0.1", port)) as proxy:  # doctest: +SKIP
    ...     reader, writer = await asyncio.open_connection(*proxy.address)
    """

    def __init__(
        self,
        config: ShapeConfig | None = None,
        *,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        trace: Trace | None = None,
    ) -> None:
        """Proxy ``listen`` -> ``upstream``; ``trace`` (optional) is replayed from the start."""
        self._config = config if config is not None else ShapeConfig()
        self.upstream = upstream
        self._listen = listen
        self._trace = trace
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._next_cid = 0
        self._dirs: dict[str, _DirectionState] = {}
        self._gate = asyncio.Event()
        self._mode: str | None = None
        self._mode_lock = asyncio.Lock()
        self._plan = OutagePlan()
        self._schedule = OutageSchedule(self._config.outages, self._config.seed)
        self._outage_counts = dict.fromkeys(OUTAGE_MODES, 0)
        self._outage_history: deque[dict[str, Any]] = deque(maxlen=100)
        self._start = 0.0
        self._tick_task: asyncio.Task[None] | None = None
        self._last_trace: TraceState | None = None
        self._accepted = 0
        self._reset_on_accept = 0
        self._upstream_failures = 0
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def _now(self) -> float:
        # One clock for everything, the pipes' token buckets included (see _TIMER_SLACK_S).
        return time.monotonic()

    async def start(self) -> NetShape:
        """Bind the listener and start the schedule/trace loop."""
        if self._started:
            raise RuntimeError("NetShape already started")
        self._started = True
        now = self._now()
        self._start = now
        self._gate.set()
        self._dirs = {
            name: _DirectionState(name, self._config.direction(name), now) for name in DIRECTIONS
        }
        await self._open_listener()
        if self._trace is not None:
            self._apply_trace(self._trace.at(0.0))
        await self._sync_outage()
        self._tick_task = asyncio.create_task(self._tick_loop())
        log.info("listening on %s:%d -> %s:%d", *self.address, *self.upstream)
        return self

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        self._close_listener()
        tasks = [c.task for c in self._connections if c.task is not None]
        for conn in list(self._connections):
            conn.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._gate.set()

    async def __aenter__(self) -> NetShape:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """Run until cancelled."""
        await asyncio.Event().wait()

    # -- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port clients connect to."""
        if self._port is None:
            raise RuntimeError("NetShape is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to."""
        return self._listen[0], self.port

    @property
    def config(self) -> ShapeConfig:
        """The configuration now in force (including live updates)."""
        if not self._dirs:
            return self._config
        return dataclasses.replace(
            self._config, up=self._dirs["up"].config, down=self._dirs["down"].config
        )

    @property
    def started_at(self) -> float:
        """The clock's value when the proxy started (schedules and traces count from it)."""
        return self._start

    @property
    def outage_mode(self) -> str | None:
        """The outage in force, or None."""
        return self._mode

    # -- listener --------------------------------------------------------------------------

    async def _open_listener(self) -> None:
        host, port = self._listen
        if self._port is not None:
            port = self._port
        # The stream buffer pauses reading at 2 * limit: keep a whole read's worth in it.
        self._server = await asyncio.start_server(
            self._on_client, host, port, reuse_address=True, limit=self._config.read_size * 2
        )
        sockets = self._server.sockets
        self._port = sockets[0].getsockname()[1]

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        conn = _Connection(self, self._next_cid, reader, writer)
        self._next_cid += 1
        if self._mode == "reset":
            self._reset_on_accept += 1
            conn.reset()
            return
        if self._mode == "refuse":  # accepted just before the listener closed
            conn.close()
            return
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(conn.run())

    # -- live control ----------------------------------------------------------------------

    def update(self, direction: str = "both", **fields: Any) -> ShapeConfig:
        """Change direction settings live, without losing or reordering bytes.

        ``fields`` are DirectionConfig fields, as values in base units (bit/s, seconds,
        bytes) or strings with units ("5mbit", "40ms"). Raises ValueError naming a bad field.
        """
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction={direction!r}: must be 'up', 'down' or 'both'")
        values = coerce_direction_fields(fields)
        names = DIRECTIONS if direction == "both" else (direction,)
        if not self._dirs:
            up, down = self._config.up, self._config.down
            if "up" in names:
                up = dataclasses.replace(up, **values)
            if "down" in names:
                down = dataclasses.replace(down, **values)
            self._config = dataclasses.replace(self._config, up=up, down=down)
            return self._config
        new = {n: dataclasses.replace(self._dirs[n].config, **values) for n in names}
        now = self._now()
        for name, cfg in new.items():
            self._dirs[name].configure(cfg, now)
        return self.config

    async def outage(self, mode: str = "blackhole", duration_s: float | None = None) -> None:
        """Start an outage now, until :meth:`restore` or for ``duration_s`` seconds.

        ``blackhole``: connections stay open, nothing passes (held bytes flow on restore);
        ``reset``: RST to both ends of every connection, new ones are reset on accept;
        ``refuse``: the listener closes (connections are refused), existing ones are closed.
        """
        if mode not in OUTAGE_MODES:
            raise ValueError(f"outage mode {mode!r}: must be one of {', '.join(OUTAGE_MODES)}")
        if duration_s is not None and not duration_s > 0:
            raise ValueError(f"duration_s={duration_s!r}: must be None or > 0")
        self._plan.trigger(mode, self._now(), duration_s)
        await self._sync_outage()

    async def restore(self) -> None:
        """End the current outage (manual, scheduled or from the trace)."""
        self._plan.restore(self._auto_outage(self._now()))
        await self._sync_outage()

    def stats(self) -> dict[str, Any]:
        """Counters per direction, connections and outages, as plain JSON data."""
        now = self._now()
        return {
            "elapsed_s": now - self._start if self._started else 0.0,
            "listen": list(self.address) if self._port is not None else None,
            "upstream": list(self.upstream),
            "connections": {
                "active": len(self._connections),
                "accepted": self._accepted,
                "reset_on_accept": self._reset_on_accept,
                "upstream_failures": self._upstream_failures,
            },
            "outage": {
                "mode": self._mode,
                "count": dict(self._outage_counts),
                "history": list(self._outage_history),
            },
            "up": self._dirs["up"].snapshot(now) if self._dirs else None,
            "down": self._dirs["down"].snapshot(now) if self._dirs else None,
        }

    # -- schedule, trace and outage state --------------------------------------------------

    def _auto_outage(self, now: float) -> tuple[tuple[object, ...], str] | None:
        elapsed = now - self._start
        scheduled = self._schedule.active(elapsed)
        if scheduled is not None:
            return scheduled[0], scheduled[1]
        if self._trace is not None:
            return self._trace.at(elapsed).outage
        return None

    def _apply_trace(self, state: TraceState) -> None:
        last = self._last_trace
        if last is not None and dataclasses.replace(last, outage=None) == dataclasses.replace(
            state, outage=None
        ):
            return
        self._last_trace = state
        now = self._now()
        for name, rate in (("up", state.up_rate_bps), ("down", state.down_rate_bps)):
            cfg = dataclasses.replace(
                self._dirs[name].config, rate_bps=rate, delay_s=state.delay_s, loss=state.loss
            )
            self._dirs[name].configure(cfg, now)

    async def _sync_outage(self) -> None:
        async with self._mode_lock:
            now = self._now()
            desired = self._plan.desired(now, self._auto_outage(now))
            if desired == self._mode:
                return
            old = self._mode
            if old == "blackhole":
                self._gate.set()
            elif old == "refuse":
                await self._open_listener()
            self._mode = desired
            self._outage_history.append({"elapsed_s": self._now() - self._start, "mode": desired})
            if desired is None:
                log.info("outage %s ended", old)
                return
            log.info("outage %s started", desired)
            self._outage_counts[desired] += 1
            if desired == "blackhole":
                self._gate.clear()
            elif desired == "reset":
                for conn in list(self._connections):
                    conn.reset()
            elif desired == "refuse":
                self._close_listener()
                for conn in list(self._connections):
                    conn.close()

    async def _tick_loop(self) -> None:
        tick = self._config.tick_s
        while True:
            await asyncio.sleep(tick)
            try:
                if self._trace is not None:
                    self._apply_trace(self._trace.at(self._now() - self._start))
                await self._sync_outage()
            except OSError as exc:  # e.g. the port was taken while refusing
                log.error("cannot apply outage state: %s", exc)
