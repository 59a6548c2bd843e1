"""The SPINN server: serves the part of the network after the split to many devices.

A thin asyncio adapter (STYLE.md habit 4) over ``spinn.runtime.server_core.ServerCore``,
which makes every decision (admission, limits, timeouts, the handshake, BUSY, the queue
and batching, cancellation; docs/ARCHITECTURE.md, "Server core"). This module only moves
bytes between the sockets and the core, feeds it the time from one monotonic clock, runs
the compute the core asks for in a thread pool (``spinn.runtime.batching.run_jobs``) and
carries out the core's actions: send, close (draining or lingering first), log, count.
It also owns the process's life: listening, optional TLS (``tls_cert``/``tls_key``,
client certificates with ``tls_client_ca``), the metrics endpoint, the stats line, and
SIGINT/SIGTERM: stop accepting, finish in-flight requests (bounded by a grace period),
say BYE, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from spinn.runtime.batching import run_jobs
from spinn.runtime.compute import make_executor
from spinn.runtime.config import ServerConfig
from spinn.runtime.prometheus_metrics import ServerMetrics
from spinn.runtime.server_core import (
    FLUSH_S,
    Action,
    Close,
    ComputeResult,
    Log,
    Record,
    RunBatch,
    Send,
    ServerCore,
    StartTls,
)
from spinn.runtime.server_setup import ListenError, frame_limit_for, load_serving
from spinn.runtime.server_streams import READ_CHUNK, Link, linger, replay_into_tls

__all__ = [
    "ListenError",
    "SpinnServer",
    "frame_limit_for",
    "run_server",
]

log = logging.getLogger("spinn.server")


class SpinnServer:
    """Asyncio server over a loaded progressive model."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        serving = self._serving = load_serving(config)
        self.model, self.meta, self.torch_device = serving.model, serving.meta, serving.torch_device
        self.workers, self.dictionaries = serving.workers, serving.dictionaries
        self.max_frame_bytes = serving.max_frame_bytes
        """The frame limit in force: the configured one, or the model's (``frame_limit_for``)."""
        self.connection_config = serving.connection_config
        self.description = serving.description
        """What WELCOME of version 2 says about this server (PROTOCOL.md §5.12)."""
        self._ssl = serving.ssl
        self.core = ServerCore(
            config,
            serving.served_model(),
            workers=self.workers,
            decode=serving.decode,
            connection_config=self.connection_config,
            random_bytes=secrets.token_bytes,
            tls=self._ssl is not None,
        )
        """Every decision of the server (``spinn.runtime.server_core``)."""
        self.stats = self.core.stats
        self.metrics = ServerMetrics(self.stats, lambda: self.core.queued)
        self.metrics_port: int | None = None
        """Bound port of the metrics endpoint, when ``config.operations.metrics_port`` is set."""
        self._clock = time.monotonic
        """The one clock of the server: every ``now`` the core sees comes from it."""
        self._executor: ThreadPoolExecutor | None = None
        """The compute workers, from ``start`` on (a server never started holds no thread)."""
        self._server: asyncio.Server | None = None
        self._links: dict[int, Link] = {}
        self._ids = itertools.count(1)
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at: float | None = None
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()
        """Set after the core's actions while shutting down: ``shutdown_at`` may be earlier."""

    # -- lifecycle ------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start accepting devices."""
        self._executor = make_executor(self.workers, "spinn-server")
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self.config.operations.host,
                self.config.operations.port,
                limit=READ_CHUNK,
                # Plain TCP even with TLS: the core looks at the first bytes (``StartTls``),
                # so that plain bytes on a TLS port are named, and a TLS handshake in
                # progress is a stranger in the handshake pool under its deadline.
            )
        except OSError as exc:
            raise ListenError.at(
                "operations.host/operations.port",
                self.config.operations.host,
                self.config.operations.port,
                exc,
            ) from exc
        if self.config.operations.metrics_port is not None:
            host, port = self.config.operations.metrics_host, self.config.operations.metrics_port
            try:
                self.metrics_port = self.metrics.serve(host, port)
            except OSError as exc:
                self._server.close()
                raise ListenError.at(
                    "operations.metrics_host/operations.metrics_port", host, port, exc
                ) from exc
        self._serving.log_started(log, self.port, self.metrics_port)

    def request_stop(self) -> None:
        """Ask ``serve_forever`` to shut down gracefully (signal-safe from the loop)."""
        self._stopping.set()

    async def serve_forever(self) -> None:
        """Run until ``request_stop``; then shut down gracefully."""
        if self._server is None:
            await self.start()
        stats_task = asyncio.create_task(self._stats_loop())
        try:
            await self._stopping.wait()
        finally:
            stats_task.cancel()
            await self.close()

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), say BYE, close."""
        self._stopping.set()
        self._apply(self.core.stop_accepting(self._clock()))  # INFERs are answered BUSY
        if self._server is not None:
            self._server.close()
        while (at := self.core.shutdown_at()) is not None and at > self._clock():
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), at - self._clock())
        writers = [link.writer for link in self._links.values()]
        self._apply(self.core.shutdown(self._clock()))
        if writers:
            # Python 3.11's wait_closed() below does not wait for connections: the BYEs
            # (and a TLS close_notify) are flushed here, bounded, before the loop ends.
            flushed = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flushed, FLUSH_S)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), FLUSH_S)
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        log.info("final stats %s", json.dumps(self.stats.as_dict(), sort_keys=True))

    async def _stats_loop(self) -> None:
        if self.config.operations.stats_interval_s <= 0:
            return
        self.core.stats_line(self._clock())
        while True:
            await asyncio.sleep(self.config.operations.stats_interval_s)
            log.info("%s", self.core.stats_line(self._clock()))

    # -- the core's actions ---------------------------------------------------------

    def _apply(self, actions: list[Action], own: int | None = None) -> None:
        """Carry out the core's actions in order; ``own``: the connection whose task is
        applying them (it closes itself when its loop ends)."""
        for action in actions:
            if isinstance(action, Send):
                link = self._links.get(action.cid)
                if link is not None and not link.writer.is_closing():
                    # The frame as buffers, the bulk bytes last: no join copy (§4.1).
                    link.writer.writelines(action.data)
            elif isinstance(action, RunBatch):
                # Handed to a worker once this event is handled: the event loop's own time
                # (``note_overhead``) does not include a worker's start.
                asyncio.get_running_loop().call_soon(self._run, action)
            elif isinstance(action, Close):
                link = self._links.get(action.cid)
                if link is None:
                    continue
                first = link.close is None
                link.close = action  # a second Close (an abort) replaces the first
                if first and action.cid != own:
                    link.closer = asyncio.create_task(self._finish(link, own=False))
            elif isinstance(action, StartTls):
                link = self._links.get(action.cid)
                if link is not None:
                    link.upgrade = action  # carried out by the connection's own task
            elif isinstance(action, Log):
                log.log(action.level, action.msg, *action.args, exc_info=action.exc_info)
            elif isinstance(action, Record):
                self.metrics.observe(action.metric, action.value, action.label)
        self._arm_wakeup()
        if self.core.stopping:
            self._progress.set()

    def _run(self, batch: RunBatch) -> None:
        future = asyncio.get_running_loop().run_in_executor(
            self._executor,
            run_jobs,
            self.model,
            self.torch_device,
            self.config.compute.top_k,
            batch,
        )
        future.add_done_callback(functools.partial(self._compute_done, batch))

    def _compute_done(self, batch: RunBatch, future: asyncio.Future[list[ComputeResult]]) -> None:
        t0 = self._clock()
        results: list[ComputeResult] | None = None
        failure: BaseException | None = None
        if future.cancelled():
            failure = asyncio.CancelledError()
        elif (failure := future.exception()) is None:
            results = future.result()
        self._apply(self.core.compute_done(batch, results, failure, t0))
        self.core.note_overhead(self._clock() - t0)

    def _arm_wakeup(self) -> None:
        """A timer for the core's ``next_wakeup`` (a batch that has waited its time)."""
        at = self.core.next_wakeup()
        if at == self._wakeup_at:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        self._wakeup_at = at
        if at is not None:
            delay = max(0.0, at - self._clock())
            self._wakeup = asyncio.get_running_loop().call_later(delay, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup = self._wakeup_at = None
        self._apply(self.core.wakeup(self._clock()))

    # -- one connection ---------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(self._ids)
        link = Link(cid, reader, writer)
        self._links[cid] = link
        core = self.core
        try:
            peer = writer.get_extra_info("peername")
            self._apply(core.connection_made(cid, peer, self._clock()), own=cid)
            while link.close is None:
                timeout = core.wait_s(cid, self._clock())
                try:
                    if link.eof:  # nothing more to read: wait for the answers, or the timer
                        await asyncio.wait_for(link.done.wait(), timeout)
                        return
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), timeout)
                except TimeoutError:
                    self._apply(core.timer_fired(cid, self._clock()), own=cid)
                    continue
                if link.close is not None:
                    break
                link.eof = not data
                self._receive(link, data)
                # A bounded number of frames per turn, then the other connections' turn.
                while link.close is None and core.wants_turn(cid):
                    await asyncio.sleep(0)
                    self._receive(link, None)
                if link.upgrade is not None:
                    await self._start_tls(link, link.upgrade.replay)
                    continue
                if link.close is None and not link.eof and not await self._drained(link):
                    self._apply(core.not_reading(cid, self._clock()), own=cid)
        except (ConnectionError, OSError) as exc:
            self._apply(core.connection_lost(cid, str(exc), self._clock()), own=cid)
        except Exception as exc:  # a bug here costs this connection, not the server
            log.exception("device %d: internal error", cid)
            self._apply(core.connection_lost(cid, f"internal error: {exc}", self._clock()), own=cid)
        finally:
            if link.closer is None and not link.done.is_set():
                await self._finish(link, own=True)

    def _receive(self, link: Link, data: bytes | None) -> None:
        """Feed bytes (or the next turn) to the core; its time counts as overhead."""
        t0 = self._clock()
        if data is None:
            actions = self.core.resume(link.cid, t0)
        else:
            actions = self.core.data_received(link.cid, data, t0)
        self._apply(actions, own=link.cid)
        self.core.note_overhead(self._clock() - t0)

    async def _start_tls(self, link: Link, replay: bytes) -> None:
        """Upgrade ``link`` to TLS, handing ``replay`` (read before) to the TLS layer."""
        assert self._ssl is not None
        link.upgrade = None
        writer = link.writer
        raw = cast(asyncio.Transport, writer.transport)  # a stream socket: it reads too
        plain_protocol = raw.get_protocol()
        raw.pause_reading()  # from here on the TLS layer reads, not the plain reader
        cid, core = link.cid, self.core
        timeout_s = core.tls_timeout_s(cid, self._clock())
        upgrade = asyncio.ensure_future(
            writer.start_tls(self._ssl, ssl_handshake_timeout=timeout_s)
        )
        # Its first step puts the TLS protocol on the paused transport; the bytes read
        # already go into it there, before the transport reads on (FIFO callbacks).
        asyncio.get_running_loop().call_soon(replay_into_tls, raw, plain_protocol, replay)
        try:
            while link.close is None:
                try:
                    await asyncio.wait_for(asyncio.shield(upgrade), core.wait_s(cid, self._clock()))
                except TimeoutError:
                    self._apply(core.timer_fired(cid, self._clock()), own=cid)
                    continue
                self._apply(core.tls_started(cid, self._clock()), own=cid)
                return
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            self._apply(core.tls_failed(cid, str(exc), self._clock()), own=cid)
        finally:
            if not upgrade.done():
                upgrade.cancel()

    async def _finish(self, link: Link, own: bool) -> None:
        """Carry out the core's close of ``link``, then report it closed."""
        if link.close is None:  # the task ended without the core's word (cancelled)
            link.close = Close(link.cid, "closed by the server")
        writer = link.writer
        try:
            # RuntimeError: uvloop on a transport the peer has just reset.
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                if link.close.drain and not await self._drained(link):
                    self._apply(self.core.not_reading(link.cid, self._clock()), own=link.cid)
                if link.close.abort:
                    writer.transport.abort()  # its unsent answers cannot be delivered anyway
                elif link.close.linger_s and own:  # only this task may read the stream
                    await linger(link.reader, writer, link.close.linger_s)
                writer.close()
        finally:
            self._links.pop(link.cid, None)
            link.done.set()
            self._apply(self.core.connection_closed(link.cid, self._clock()))

    async def _drained(self, link: Link) -> bool:
        """Wait until the peer's answers are in the kernel; False if it has not read them
        within the core's ``drain_timeout_s``."""
        try:
            await asyncio.wait_for(link.writer.drain(), self.core.drain_timeout_s)
        except TimeoutError:
            return False
        return True


async def run_server(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code (0 on graceful stop)."""
    server = SpinnServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.serve_forever()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0
