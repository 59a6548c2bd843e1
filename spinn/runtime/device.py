"""The SPINN device: runs a frame stream across the device and the server.

A thin asyncio adapter (STYLE.md habit 4) over the pure parts: the
:class:`~spinn.runtime.tracker.RequestTracker` (one answer per frame, the
server/local race, deadlines), the :class:`~spinn.estimators.OnlineProfiler`
(B, L, SF, server time) and a :class:`~spinn.policy.Policy` (split, thr_conf).

Per frame (DESIGN.md part 7, "execution engine"):

1. ``policy.decide`` gives ⟨split, thr_conf⟩ from the live estimates.
2. The device runs stages ``[0, split)`` checking each exit; a confident exit
   answers locally.
3. Otherwise the activation is packed (codec, zstd decided by the packer from
   the live bandwidth) and sent as INFER with a deadline from the estimates. At
   split 0 that is the frame itself: its uint8 pixels (``uint8_image``,
   PROTOCOL.md §6.8) where the server accepts them, whatever the policy.
4. The device keeps computing ``[split, S)`` locally while the server works.
   The first answer wins; a local win CANCELs the request.  Stages of new
   frames take priority over continuations (uploads overlap compute).
5. A RESULT later than its deadline, an ERROR for the request or a lost
   connection hands the frame to the local side: answered as ``fallback``.

The link reconnects with exponential backoff and jitter and resumes offloading.
It may run over TLS (``tls_ca``, optional client certificate) and prove a shared token
in the handshake (``token_file``, PROTOCOL.md §10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Auth,
    Bye,
    Challenge,
    Connection,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    ProtocolError,
    Role,
    Welcome,
)
from protocol.auth import NONCE_SIZE, device_proof
from protocol.dictionaries import DictionaryError, ZstdDictionaries
from protocol.messages import MAX_STRING
from protocol.packing import (
    DICT_CODEC,
    IMAGE_CODEC,
    LOSSY_CODEC,
    PackedTensor,
    as_sparse_int8,
    pack,
    unpack,
)
from spinn.description import mismatches
from spinn.estimators import OnlineProfiler
from spinn.policy import FixedPolicy, Policy
from spinn.profile import Profile
from spinn.progressive import InputSpec
from spinn.runtime.compute import (
    ComputeSlots,
    configure_torch,
    make_executor,
    plan_workers,
    slow_down,
)
from spinn.runtime.config import ZSTD_MODES, DeviceConfig
from spinn.runtime.device_core import (
    FATAL_CODES,
    Action,
    ArmTimer,
    CancelCompute,
    CloseLink,
    ComputeCall,
    DeviceCore,
    DeviceError,
    Fatal,
    FrameDone,
    LocalExit,
    Log,
    ModelShape,
    Plan,
    Publish,
    Reconnect,
    RunHead,
    RunStages,
    Send,
    SendInfer,
    SendProbeTrain,
)
from spinn.runtime.security import SecurityError, device_ssl_context, load_token
from spinn.runtime.tracker import RequestTracker
from spinn.sla import SLA
from spinn.sources import Frame, FrameSource, Pacer, input_pixels

__all__ = [
    "DeviceError",
    "SpinnDevice",
    "profiled_codec",
    "profiled_input_codec",
    "recode_for",
    "run_device",
]

log = logging.getLogger("spinn.device")

_READ_CHUNK = 1 << 16
# uvloop's loop.time() ticks in milliseconds, too coarse for loopback round trips and
# per-stage times; every `now` on the device comes from this clock instead.
_now = time.perf_counter
# OpenSSL's reasons for a reply that is no TLS record at all: a server without TLS.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


def profiled_codec(codec: str, zstd: str, profiled: Sequence[str]) -> str | None:
    """The entry of a profile (`spinn profile`, its codecs `profiled`) whose sizes are what
    packing with `codec` under ``--zstd`` sends: compressed unless zstd is off, since where
    upload time matters the packer compresses, and where it skips zstd, sending raw was
    the faster of the two. Failing that the nearest entry the profile has; None if none."""
    raw = "sparse_int8" if codec == DICT_CODEC else codec
    names: tuple[str, ...] = (raw,)
    if zstd != "never":
        names = (codec, "sparse_int8+zstd", raw) if codec == DICT_CODEC else (f"{raw}+zstd", raw)
    return next((n for n in names if n in profiled), None)


def profiled_input_codec(config: DeviceConfig, profile: Profile) -> str | None:
    """The profile entry whose size is what split 0 sends: the frame's pixels
    (``uint8_image``, zstd as `profiled_codec`), or None when the device sends the float
    input there (``image_codec`` off) or the profile has no such entry."""
    if not config.link.image_codec:
        return None
    return profiled_codec(IMAGE_CODEC, config.link.zstd, tuple(profile.splits[0].bytes))


def recode_for(
    packed: PackedTensor,
    codec: str,
    dictionaries: ZstdDictionaries | None,
    zstd: str = "auto",
    *,
    accepted: Sequence[str] = (),
    input_spec: InputSpec | None = None,
) -> PackedTensor:
    """`packed` as the link allows (`codec`: its activation codec, `accepted`: every codec
    it took). Both rare, after a reconnection to a different server: a tensor packed with
    the dictionaries for a server that had them becomes sparse_int8, lossless (the same
    int8 levels, `as_sparse_int8`); pixels for a server without uint8_image become the
    float input, normalised by `input_spec` as the server would have (PROTOCOL.md §6.8);
    sparse_uintb for a server without it becomes sparse_int8 of the values it decodes to
    (§6.9: a second rounding, of at most half an int8 step)."""
    if packed.codec == IMAGE_CODEC and IMAGE_CODEC not in accepted:
        assert input_spec is not None
        x = input_spec.preprocess(torch.from_numpy(unpack(packed))).numpy()
        # The normalised input is negative in places: never sparse_uintb.
        float_codec = "sparse_int8" if codec == LOSSY_CODEC else codec
        return pack(x, float_codec, ZSTD_MODES[zstd], dictionaries=dictionaries, table=0)
    if packed.codec == LOSSY_CODEC and codec != LOSSY_CODEC:
        return pack(unpack(packed), "sparse_int8", ZSTD_MODES[zstd])
    if packed.codec != DICT_CODEC or codec == DICT_CODEC:
        return packed
    return as_sparse_int8(packed, dictionaries, ZSTD_MODES[zstd])


def _make_policy(
    config: DeviceConfig,
    profile: Profile,
    codecs: tuple[str, ...],
    num_stages: int,
    policy: Policy | None,
) -> Policy:
    """The policy the configuration names (``policy`` given: that one), its split and
    threshold checked against the model."""
    split = num_stages // 2 if config.policy.split is None else config.policy.split
    if config.link.server is None and config.policy.split is None:
        split = num_stages  # no server: every stage runs here (device-only)
    if not 0 <= split <= num_stages:
        raise DeviceError(f"policy.split must be in 0..{num_stages}, got {split}")
    if not 0.0 <= config.policy.thr_conf <= 1.0:
        raise DeviceError(f"policy.thr_conf must be in [0, 1], got {config.policy.thr_conf}")
    if policy is not None:
        return policy
    if config.policy.policy == "fixed":
        return FixedPolicy(split, config.policy.thr_conf)
    from spinn.scheduler import SchedulerConfig, make_policy

    # Upload sizes predicted with the codec this device packs with (docs/SCHEDULER.md,
    # "Predicted versus measured"); a profile that did not measure it leaves the smallest
    # profiled size.
    codec = profiled_codec(codecs[0], config.link.zstd, profile.codecs)
    # sparse_uintb is profiled only at the splits with a width, where it is the smallest
    # size measured: None predicts with it there.
    if codec is None and codecs[0] != LOSSY_CODEC:
        log.warning(
            "codec %s not in the profile (%s): predicting with the smallest size",
            codecs[0],
            ", ".join(profile.codecs),
        )
    scheduler_config = SchedulerConfig(
        codec=codec,
        input_codec=profiled_input_codec(config, profile),
        lossy=codecs[0] == LOSSY_CODEC,
        # The in-flight window decides the race under load (docs/SCHEDULER.md).
        max_in_flight=config.source.max_in_flight,
    )
    try:
        return make_policy(
            config.policy.policy, profile, config.policy.sla or SLA(), scheduler_config
        )
    except ValueError as exc:
        raise DeviceError(f"policy.policy {config.policy.policy}: {exc}") from exc


class _Link:
    """The device's connection to the server: connect, handshake, read, write. What to do
    on each event (PINGs, reconnect delays, dead links) is the core's."""

    def __init__(self, device: SpinnDevice) -> None:
        self.device = device
        self.config = device.config
        self.conn: Connection | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.welcome: Welcome | None = None
        self.fatal: DeviceError | None = None
        self.reconnect_delay = 0.0
        """The core's latest ``Reconnect`` delay."""
        self.ssl: ssl.SSLContext | None = None
        self._close_reason: str | None = None
        """Why the device itself closed the current link (read when the reader ends)."""
        self._reading = False
        """Inside the reader's dispatch: a close request ends the read loop there."""
        self.token: bytes | None = None
        try:
            if self.config.link.use_tls:
                cfg = self.config
                self.ssl = device_ssl_context(cfg.link.tls_ca, cfg.link.tls_cert, cfg.link.tls_key)
            if self.config.link.token_file is not None:
                self.token = load_token(self.config.link.token_file)
        except SecurityError as exc:
            raise DeviceError(str(exc)) from None
        self._closing = False
        self._stopping = False

    @property
    def codec(self) -> str:
        """The codec to pack with now: the device's first that the server accepted (the
        last one offered, plain sparse_int8 or the configured codec, while not connected)."""
        offered = self.device.codecs
        accepted = self.welcome.codecs if self.welcome is not None else ()
        return next((c for c in offered if c in accepted), offered[-1])

    @property
    def sends_pixels(self) -> bool:
        """Whether split 0 goes as the frame's pixels: the server accepted uint8_image."""
        return self.welcome is not None and IMAGE_CODEC in self.welcome.codecs

    @property
    def up(self) -> bool:
        # uvloop closes the transport on a peer reset before the read side sees the error:
        # a closing transport is down already, or a write to it raises RuntimeError.
        return (
            self.welcome is not None
            and self.writer is not None
            and not self._closing
            and not self.writer.transport.is_closing()
        )

    def send(self, event: Any) -> int:
        """Write one message; returns its framed size (0 if the link is down).

        Never raises for a dead link: a write that fails aborts the connection (the reader
        then drops it and reconnects) and returns 0, so the caller finishes locally."""
        if not self.up:
            return 0
        assert self.conn is not None and self.writer is not None
        try:
            data = self.conn.send(event)
            self.writer.write(data)
        except (RuntimeError, OSError, ProtocolError) as exc:
            self._close_reason = f"closed by the device: write failed ({_describe(exc)})"
            self._abort()
            return 0
        return len(data)

    def queued_bytes(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        if self.writer is None or self.writer.transport is None:
            return 0
        return int(self.writer.transport.get_write_buffer_size())

    def close_link(self, reason: str) -> None:
        """The core's ``CloseLink``: end this connection (the reader reports ``reason``)."""
        self._close_reason = reason
        if not self._reading:
            self._abort()

    async def run(self) -> None:
        """Keep a connection up until closed; reconnect when the core says."""
        core = self.device.core
        while not self._stopping:
            host, port = core.server_address
            log.debug("connecting to %s:%d", host, port)
            try:
                reader = await self._connect(host, port)
            except DeviceError as exc:
                self._fail(exc)
                return
            except ssl.SSLCertVerificationError as exc:
                # Not a passing fault: this server cannot be trusted until reconfigured.
                self._fail(DeviceError(f"TLS: server {host}:{port} not trusted: {exc}"))
                return
            except Exception as exc:
                # Anything but a refusal of this device is an unreachable server: retry.
                # An unexpected kind is logged in full, but never ends the reconnect loop.
                if not isinstance(exc, OSError | ProtocolError):
                    log.exception("unexpected error while connecting")
                why = _describe(exc, self.config.link.connect_timeout_s)
                self.device.act(core.connect_failed(_now(), why, self._misconfiguration_hint(exc)))
                if self.fatal is not None:
                    return
                await asyncio.sleep(self.reconnect_delay)
                continue
            welcome = self.welcome
            assert welcome is not None
            limit = None if welcome.description is None else welcome.description.max_frame_bytes
            self.device.act(
                core.link_up(
                    _now(),
                    server_name=welcome.server_name,
                    reports_compute_time=welcome.reports_compute_time,
                    codec=self.codec,
                    max_frame_bytes=limit,
                )
            )
            reason = "link closed"
            try:
                reason = await self._serve(reader)
            finally:
                # Always: a link left "up" after its reader ended would never reconnect.
                if self.writer is not None:
                    with contextlib.suppress(Exception):
                        self.writer.close()
                self.conn, self.writer, self.welcome = None, None, None
                self.device.act(core.link_down(_now(), reason, stopping=self._stopping))
            if self.fatal is not None or self._stopping:
                return
            if self.reconnect_delay > 0:
                await asyncio.sleep(self.reconnect_delay)

    def _fail(self, exc: DeviceError) -> None:
        self.fatal = exc
        self.device.request_stop()

    def _misconfiguration_hint(self, exc: BaseException) -> str | None:
        """The likely cause of a failed connect that a wrong flag on either end explains."""
        if isinstance(exc, ssl.SSLError) and exc.reason in _NOT_TLS_REASONS:
            # The first bytes back are no TLS record: the server speaks the plain protocol.
            return (
                "does not answer in TLS: is the server using TLS? If not, start the device "
                "without --tls/--tls-ca (or the server with --tls-cert/--tls-key)"
            )
        if not isinstance(exc, _ClosedInHandshake):
            return None
        if self.ssl is None:
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

    async def _connect(self, host: str, port: int) -> asyncio.StreamReader:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                limit=_READ_CHUNK,
                ssl=self.ssl,
                server_hostname=host if self.ssl is not None else None,
            ),
            self.config.link.connect_timeout_s,
        )
        conn = Connection(Role.DEVICE, ConnectionConfig(auth_token=self.token))
        meta = self.device.meta
        writer.write(
            conn.send(
                Hello(
                    PROTOCOL_VERSION,
                    meta.model_id,
                    meta.weights_sha256,
                    self.device.offered_codecs,
                    self.config.link.device_name,
                    # A fresh nonce per connection (PROTOCOL.md §10).
                    auth_nonce=secrets.token_bytes(NONCE_SIZE) if self.token else b"",
                    dictionaries_sha256=self.device.dictionaries_sha256,
                )
            )
        )
        try:
            welcome = await asyncio.wait_for(
                self._handshake(reader, writer, conn), self.config.link.connect_timeout_s
            )
            self._check_description(welcome, writer, conn)
        except BaseException:
            writer.close()
            raise
        self.conn, self.writer, self.welcome = conn, writer, welcome
        self._close_reason = None
        return reader

    def _check_description(
        self, welcome: Welcome, writer: asyncio.StreamWriter, conn: Connection
    ) -> None:
        """Refuse a server whose self-description (PROTOCOL.md §5.12) disagrees with this
        device's checkpoint, naming each difference: the same model id and weights with
        another input, class list or split shapes would answer wrongly without an error."""
        if welcome.description is None:  # a version-1 server says nothing more
            return
        problems = mismatches(welcome.description, self.device.model, self.device.meta)
        if problems:
            message = "server describes its model unlike this checkpoint: " + "; ".join(problems)
            with contextlib.suppress(ProtocolError, OSError):
                writer.write(conn.send(Error(ErrorCode.MODEL_MISMATCH, message[:MAX_STRING])))
            raise DeviceError(message)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ) -> Welcome:
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                if exc.code is ErrorCode.UNAUTHENTICATED:
                    # Wrong token, or a server that skips authentication: not transient.
                    with contextlib.suppress(ProtocolError, OSError):
                        writer.write(conn.send(Error(exc.code, str(exc))))
                    # Only a device with a token gets here (a server that requires one
                    # refuses a HELLO without a nonce itself). The server proves the token
                    # first (PROTOCOL.md §10): a proof that does not match is far more often
                    # a token file out of date on one end than an impostor.
                    raise DeviceError(
                        f"token authentication failed: {exc}; the device's and the server's "
                        "tokens differ, or the server uses none (compare their --token-file)"
                    ) from None
                raise
            if event is NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    raise _ClosedInHandshake("server closed the connection during the handshake")
                conn.receive_data(data)
                continue
            if isinstance(event, Welcome):
                return event
            if isinstance(event, Challenge):
                # The connection already checked the server's proof (PROTOCOL.md §10).
                assert self.token is not None and conn.hello is not None
                proof = device_proof(self.token, conn.hello.auth_nonce, event.nonce)
                writer.write(conn.send(Auth(proof)))
                continue
            if isinstance(event, Error):
                if event.code in FATAL_CODES:
                    raise DeviceError(f"server refused this device: {event.message}")
                raise ConnectionError(f"server error {event.code.name}: {event.message}")
            raise ConnectionError(f"unexpected {type(event).__name__} during the handshake")

    async def _serve(self, reader: asyncio.StreamReader) -> str:
        """Read until the connection ends; returns why."""
        assert self.conn is not None and self.writer is not None
        dev = self.device
        try:
            while True:
                with dev.link_work():
                    self._reading = True
                    try:
                        while self._close_reason is None:
                            event = self.conn.next_event()
                            if event is NEED_DATA:
                                break
                            dev.act(dev.core.receive(_now(), event, wall_time=time.time()))
                    finally:
                        self._reading = False
                if self._close_reason is not None:
                    return self._close_reason
                data = await reader.read(_READ_CHUNK)
                if not data:
                    return self._close_reason or "server closed the connection"
                dev.core.heard(_now())
                with dev.link_work():
                    self.conn.receive_data(data)
        except ProtocolError as exc:
            with contextlib.suppress(ProtocolError, OSError):
                assert self.writer is not None
                self.writer.write(Connection(Role.DEVICE).send(Error(exc.code, str(exc))))
            return f"bad data from server: {exc}"
        except (ConnectionError, OSError) as exc:
            return self._close_reason or f"connection lost: {_describe(exc)}"
        except asyncio.CancelledError:
            return self._close_reason or "link closed by the device"
        except Exception as exc:
            # A bug in handling one message must not leave the link up and unread: drop it
            # and reconnect (the frames it owed finish locally).
            log.exception("unexpected error on the server link")
            return f"internal error: {exc!r}"

    def _abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()

    async def close(self) -> None:
        """Say BYE and stop reconnecting."""
        self._stopping = True
        if self.up:
            # uvloop raises RuntimeError on a transport closed under us: the summary must
            # still be printed and the run end normally.
            with contextlib.suppress(ProtocolError, OSError, RuntimeError):
                self.send(Bye("device done"))
                assert self.writer is not None
                await asyncio.wait_for(self.writer.drain(), 1.0)
        self._closing = True
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


_T = TypeVar("_T")
Emit = Callable[[dict[str, Any]], None]
Status = Callable[[str], None]


class SpinnDevice:
    """Runs frames through the progressive model, offloading to the server per the policy:
    the asyncio adapter of ``DeviceCore`` (reads frames, runs compute in the executor,
    moves messages, feeds the core ``now`` and events, and carries out its actions)."""

    def __init__(self, config: DeviceConfig, *, policy: Policy | None = None) -> None:
        from spinn.checkpoint import load_checkpoint

        self.config = config
        workers, threads = plan_workers(config.compute.workers, config.compute.torch_threads)
        configure_torch(threads)
        self.model, self.meta = load_checkpoint(
            config.compute.checkpoint, allow_user_code=config.compute.allow_user_code
        )
        self.model.eval()
        slow_down(self.model, config.compute.slowdown)  # emulation only
        self.dictionaries = self._load_dictionaries()
        self.codecs: tuple[str, ...] = (
            (DICT_CODEC, "sparse_int8")
            if self.dictionaries is not None
            # sparse_uintb where the server takes it, at each split's profiled width
            # (PROTOCOL.md §6.9.1), else sparse_int8, which every server takes.
            else (LOSSY_CODEC, "sparse_int8")
            if config.link.codec == LOSSY_CODEC
            else ("sparse_int8" if config.link.codec == DICT_CODEC else config.link.codec,)
        )
        """Activation codecs, preferred first; the last is what every server takes."""
        self.offered_codecs = (
            (*self.codecs, IMAGE_CODEC) if config.link.image_codec else self.codecs
        )
        """Codecs offered in HELLO: the activation codecs, then the split-0 pixels (§6.8)."""
        self.dictionaries_sha256 = "" if self.dictionaries is None else self.dictionaries.sha256
        profile_path = config.policy.profile or Path(config.compute.checkpoint).with_name(
            "profile.json"
        )
        if not Path(profile_path).is_file():
            raise DeviceError(
                f"offline profile {profile_path} not found (make one with `spinn profile`)"
            )
        self.profile = Profile.load(profile_path)
        if self.profile.model_id != self.meta.model_id:
            raise DeviceError(
                f"profile {profile_path} is for model {self.profile.model_id!r}, "
                f"checkpoint is {self.meta.model_id!r}"
            )
        self.core = DeviceCore(
            config,
            profile=self.profile,
            policy=_make_policy(config, self.profile, self.codecs, self.model.num_stages, policy),
            model=ModelShape(
                self.model.num_stages,
                tuple(self.model.exit_stages),
                self.model.num_classes,
                tuple(self.meta.class_names or ()),
            ),
            # The busy-time accounting reads one worker's gaps between calls as hand-off
            # work; with several workers the gaps overlap and no longer sum to busy time.
            measure_busy=workers == 1,
            server_budget_share=config.policy.server_budget_share,
        )
        self.slots = ComputeSlots(workers)
        self._executor: ThreadPoolExecutor = make_executor(workers, "spinn-device")
        self._io: ThreadPoolExecutor = make_executor(1, "spinn-source")
        self._link = _Link(self) if config.link.server is not None else None
        self._queues: dict[int, asyncio.Queue[Action]] = {}
        """Per frame in flight: the compute actions (and its end) its task carries out."""
        self._cancelled: set[int] = set()
        """Frames whose queued computation is not to run (``CancelCompute``)."""
        self._link_busy_ms = 0.0
        """Event-loop time spent on the server link so far (sending, reading and handling
        messages), in ms: measured here, accounted by the core."""
        self._emit: Emit = lambda record: None
        self._stop = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._output_error: OSError | None = None
        """Why the answers could not be written (a closed pipe): the run stops on it."""

    # -- public -----------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy deciding ⟨split, thr_conf⟩ per frame."""
        return self.core.policy

    @property
    def profiler(self) -> OnlineProfiler:
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

    @property
    def errors(self) -> int:
        """Frames answered with an error record instead of a classification."""
        return self.core.errors

    @property
    def server_connects(self) -> int:
        """Successful (re)connections so far."""
        return self.core.connects

    def request_stop(self) -> None:
        """Stop reading the source; frames in flight are still answered."""
        self._stop.set()

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
        iterator = iter(source)
        count = 0
        source_error: Exception | None = None
        try:
            if self._link is not None:
                await self._await_first_connect()
            while not self._stop.is_set():
                if self.config.source.limit is not None and count >= self.config.source.limit:
                    break
                await window.acquire()
                if self._link is not None and self._link.fatal is not None:
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
                count += 1
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
                with self.link_work():
                    if self._link is not None:
                        self._link.send(action.message)
            elif isinstance(action, SendInfer):
                with self.link_work():
                    nbytes = 0 if self._link is None else self._link.send(action.message)
                rid = action.message.request_id
                self.act(
                    self.core.infer_written(
                        _now(), action.frame_id, rid, nbytes, self._link_busy_ms
                    )
                )
            elif isinstance(action, SendProbeTrain):
                sizes: list[int] = []
                with self.link_work():
                    for ping in action.pings:
                        sizes.append(0 if self._link is None else self._link.send(ping))
                        if sizes[-1] == 0:
                            break
                self.core.train_written(sizes)
            elif isinstance(action, CancelCompute):
                self._cancelled.add(action.frame_id)
            elif isinstance(action, Log):
                log.log(action.level, action.msg, *action.args)
            elif isinstance(action, ArmTimer):
                self._timer_wake.set()
            elif isinstance(action, CloseLink):
                if self._link is not None:
                    self._link.close_link(action.reason)
            elif isinstance(action, Fatal):
                if self._link is not None:
                    self._link.fatal = DeviceError(action.message)
                self.request_stop()
            elif isinstance(action, Reconnect):
                if self._link is not None:
                    self._link.reconnect_delay = action.delay_s

    def _link_up(self) -> bool:
        return self._link is not None and self._link.up

    def _queued_bytes(self) -> int:
        return 0 if self._link is None else self._link.queued_bytes()

    # -- frames -------------------------------------------------------------------

    async def _await_first_connect(self) -> None:
        """Give the first connection a moment so a healthy server is used from frame 0."""
        assert self._link is not None
        deadline = _now() + self.config.link.connect_timeout_s
        while not self._link.up and self._link.fatal is None:
            if _now() > deadline:
                log.warning("server not reachable yet: starting locally, offload resumes later")
                return
            await asyncio.sleep(0.01)
        self._check_fatal()

    def _check_fatal(self) -> None:
        if self._link is not None and self._link.fatal is not None:
            raise self._link.fatal

    async def _process(self, frame: Frame, window: asyncio.Semaphore) -> None:
        """One frame: hand it to the core, then run what the core asks until it is done."""
        fid = frame.index
        queue: asyncio.Queue[Action] = asyncio.Queue()
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
        # Every input gets exactly one answer or an explicit error record: a frame whose
        # processing raised (bad image, a bug) is reported, never silently dropped.
        log.error("frame %d failed", frame.index, exc_info=exc)
        error = f"{type(exc).__name__}: {exc}"
        self.act(
            self.core.frame_failed(
                _now(), frame.index, error, label=frame.label, origin=frame.origin
            )
        )

    async def _compute(self, frame: Frame, action: Action) -> None:
        """Run a ``RunHead`` or ``RunStages`` in a compute slot and report it to the core."""
        loop = asyncio.get_running_loop()
        fid = frame.index
        t0 = _now()
        priority = action.priority if isinstance(action, RunStages) else 0
        async with self.slots.slot(priority) as queued:
            waited = _now() - t0
            if fid in self._cancelled:
                self.act(self.core.compute_skipped(_now(), fid))
                return
            if isinstance(action, RunHead):
                head, timing = await loop.run_in_executor(
                    self._executor, self._worker_call, self._run_head, frame, action
                )
            else:
                assert isinstance(action, RunStages)
                step, timing = await loop.run_in_executor(
                    self._executor, self._worker_call, self._run_stages, action
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
        if packed is not None and self._link is not None:
            with self.link_work():
                welcome = self._link.welcome
                packed = recode_for(
                    packed,
                    self._link.codec,
                    self.dictionaries,
                    self.config.link.zstd,
                    accepted=welcome.codecs if welcome is not None else (),
                    input_spec=self.model.input_spec,
                )
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

    def _exit(self, answer: Any) -> LocalExit | None:
        if answer is None:
            return None
        top = answer.topk(self.config.output.top_k)
        return LocalExit(answer.exit, tuple(c for c, _ in top), tuple(p for _, p in top))

    def _run_range(self, act: torch.Tensor, start: int, stop: int, plan: Plan) -> Any:
        """Worker thread: stages [start, stop) with exit checks; a truncated network's
        forced exit always answers (``iter_stages``' ``final_exit``)."""
        from spinn.inference import run_stages

        return run_stages(self.model, act, start, stop, plan.rule, final_exit=plan.forced_exit)

    def _run_stages(self, action: RunStages) -> tuple[LocalExit | None, Any, int, float]:
        """Worker thread: one ``RunStages``; its answer or activation, and its time in ms."""
        t0 = time.perf_counter()
        out = self._run_range(action.activation, action.start, action.stop, action.plan)
        ms = (time.perf_counter() - t0) * 1e3
        return self._exit(out.answer), out.activation, out.stop, ms

    def _run_head(
        self, frame: Frame, action: RunHead
    ) -> tuple[LocalExit | None, torch.Tensor | None, Any, float, int, float]:
        """Worker thread: preprocess, stages [0, split), pack if the frame goes out; the
        stage and packing times in ms. At split 0 the frame's pixels go out as they are
        where the server takes them (PROTOCOL.md §6.8), as a real client's would."""
        plan, bandwidth_bps = action.plan, action.bandwidth_bps
        spec = self.model.input_spec
        pixels = input_pixels(frame.image, spec)
        x = spec.preprocess(torch.from_numpy(pixels))
        t0 = time.perf_counter()
        out = self._run_range(x, 0, plan.split, plan)
        stages_ms = (time.perf_counter() - t0) * 1e3
        if out.answer is not None:
            return self._exit(out.answer), None, None, stages_ms, out.stop, 0.0
        assert out.activation is not None
        packed = None
        pack_ms = 0.0
        if action.pack and self._link is not None:
            t1 = time.perf_counter()
            zstd = ZSTD_MODES[self.config.link.zstd]
            if plan.split == 0 and self._link.sends_pixels:
                packed = pack(pixels[None], IMAGE_CODEC, zstd, bandwidth_bps)
            elif self._link.codec == LOSSY_CODEC:
                packed = self._pack_lossy(out.activation.numpy(), plan.split, zstd, bandwidth_bps)
            else:
                packed = pack(
                    out.activation.numpy(),
                    self._link.codec,
                    zstd,
                    bandwidth_bps,
                    dictionaries=self.dictionaries,
                    table=plan.split,
                )
            pack_ms = (time.perf_counter() - t1) * 1e3
        return None, out.activation, packed, stages_ms, out.stop, pack_ms

    def _load_dictionaries(self) -> ZstdDictionaries | None:
        """The dictionaries beside the checkpoint when the codec wants them, else None."""
        if self.config.link.codec != DICT_CODEC:
            return None
        from spinn.dictionaries import dictionaries_path, load_dictionaries

        try:
            found = load_dictionaries(
                self.config.compute.checkpoint, self.meta.model_id, self.model.num_stages
            )
        except DictionaryError as exc:
            raise DeviceError(
                f"link.codec {DICT_CODEC}: {exc} (or pack without it: link.codec sparse_int8)"
            ) from None
        if found is None:
            log.info(
                "no %s (make it with `spinn dictionaries`): packing with sparse_int8",
                dictionaries_path(self.config.compute.checkpoint),
            )
        return found

    def _pack_lossy(
        self, activation: Any, split: int, zstd: bool | None, bandwidth_bps: float
    ) -> PackedTensor:
        """sparse_uintb at the split's profiled width (PROTOCOL.md §6.9.1); sparse_int8 at a
        split without one, or for a tensor the codec cannot carry (a negative value)."""
        lossy = self.profile.splits[split].lossy
        if lossy is not None:
            try:
                return pack(activation, LOSSY_CODEC, zstd, bandwidth_bps, bits=lossy.bits)
            except ValueError:
                pass
        return pack(activation, "sparse_int8", zstd, bandwidth_bps)

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


def _describe(exc: BaseException, timeout_s: float | None = None) -> str:
    """An exception for a log line: never empty (a timeout has no message of its own)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        return f"no answer{within} (connect and handshake)"
    text = str(exc)
    return text if text else type(exc).__name__


class _ClosedInHandshake(ConnectionError):
    """The server closed the connection before WELCOME."""


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
