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
import itertools
import json
import logging
import math
import os
import random
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Auth,
    Bye,
    Cancel,
    Challenge,
    Connection,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    ProtocolError,
    Result,
    Role,
    Welcome,
)
from protocol.auth import NONCE_SIZE, device_proof
from protocol.dictionaries import DictionaryError, ZstdDictionaries
from protocol.messages import MAX_STRING
from protocol.packing import (
    DICT_CODEC,
    IMAGE_CODEC,
    KNOWN_CODECS,
    LOSSY_CODEC,
    PackedTensor,
    as_sparse_int8,
    pack,
    unpack,
)
from spinn.description import mismatches
from spinn.estimators import OnlineProfiler, ServerTimeEstimator
from spinn.exits import ExitRule
from spinn.policy import Decision, FixedPolicy, Policy
from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.profile import Profile
from spinn.progressive import InputSpec
from spinn.runtime.backoff import Backoff
from spinn.runtime.compute import (
    ComputeSlots,
    configure_torch,
    make_executor,
    plan_workers,
    slow_down,
)
from spinn.runtime.failover import ServerRotation
from spinn.runtime.security import SecurityError, device_ssl_context, load_token
from spinn.runtime.stats import DeviceStats, median_or_none
from spinn.runtime.tracker import Answer, FramePhase, RequestTracker, request_deadline
from spinn.runtime.uplink import ProbeTrains, UploadTimer
from spinn.sla import SLA
from spinn.sources import Frame, FrameSource, Pacer, SourceError, input_pixels

__all__ = [
    "ACTIVATION_CODECS",
    "DeviceConfig",
    "DeviceError",
    "SpinnDevice",
    "profiled_codec",
    "profiled_input_codec",
    "recode_for",
    "run_device",
]

log = logging.getLogger("spinn.device")

_READ_CHUNK = 1 << 16
_ZSTD_MODES: dict[str, bool | None] = {"auto": None, "always": True, "never": False}
ACTIVATION_CODECS = tuple(c for c in KNOWN_CODECS if c != IMAGE_CODEC)
"""The ``--codec`` choices: every codec but the split-0 one."""
"""DeviceConfig.zstd → pack's `compress` (None: the packer decides from the bandwidth)."""
# uvloop's loop.time() ticks in milliseconds, too coarse for loopback round trips and
# per-stage times; every `now` on the device comes from this clock instead.
_now = time.perf_counter
_FATAL_CODES = (ErrorCode.MODEL_MISMATCH, ErrorCode.VERSION, ErrorCode.UNAUTHENTICATED)
# A probe's padding crosses the link while everything queued behind it waits.
_MAX_PROBE_BYTES = 1 << 20
# Bytes of a PING frame besides its padding (msgpack envelope; a generous bound).
_PING_ENVELOPE = 128
# Bare PINGs sent 0.1 s apart on a new connection, before the regular interval.
_QUICK_PINGS = 4
# Request errors the server sends as soon as the INFER arrives (PROTOCOL.md §8).
_ANSWERED_ON_ARRIVAL = (ErrorCode.BUSY, ErrorCode.BAD_TENSOR, ErrorCode.BAD_SPLIT)
# OpenSSL's reasons for a reply that is no TLS record at all: a server without TLS.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


class DeviceError(RuntimeError):
    """The device cannot run: bad configuration or a server that refuses this model."""


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the device needs; the CLI only fills this in."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    """Checkpoint of the progressive model (must match the server's)."""
    allow_user_code: bool = False
    """Import the module a checkpoint of a user model ('module:callable') names to rebuild
    it; off, such a checkpoint is refused (``spinn.checkpoint.load_checkpoint``)."""
    profile: Path | None = None
    """Offline profile; None = ``profile.json`` beside the checkpoint."""
    server: tuple[str, int] | None = ("127.0.0.1", 7878)
    """Server address; None runs device-only and never connects."""
    extra_servers: tuple[tuple[str, int], ...] = ()
    """Further server addresses: on an outage the device fails over to the next one
    (``spinn.runtime.failover``)."""
    split: int | None = None
    """Fixed split for ``FixedPolicy``; None = the middle split ``S // 2`` (``S`` without
    a server)."""
    thr_conf: float = 0.8
    """Fixed exit threshold for ``FixedPolicy``."""
    policy: str = "fixed"
    """``fixed`` (split/thr_conf above) or a name of ``spinn.scheduler.POLICY_NAMES``."""
    sla: SLA | None = None
    """Service-level agreement for the scheduler policies (None = the SLA defaults)."""
    rate_fps: float | None = None
    """Frame rate of the source replay; None or 0 = as fast as possible."""
    limit: int | None = None
    """Stop after this many frames."""
    max_in_flight: int = 4
    """Frames begun but not answered at most (bounds the pipelining window)."""
    continue_locally: bool = True
    """Keep computing after the split while the server works (first answer wins)."""
    codec: str = DICT_CODEC
    """Packing codec for activations (``protocol.packing.KNOWN_CODECS``). The default,
    sparse_int8_zdict, needs the zstd dictionaries beside the checkpoint and a server
    holding the same ones; without either the device packs with sparse_int8."""
    image_codec: bool = True
    """At split 0 send the frame's pixels (uint8_image, PROTOCOL.md §6.8) to a server that
    accepts them, as a real client would; off, or to a server without the codec, the
    preprocessed float input goes with ``codec``."""
    zstd: str = "auto"
    """When to compress: ``auto`` when the transfer time it saves at the measured bandwidth
    exceeds its own (paper §4.3), ``always`` for the fewest bytes (a metered link),
    ``never``."""
    workers: int | None = 1
    """Device compute threads; a weak device computes one thing at a time."""
    torch_threads: int = 1
    """Torch intra-op threads per device worker."""
    top_k: int = 5
    """Classes reported per frame."""
    ping_interval_s: float = 0.5
    """Period of bare PINGs while connected (latency L, and a dead link noticed)."""
    probe_bytes: int = 61_440
    """Padding of the largest PING of a bandwidth probe train (``uplink.ProbeTrains``);
    0 sends no trains (B then comes from uploads alone)."""
    probe_share: float = 0.03
    """Fraction of the link the probe trains take at the estimated bandwidth."""
    ping_timeout_s: float = 1.5
    """Unanswered PING this long (plus the time queued bytes need at B) = link dead."""
    deadline_factor: float = 3.0
    """A RESULT is awaited ``factor ×`` its expected time (2L + bytes/B + server time)…"""
    deadline_margin_s: float = 0.1
    """…plus this, before the frame is finished locally as ``fallback``."""
    connect_timeout_s: float = 2.0
    """TCP connect plus handshake must complete within this."""
    reconnect_base_s: float = 0.1
    """First reconnect delay scale (exponential backoff with jitter)."""
    reconnect_cap_s: float = 2.0
    """Longest reconnect delay before jitter."""
    status_interval_s: float = 0.5
    """Period of the live status line; 0 disables it."""
    seed: int = 0
    """Seed of the reconnect jitter."""
    device_name: str = "spinn-device"
    """Name sent in HELLO."""
    slowdown: float = 1.0
    """Emulate a weaker device: after each stage and exit head the worker waits (K−1)× the
    time it took (``spinn.runtime.compute.slow_down``), so device compute takes K× as long
    (bench/paper.py, one machine for both ends)."""
    tls: bool = False
    """Speak TLS to the server, verifying its certificate and host name (implied by
    ``tls_ca``); without ``tls_ca`` the system's trusted CAs verify it."""
    tls_ca: Path | None = None
    """PEM CA file that signed the server's certificate."""
    tls_cert: Path | None = None
    """PEM certificate of this device, for servers that require client certificates."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    token_file: Path | None = None
    """Shared token proved in the handshake (PROTOCOL.md §10); None: no authentication."""
    misconfig_tries: int = 5
    """Connection attempts that fail the same misconfigured way in a row (TLS on one end
    only, client certificates) before the device gives up: the frames already read are
    answered, then the run ends with an error (exit status 2), as a token mismatch does."""
    retry_forever: bool = False
    """Keep retrying a server that looks misconfigured (answering locally meanwhile)."""

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.torch_threads < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {self.torch_threads}")
        if not self.status_interval_s >= 0:
            raise ValueError(f"--status-interval must be >= 0, got {self.status_interval_s}")
        if self.zstd not in _ZSTD_MODES:
            raise ValueError(f"--zstd must be one of {', '.join(_ZSTD_MODES)}, got {self.zstd!r}")
        if self.codec not in ACTIVATION_CODECS:
            # uint8_image is the split-0 codec, offered beside this one (image_codec).
            raise ValueError(
                f"--codec: unknown codec {self.codec!r}; choose one of {', '.join(ACTIVATION_CODECS)}"
            )
        if self.rate_fps is not None and not (math.isfinite(self.rate_fps) and self.rate_fps >= 0):
            # Checked here as well as by the Pacer: before the model loads and tasks start.
            raise ValueError(f"--rate must be a finite number >= 0, got {self.rate_fps}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        # Finite: the deadline it scales goes on the wire, which carries no inf or nan.
        if not (math.isfinite(self.deadline_factor) and 1 <= self.deadline_factor <= 1e6):
            raise ValueError(f"--deadline-factor must be in [1, 1e6], got {self.deadline_factor}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not 1.0 <= self.slowdown <= 1000.0:
            raise ValueError(f"--slowdown must be in [1, 1000], got {self.slowdown}")
        if not 0 <= self.probe_bytes <= _MAX_PROBE_BYTES:
            raise ValueError(
                f"--probe-bytes must be in [0, {_MAX_PROBE_BYTES}], got {self.probe_bytes}"
            )
        if self.misconfig_tries < 1:
            raise ValueError(f"--misconfig-tries must be >= 1, got {self.misconfig_tries}")
        if not 0.0 < self.probe_share <= 0.5:
            raise ValueError(f"probe_share must be in (0, 0.5], got {self.probe_share}")
        if (self.tls_cert is not None or self.tls_key is not None) and not self.use_tls:
            raise ValueError("--tls-cert/--tls-key need --tls or --tls-ca")

    @property
    def server_addresses(self) -> tuple[tuple[str, int], ...]:
        """Every configured server address, ``server`` first (empty when device-only)."""
        return () if self.server is None else (self.server, *self.extra_servers)

    @property
    def use_tls(self) -> bool:
        """Whether the link speaks TLS."""
        return self.tls or self.tls_ca is not None


@dataclass(slots=True)
class _Sent:
    frame_id: int
    split: int
    nbytes: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class _Plan:
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
    if not config.image_codec:
        return None
    return profiled_codec(IMAGE_CODEC, config.zstd, tuple(profile.splits[0].bytes))


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
        return pack(x, float_codec, _ZSTD_MODES[zstd], dictionaries=dictionaries, table=0)
    if packed.codec == LOSSY_CODEC and codec != LOSSY_CODEC:
        return pack(unpack(packed), "sparse_int8", _ZSTD_MODES[zstd])
    if packed.codec != DICT_CODEC or codec == DICT_CODEC:
        return packed
    return as_sparse_int8(packed, dictionaries, _ZSTD_MODES[zstd])


class _Link:
    """The device's connection to the server: connect, handshake, read, ping, reconnect."""

    def __init__(self, device: SpinnDevice) -> None:
        self.device = device
        self.config = device.config
        self.conn: Connection | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.welcome: Welcome | None = None
        self.backoff = Backoff(
            self.config.reconnect_base_s,
            self.config.reconnect_cap_s,
            random.Random(self.config.seed),
        )
        self.rotation = ServerRotation(self.config.server_addresses, self.backoff)
        self.pings: dict[int, tuple[float, int]] = {}
        """Unanswered PINGs: when sent, and their padding."""
        self.ping_seq = 0
        self.trains = ProbeTrains(
            max_frame_padding=max(1, self.config.probe_bytes), share=self.config.probe_share
        )
        self.train: dict[int, int] = {}
        """The probe train in flight: its PINGs' seq → size on the wire, in the order sent."""
        self.train_arrivals: dict[int, tuple[int | None, float]] = {}
        """Per answered PING of the train: the server's bytes read and clock when it arrived
        (PONG ``received_bytes`` and ``received_at``)."""
        self.clean_pings: set[int] = set()
        """Bare PINGs sent with no probe train ahead of them: only these time L."""
        self.heard_at = 0.0
        """When the server last sent anything (the dead-link check)."""
        self.probe_bytes_sent = 0
        """Bytes of probe trains written (framed), for the summary's probe overhead."""
        self._wake_pinger = asyncio.Event()
        self.connects = 0
        self.answers_on_link = 0
        """RESULTs and request ERRORs on the current link (``ServerRotation.connection_lost``)."""
        self.fatal: DeviceError | None = None
        self.ssl: ssl.SSLContext | None = None
        self._hints_given: set[str] = set()
        """Misconfiguration warnings already logged (``_misconfiguration_hint``), each once."""
        self._same_failures: tuple[str, int] = ("", 0)
        """The last connect failure's misconfiguration hint, and how many in a row."""
        self._close_reason: str | None = None
        """Why the device itself closed the current link (read when the reader ends)."""
        self.token: bytes | None = None
        try:
            if self.config.use_tls:
                cfg = self.config
                self.ssl = device_ssl_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            if self.config.token_file is not None:
                self.token = load_token(self.config.token_file)
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

    def unanswered_bytes(self) -> int:
        """Bytes ahead of a new message on the way to the server: the local write buffer
        plus the INFERs the server has not answered (they may sit in any buffer on the
        path, e.g. a shaping middlebox, and a PING queues behind them)."""
        return self.queued_bytes() + sum(s.nbytes for s in self.device._sent.values())

    async def run(self) -> None:
        """Keep a connection up until closed; reconnect with backoff after each loss."""
        assert self.config.server is not None
        while not self._stopping:
            host, port = self.rotation.current
            log.debug("connecting to %s:%d", host, port)
            try:
                reader = await self._connect(host, port)
            except DeviceError as exc:
                self.fatal = exc
                self.device._wake_all()
                return
            except ssl.SSLCertVerificationError as exc:
                # Not a passing fault: this server cannot be trusted until reconfigured.
                self.fatal = DeviceError(f"TLS: server {host}:{port} not trusted: {exc}")
                self.device._wake_all()
                return
            except Exception as exc:
                # Anything but a refusal of this device is an unreachable server: retry.
                # An unexpected kind is logged in full, but never ends the reconnect loop.
                if not isinstance(exc, OSError | ProtocolError):
                    log.exception("unexpected error while connecting")
                # Several servers: the next one is tried at once; backoff only after a
                # whole round failed (spinn.runtime.failover).
                delay = self.rotation.connect_failed()
                log.info(
                    "server %s:%d unreachable (%s); next try in %.2f s",
                    host,
                    port,
                    _describe(exc, self.config.connect_timeout_s),
                    delay,
                )
                hint = self._misconfiguration_hint(exc)
                if hint is not None:
                    # These read like a restarting server, so the device keeps retrying
                    # (and answering locally) but says once what the likely cause is...
                    self._hint_once(host, port, hint)
                    # ...and gives up when it keeps failing the same way (unless told not
                    # to): the frames already read are still answered (``SpinnDevice.run``).
                    if self._misconfigured(host, port, hint):
                        return
                else:
                    self._same_failures = ("", 0)
                await asyncio.sleep(delay)
                continue
            self._same_failures = ("", 0)
            connected_at = _now()
            self.answers_on_link = 0
            self.connects += 1
            self.device.profiler.mark_server(connected_at, True)
            log.info(
                "connected to %s:%d (%s), compute time %sreported, packing with %s",
                host,
                port,
                self.welcome.server_name if self.welcome else "?",
                "" if self.welcome and self.welcome.reports_compute_time else "NOT ",
                self.codec,
            )
            if (
                self.config.probe_bytes == 0
                and self.welcome is not None
                and not self.welcome.reports_compute_time
            ):
                # Uploads are timed only against a reported server time (runtime.uplink).
                self._hint_once(
                    host,
                    port,
                    "does not report its compute time and --probe-bytes is 0: the bandwidth "
                    "is not measured (its estimate stays at the prior)",
                )
            reason = "link closed"
            try:
                reason = await self._serve(reader)
            finally:
                # Always: a link left "up" after its reader ended would never reconnect.
                self._drop(reason)
                up_s = _now() - connected_at
                delay = self.rotation.connection_lost(up_s, self.answers_on_link)
            if self.fatal is not None or self._stopping:
                return
            if delay > 0:
                # Dropped at once, unanswered: a crash-looping server is backed off.
                log.info(
                    "link to %s:%d lasted %.2f s and answered nothing; next try in %.2f s",
                    host,
                    port,
                    up_s,
                    delay,
                )
                await asyncio.sleep(delay)

    def _misconfigured(self, host: str, port: int, hint: str) -> bool:
        """Count a connect failure explained by ``hint``; True (and ``fatal`` set) when it
        is the ``misconfig_tries``-th in a row and the device does not retry forever."""
        last, count = self._same_failures
        count = count + 1 if last == hint else 1
        self._same_failures = (hint, count)
        if self.config.retry_forever or count < self.config.misconfig_tries:
            return False
        self.fatal = DeviceError(
            f"server {host}:{port} {hint} (the handshake failed this way {count} times in a "
            "row; --retry-forever keeps trying)"
        )
        self.device._wake_all()
        return True

    def _hint_once(self, host: str, port: int, hint: str) -> None:
        """Log ``hint`` about the server at ``host:port`` as a warning, the first time only."""
        if hint not in self._hints_given:
            self._hints_given.add(hint)
            log.warning("server %s:%d %s", host, port, hint)

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
        if self.config.tls_cert is None:
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
            self.config.connect_timeout_s,
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
                    self.config.device_name,
                    # A fresh nonce per connection (PROTOCOL.md §10).
                    auth_nonce=secrets.token_bytes(NONCE_SIZE) if self.token else b"",
                    dictionaries_sha256=self.device.dictionaries_sha256,
                )
            )
        )
        try:
            welcome = await asyncio.wait_for(
                self._handshake(reader, writer, conn), self.config.connect_timeout_s
            )
            self._check_description(welcome, writer, conn)
        except BaseException:
            writer.close()
            raise
        self.conn, self.writer, self.welcome = conn, writer, welcome
        self.pings.clear()
        self._close_reason = None
        # A probe PING within the server's frame limit where it states one (PROTOCOL.md
        # §5.12); --probe-bytes' default fits any server's (64 KiB above its activations).
        limit = None if welcome.description is None else welcome.description.max_frame_bytes
        padding = (
            self.config.probe_bytes
            if limit is None
            else min(self.config.probe_bytes, limit - _PING_ENVELOPE)
        )
        self.trains.max_frame_padding = max(1, padding)
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
                if event.code in _FATAL_CODES:
                    raise DeviceError(f"server refused this device: {event.message}")
                raise ConnectionError(f"server error {event.code.name}: {event.message}")
            raise ConnectionError(f"unexpected {type(event).__name__} during the handshake")

    async def _serve(self, reader: asyncio.StreamReader) -> str:
        """Read until the connection ends; returns why."""
        ping_task = asyncio.create_task(self._ping_loop())
        try:
            assert self.conn is not None and self.writer is not None
            dev = self.device
            while True:
                with dev.link_work():
                    while True:
                        event = self.conn.next_event()
                        if event is NEED_DATA:
                            break
                        why = self._dispatch(event)
                        if why is not None:
                            return why
                data = await reader.read(_READ_CHUNK)
                if not data:
                    return self._close_reason or "server closed the connection"
                self.heard_at = _now()
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
        finally:
            ping_task.cancel()

    def _dispatch(self, event: Any) -> str | None:
        now = _now()
        dev = self.device
        if isinstance(event, Result):
            self.answers_on_link += 1
            dev._on_result(event, now)
        elif isinstance(event, Pong):
            sent = self.pings.pop(event.seq, None)
            if sent is not None and event.seq in self.train:
                self._train_answered(event, now)
            elif sent is not None and event.seq in self.clean_pings:
                self.clean_pings.discard(event.seq)
                dev.profiler.observe_ping(now, now - sent[0])
        elif isinstance(event, Ping):
            self.send(Pong.reply_to(event, time.time()))
        elif isinstance(event, Error):
            if event.request_id is not None:
                self.answers_on_link += 1
                dev._on_request_error(event)
            else:
                if event.code in _FATAL_CODES:
                    self.fatal = DeviceError(f"server refused this device: {event.message}")
                return f"server error {event.code.name}: {event.message}"
        elif isinstance(event, Bye):
            return f"server said bye ({event.reason})"
        return None

    async def _ping_loop(self) -> None:
        try:
            await self._ping_loop_inner()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Without PINGs a dead link would go unnoticed: drop it so it reconnects.
            log.exception("ping loop failed: dropping the link")
            self._abort()

    def _train_answered(self, pong: Pong, now: float) -> None:
        self.train_arrivals[pong.seq] = (pong.received_bytes, pong.received_at)
        if len(self.train_arrivals) < len(self.train):
            return
        answers = [self.train_arrivals[seq] for seq in self.train]
        total = sum(self.train.values())
        if all(n is not None for n, _ in answers):
            arrivals = [(int(n or 0), t) for n, t in answers]
        else:
            # A server that does not count its reads: the frames' ends, a chunk coarser.
            arrivals = list(
                zip(itertools.accumulate(self.train.values()), (t for _, t in answers), strict=True)
            )
        self.train.clear()
        self.train_arrivals.clear()
        profiler = self.device.profiler
        try:
            rate, timed = self.trains.train_answered(
                now, profiler.bandwidth, arrivals, total, profiler.config.initial_bandwidth_bps
            )
        except ValueError as exc:  # offsets that go backwards: a server to ignore
            log.warning("probe train not timed: %s", exc)
            bw = profiler.snapshot(now).bandwidth_bps
            self.trains.answered(now, bw, timed=True, confirm=False)  # round over
            return
        after = profiler.snapshot(now).bandwidth_bps
        log.debug(
            "probe train of %d bytes: %s %.3g bit/s; B %.3g bit/s",
            total,
            "timed at" if timed else "at least",
            rate,
            after,
        )
        self._wake_pinger.set()

    def _send_train(self, now: float) -> None:
        """Write a probe train: padded PINGs back to back (``uplink.ProbeTrains``)."""
        est = self.device.profiler.snapshot(now)
        total = 0
        with self.device.link_work():
            for padding in self.trains.frames(est.bandwidth_bps):
                self.ping_seq += 1
                self.pings[self.ping_seq] = (now, padding)
                size = self.send(Ping(self.ping_seq, now, bytes(padding)))
                if size == 0:
                    return  # the link went down: _drop resets the trains
                self.train[self.ping_seq] = size
                total += size
        self.probe_bytes_sent += total
        self.trains.sent(now, total, len(self.train))

    async def _ping_loop_inner(self) -> None:
        cfg = self.config
        next_bare = self.heard_at = _now()
        bare_sent = 0
        self.trains.reset(next_bare)
        while self.up:
            now = _now()
            if self.pings:
                oldest = min(sent for sent, _ in self.pings.values())
                est = self.device.profiler.snapshot(now)
                # Bytes queued before the PING delay it, and the padding of probes in
                # flight: allow for them at the live B.
                probing = sum(padding for _, padding in self.pings.values())
                allowance = cfg.ping_timeout_s + 8.0 * (self.unanswered_bytes() + probing) / max(
                    est.bandwidth_bps, 1.0
                )
                # A link that keeps answering is alive, however slow: after a drop, bytes
                # queued at the old rate (uploads, a probe) hold the PINGs back for long.
                if now - oldest > allowance and now - self.heard_at > cfg.ping_timeout_s:
                    self._close_reason = (
                        f"closed by the device: no PONG for {now - oldest:.2f} s (allowed "
                        f"{allowance:.2f} s) and nothing heard for "
                        f"{now - self.heard_at:.2f} s, the server is taken as unreachable"
                    )
                    self._abort()
                    return
            if now >= next_bare:
                self.ping_seq += 1
                self.pings[self.ping_seq] = (now, 0)
                if not self.trains.in_flight:
                    # One sent behind a train's padding would time the train, not L.
                    self.clean_pings.add(self.ping_seq)
                with self.device.link_work():
                    self.send(Ping(self.ping_seq, now, b""))
                bare_sent += 1
                # The first few come quicker: L is a median of five (and the first round
                # trip of a connection is slow).
                quick = bare_sent < _QUICK_PINGS
                next_bare = now + (min(0.1, cfg.ping_interval_s) if quick else cfg.ping_interval_s)
            wake = next_bare
            # Trains begin once a bare PING came back: the first round trip of a
            # connection is slow (both ends warm up).
            if cfg.probe_bytes > 0 and self.device.profiler.latency.samples:
                bw = self.device.profiler.snapshot(now).bandwidth_bps
                if self.trains.due(now, bw):
                    self._send_train(now)
                wake = min(wake, self.trains.due_at(now, bw))
            self._wake_pinger.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_pinger.wait(), max(0.0, wake - _now()))

    def _abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.transport.abort()

    def _drop(self, reason: str) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.conn, self.writer, self.welcome = None, None, None
        self.pings.clear()
        self.train.clear()
        self.train_arrivals.clear()
        self.clean_pings.clear()
        self.trains.reset(_now())
        self.device.profiler.mark_server(_now(), False)
        if self._stopping:
            log.info("server link closed: %s", reason)
        else:
            log.warning("server link down: %s", reason)
        self.device._on_link_lost()

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
    """Runs frames through the progressive model, offloading to the server per the policy."""

    def __init__(self, config: DeviceConfig, *, policy: Policy | None = None) -> None:
        from spinn.checkpoint import load_checkpoint

        self.config = config
        workers, threads = plan_workers(config.workers, config.torch_threads)
        configure_torch(threads)
        self.model, self.meta = load_checkpoint(
            config.checkpoint, allow_user_code=config.allow_user_code
        )
        self.model.eval()
        slow_down(self.model, config.slowdown)  # emulation only (DeviceConfig.slowdown)
        self.dictionaries = self._load_dictionaries()
        self.codecs: tuple[str, ...] = (
            (DICT_CODEC, "sparse_int8")
            if self.dictionaries is not None
            # sparse_uintb where the server takes it, at each split's profiled width
            # (PROTOCOL.md §6.9.1), else sparse_int8, which every server takes.
            else (LOSSY_CODEC, "sparse_int8")
            if config.codec == LOSSY_CODEC
            else ("sparse_int8" if config.codec == DICT_CODEC else config.codec,)
        )
        """Activation codecs, preferred first; the last is what every server takes."""
        self.offered_codecs = (*self.codecs, IMAGE_CODEC) if config.image_codec else self.codecs
        """Codecs offered in HELLO: the activation codecs, then the split-0 pixels (§6.8)."""
        self.dictionaries_sha256 = "" if self.dictionaries is None else self.dictionaries.sha256
        profile_path = config.profile or Path(config.checkpoint).with_name("profile.json")
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
        self.num_stages = self.model.num_stages
        split = self.num_stages // 2 if config.split is None else config.split
        if config.server is None and config.split is None:
            split = self.num_stages  # no server: every stage runs here (device-only)
        if not 0 <= split <= self.num_stages:
            raise DeviceError(f"--split must be in 0..{self.num_stages}, got {split}")
        if not 0.0 <= config.thr_conf <= 1.0:
            raise DeviceError(f"--thr must be in [0, 1], got {config.thr_conf}")
        if policy is None:
            if config.policy == "fixed":
                policy = FixedPolicy(split, config.thr_conf)
            else:
                from spinn.scheduler import SchedulerConfig, make_policy

                # Upload sizes predicted with the codec this device packs with
                # (docs/SCHEDULER.md, "Predicted versus measured"); a profile that did not
                # measure it leaves the smallest profiled size.
                codec = profiled_codec(self.codecs[0], config.zstd, self.profile.codecs)
                # sparse_uintb is profiled only at the splits with a width, where it is the
                # smallest size measured: None predicts with it there.
                if codec is None and self.codecs[0] != LOSSY_CODEC:
                    log.warning(
                        "codec %s not in the profile (%s): predicting with the smallest size",
                        self.codecs[0],
                        ", ".join(self.profile.codecs),
                    )
                scheduler_config = SchedulerConfig(
                    codec=codec,
                    input_codec=profiled_input_codec(config, self.profile),
                    lossy=self.codecs[0] == LOSSY_CODEC,
                    # The in-flight window decides the race under load (docs/SCHEDULER.md).
                    max_in_flight=config.max_in_flight,
                )
                try:
                    policy = make_policy(
                        config.policy, self.profile, config.sla or SLA(), scheduler_config
                    )
                except ValueError as exc:
                    raise DeviceError(f"--policy {config.policy}: {exc}") from exc
        self.policy: Policy = policy
        self.profiler = OnlineProfiler(self.profile)
        if config.server is None:
            self.profiler.mark_server(0.0, False)
        self.tracker = RequestTracker()
        self.stats = DeviceStats()
        self.slots = ComputeSlots(workers)
        # The busy-time accounting reads one worker's gaps between calls as hand-off work;
        # with several workers the gaps overlap and the sum is no longer the device's time.
        self._measure_busy = workers == 1
        self._executor: ThreadPoolExecutor = make_executor(workers, "spinn-device")
        self._io: ThreadPoolExecutor = make_executor(1, "spinn-source")
        self._link = _Link(self) if config.server is not None else None
        self._sent: dict[int, _Sent] = {}
        """INFERs the server has not answered (RESULT or ERROR) yet, answered or not here."""
        self._upload_timer = UploadTimer()
        self._server_ms_reported: list[float] = []
        self._server_ms_inferred: list[float] = []
        self._changed: dict[int, asyncio.Event] = {}
        self._labels: dict[int, Frame] = {}
        self._job_end: dict[int, tuple[float, float]] = {}
        """Per worker thread: when its last compute call ended, and ``_link_busy_ms`` then
        (``_worker_call``)."""
        self._link_busy_ms = 0.0
        """Event-loop time spent on the server link so far (sending INFERs and CANCELs,
        reading and handling what the server sent), in ms."""
        self._link_ms_at_upload = 0.0
        """``_link_busy_ms`` at the last upload (``_upload_work``)."""
        self._slot_wait_s: dict[int, float] = {}
        """Per frame in flight: time spent waiting for a compute slot (queueing, not the
        per-input overhead ``OnlineProfiler.observe_answer`` measures)."""
        self._emit: Emit = lambda record: None
        self._decision: Decision = self.policy.decide(0.0, self.profiler.snapshot(0.0))
        self._stop = asyncio.Event()
        self._deadline_wake = asyncio.Event()
        self.frames_read = 0
        """Frames taken from the source (each gets one answer or one error record)."""
        self.errors = 0
        """Frames answered with an error record instead of a classification."""
        self._output_error: OSError | None = None
        """Why the answers could not be written (a closed pipe): the run stops on it."""

    # -- public -----------------------------------------------------------------

    @property
    def server_connects(self) -> int:
        """Successful (re)connections so far."""
        return 0 if self._link is None else self._link.connects

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
        link_task = asyncio.create_task(self._link.run()) if self._link else None
        if link_task is not None:
            link_task.add_done_callback(_log_task_failure)
        deadline_task = asyncio.create_task(self._deadline_loop())
        deadline_task.add_done_callback(_log_task_failure)
        status_task = (
            asyncio.create_task(self._status_loop(status))
            if status is not None and self.config.status_interval_s > 0  # 0: final line only
            else None
        )
        window = asyncio.Semaphore(self.config.max_in_flight)
        frames: set[asyncio.Task[None]] = set()
        pacer = Pacer(self.config.rate_fps)
        iterator = iter(source)
        count = 0
        source_error: Exception | None = None
        try:
            if self._link is not None:
                await self._await_first_connect()
            while not self._stop.is_set():
                if self.config.limit is not None and count >= self.config.limit:
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
                self.frames_read = count
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
            deadline_task.cancel()
            if self._link is not None:
                await self._link.close()
            if link_task is not None:
                link_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await link_task
            source.close()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._io.shutdown(wait=False, cancel_futures=True)
        summary = self.stats.summary(_now())
        summary["cancels"] = self.tracker.cancels
        summary["deadline_expired"] = self.tracker.expired
        summary["lost_connection_frames"] = self.tracker.lost
        summary["server_connects"] = self.server_connects
        summary["frames_read"] = self.frames_read
        summary["errors"] = self.errors
        # Frames begun and never answered: 0 unless the run was interrupted.
        summary["unanswered"] = self.tracker.in_flight
        est = self.profiler.snapshot(_now())
        summary["estimates"] = {
            "bandwidth_bps": round(est.bandwidth_bps, 1),
            # Uploads and probes timed; 0: bandwidth_bps is still the prior.
            "bandwidth_samples": self.profiler.bandwidth.samples,
            "latency_ms": round(est.latency_s * 1e3, 3),
            # Bytes of bandwidth probe trains written (framed), for their overhead.
            "probe_bytes": 0 if self._link is None else self._link.probe_bytes_sent,
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
        summary["split"] = self._decision.split
        summary["thr_conf"] = self._decision.thr_conf
        return summary

    # -- frames -------------------------------------------------------------------

    async def _await_first_connect(self) -> None:
        """Give the first connection a moment so a healthy server is used from frame 0."""
        assert self._link is not None
        deadline = _now() + self.config.connect_timeout_s
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
        try:
            if frame.error:
                # The source could not read it: its answer is this error record.
                log.warning("frame %d: %s", frame.index, frame.error)
                self._fail_frame(frame, SourceError(frame.error))
                return
            await self._process_frame(frame)
        except Exception as exc:
            # Every input gets exactly one answer or an explicit error record: a frame whose
            # processing raised (bad image, a bug) is reported, never silently dropped.
            log.exception("frame %d failed", frame.index)
            self._fail_frame(frame, exc)
        finally:
            self._changed.pop(frame.index, None)
            self._labels.pop(frame.index, None)
            self._slot_wait_s.pop(frame.index, None)
            window.release()

    def _fail_frame(self, frame: Frame, exc: BaseException) -> None:
        """Publish the error record of a frame that cannot be answered."""
        fid = frame.index
        if self.tracker.is_answered(fid):
            return  # answered already; the failure came after (e.g. writing a CANCEL)
        cancel = self.tracker.fail(fid)
        self.errors += 1
        record: dict[str, Any] = {
            "frame": fid,
            "where": "error",
            "error": f"{type(exc).__name__}: {exc}",
        }
        if frame.label is not None:
            record["label"] = frame.label
        if frame.origin:
            record["origin"] = frame.origin
        self._write(record)
        if cancel is not None and self._link is not None:
            self._link.send(Cancel(cancel))

    def _plan(self, decision: Decision) -> _Plan:
        """What one decision means for one frame's execution."""
        last = self.num_stages
        forced = decision.final_exit
        if forced is not None:
            if not 0 <= forced < self.model.num_exits:
                raise DeviceError(
                    f"policy chose exit {forced}; the model has {self.model.num_exits}"
                )
            if forced == self.model.num_exits - 1:
                forced = None
            else:
                # Edgent's right-sized network (spinn.policy.Decision.final_exit) ends here.
                last = self.model.exit_stages[forced] + 1
        split = min(max(decision.split, 0), last)
        rule = decision.exit_rule
        wire_thr, wire_early_exits = rule.to_wire()  # the protocol's form (PROTOCOL.md §5.3)
        if forced is not None and split < last:
            exits_after = [e for e, k in enumerate(self.model.exit_stages) if k >= split]
            if exits_after and exits_after[0] == forced:
                # The truncation exit is the server's first: threshold 0 makes it answer.
                wire_thr, wire_early_exits = ExitRule(0.0).to_wire()
        return _Plan(split, last, rule, wire_thr, forced, wire_early_exits)

    async def _process_frame(self, frame: Frame) -> None:
        loop = asyncio.get_running_loop()
        fid = frame.index
        now = begun = _now()
        estimates = self.profiler.snapshot(now)
        decision = self.policy.decide(now, estimates)
        if decision.reason != self._decision.reason or decision.split != self._decision.split:
            log.info(
                "decision: split %d thr %.2f (%s)",
                decision.split,
                decision.thr_conf,
                decision.reason,
            )
        self._decision = decision
        plan = self._plan(decision)
        self.tracker.begin(fid, now, plan.split, decision.thr_conf)
        self._labels[fid] = frame
        self._changed[fid] = asyncio.Event()
        if self._link is not None and not self._link.up:
            # Decided while the server is unreachable (the policy saw server_up=False):
            # whatever answers this frame is the device standing in for the server.
            self.tracker.server_unavailable(fid)

        self._slot_wait_s[fid] = 0.0
        async with self._slot(fid, 0) as queued:
            head, call = await loop.run_in_executor(
                self._executor,
                self._worker_call,
                self._run_head,
                frame,
                plan,
                estimates.bandwidth_bps,
            )
        answer, activation, packed, stages_ms, reached, pack_ms = head
        now = _now()
        self.profiler.observe_device(now, reached, stages_ms)
        if queued and self._measure_busy:
            # The device's busy time under a saturating stream, hand-off gap included
            # (spinn.estimators.DeviceBusyEstimator; docs/SCHEDULER.md, "device busy time").
            self.profiler.observe_call(
                now, head=True, call_ms=call, stages_ms=stages_ms, stages=reached, pack_ms=pack_ms
            )
        if answer is not None:
            self._local(fid, answer)
            return
        assert activation is not None
        if self._link is not None and self.tracker.phase(fid) is FramePhase.LOCAL:
            if self._link.up:
                self._offload(fid, plan, packed, estimates)
                self._upload_work(pack_ms)
                # Arrival to upload, beyond the stages: the per-input overhead O of an
                # uploaded input (docs/SCHEDULER.md), less the head's wait for its slot.
                waited = self._slot_wait_s.get(fid, 0.0)
                with contextlib.suppress(ValueError):
                    self.profiler.observe_offload(
                        now, plan.split, max(0.0, _now() - begun - waited) * 1e3
                    )
            else:
                self.tracker.server_unavailable(fid)
        # Without a configured server (device-only run) the rest is plain local compute.
        await self._continue(fid, activation, plan)

    def _run_range(self, act: torch.Tensor, start: int, stop: int, plan: _Plan) -> Any:
        """Worker thread: stages [start, stop) with exit checks; a truncated network's
        forced exit always answers (``iter_stages``' ``final_exit``)."""
        from spinn.inference import run_stages

        return run_stages(self.model, act, start, stop, plan.rule, final_exit=plan.forced_exit)

    @contextlib.asynccontextmanager
    async def _slot(self, fid: int, priority: int) -> AsyncIterator[bool]:
        """A compute slot for frame ``fid``; the wait for it is recorded apart.  Yields
        whether the call queued for it (``ComputeSlots.acquire``)."""
        t0 = _now()
        async with self.slots.slot(priority) as queued:
            if fid in self._slot_wait_s:
                self._slot_wait_s[fid] += _now() - t0
            yield queued

    def _worker_call(self, fn: Callable[..., _T], *args: Any) -> tuple[_T, float]:
        """Worker thread: ``fn(*args)`` and the call's busy time in ms: its own run time plus
        the gap since this worker's previous call ended, less the event loop's link work in
        that span (counted per upload instead, ``_upload_work``).  The caller keeps the
        figure only when the call had queued for its slot, i.e. the worker was handed it
        straight from the previous call and the gap was hand-off work, not idleness
        (``spinn.estimators.DeviceBusyEstimator``)."""
        ident = threading.get_ident()
        start = time.perf_counter()
        try:
            result = fn(*args)
        finally:
            end = time.perf_counter()
            link = self._link_busy_ms
            prev_end, prev_link = self._job_end.get(ident, (start, link))
            self._job_end[ident] = (end, link)
        return result, max(0.0, (end - prev_end) * 1e3 - (link - prev_link))

    def _upload_work(self, pack_ms: float) -> None:
        """One upload went out: its packing plus the link work since the previous upload
        is the device's busy time per upload (docs/SCHEDULER.md, "device busy time")."""
        link = self._link_busy_ms
        with contextlib.suppress(ValueError):
            self.profiler.observe_upload_work(_now(), pack_ms + link - self._link_ms_at_upload)
        self._link_ms_at_upload = link

    def _run_range_timed(
        self, act: torch.Tensor, start: int, stop: int, plan: _Plan
    ) -> tuple[Any, float]:
        """Worker thread: ``_run_range`` and its compute time in ms (no hand-off waits)."""
        t0 = time.perf_counter()
        out = self._run_range(act, start, stop, plan)
        return out, (time.perf_counter() - t0) * 1e3

    def _load_dictionaries(self) -> ZstdDictionaries | None:
        """The dictionaries beside the checkpoint when the codec wants them, else None."""
        if self.config.codec != DICT_CODEC:
            return None
        from spinn.dictionaries import dictionaries_path, load_dictionaries

        try:
            found = load_dictionaries(
                self.config.checkpoint, self.meta.model_id, self.model.num_stages
            )
        except DictionaryError as exc:
            raise DeviceError(
                f"--codec {DICT_CODEC}: {exc} (or pack without it: --codec sparse_int8)"
            ) from None
        if found is None:
            log.info(
                "no %s (make it with `spinn dictionaries`): packing with sparse_int8",
                dictionaries_path(self.config.checkpoint),
            )
        return found

    def _run_head(
        self, frame: Frame, plan: _Plan, bandwidth_bps: float
    ) -> tuple[Any, torch.Tensor | None, Any, float, int, float]:
        """Worker thread: preprocess, stages [0, split), pack if the frame goes out; the
        stage and packing times in ms. At split 0 the frame's pixels go out as they are
        where the server takes them (PROTOCOL.md §6.8), as a real client's would."""
        spec = self.model.input_spec
        pixels = input_pixels(frame.image, spec)
        x = spec.preprocess(torch.from_numpy(pixels))
        t0 = time.perf_counter()
        out = self._run_range(x, 0, plan.split, plan)
        stages_ms = (time.perf_counter() - t0) * 1e3
        if out.answer is not None:
            return out.answer, None, None, stages_ms, out.stop, 0.0
        assert out.activation is not None
        packed = None
        pack_ms = 0.0
        if plan.split < plan.last and self._link is not None:
            t1 = time.perf_counter()
            zstd = _ZSTD_MODES[self.config.zstd]
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
        gaps (``_worker_call``, ``_upload_work``; docs/SCHEDULER.md, "device busy time")."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._link_busy_ms += (time.perf_counter() - t0) * 1e3

    def _offload(self, fid: int, plan: _Plan, packed: Any, estimates: Any) -> None:
        with self.link_work():
            self._send_infer(fid, plan, packed, estimates)

    def _send_infer(self, fid: int, plan: _Plan, packed: PackedTensor, estimates: Any) -> None:
        assert self._link is not None
        welcome = self._link.welcome
        packed = recode_for(
            packed,
            self._link.codec,
            self.dictionaries,
            self.config.zstd,
            accepted=welcome.codecs if welcome is not None else (),
            input_spec=self.model.input_spec,
        )
        rid = self.tracker.new_request_id()
        now = _now()
        server_ms = self.profile.server_time_ms(plan.split) * estimates.server_scale
        deadline = request_deadline(
            now,
            upload_bytes=self._link.unanswered_bytes() + packed.nbytes,
            download_bytes=64 + 16 * self.config.top_k,
            bandwidth_bps=max(estimates.bandwidth_bps, 1.0),
            latency_s=estimates.latency_s,
            server_time_s=server_ms / 1e3,
            margin_factor=self.config.deadline_factor,
            margin_s=self.config.deadline_margin_s,
        )
        # deadline_ms lets the server drop a request the device will have answered itself;
        # counted from receipt, so the upload's share of the budget is left out of it.
        server_budget_ms = 1e3 * (deadline - now) * 0.5
        nbytes = self._link.send(
            Infer(
                rid,
                plan.split,
                plan.wire_thr,
                packed,
                deadline_ms=server_budget_ms,
                early_exits=plan.wire_early_exits,
            )
        )
        if nbytes == 0:
            # The link died between the decision and the write (H1: a reset seen by the
            # transport first): the device stands in for the server, answered as fallback.
            self.tracker.server_unavailable(fid)
            return
        self.tracker.offloaded(fid, rid, now, deadline, nbytes)
        self._sent[rid] = _Sent(fid, plan.split, nbytes, now)
        self._deadline_wake.set()

    async def _continue(self, fid: int, activation: torch.Tensor, plan: _Plan) -> None:
        """Stages [split, last) on the device, until an answer exists (DESIGN.md part 7)."""
        loop = asyncio.get_running_loop()
        act = activation
        k = plan.split
        while k < plan.last:
            if self.tracker.is_answered(fid):
                return
            phase = self.tracker.phase(fid)
            if phase is FramePhase.OFFLOADED and not self.config.continue_locally:
                self._changed[fid].clear()
                await self._changed[fid].wait()
                continue
            # A frame the server will not answer is urgent; a race continuation is not.
            priority = 1 if phase is FramePhase.OFFLOADED else 0
            async with self._slot(fid, priority) as queued:
                if self.tracker.is_answered(fid):
                    return
                (out, ms), call = await loop.run_in_executor(
                    self._executor, self._worker_call, self._run_range_timed, act, k, k + 1, plan
                )
            # The race's stages keep SF measured where the head is short or empty (split 0;
            # docs/SCHEDULER.md, "what the predictions do not see").
            now = _now()
            self.profiler.observe_device(now, out.stop, ms, start=k)
            if queued and self._measure_busy:
                self.profiler.observe_call(
                    now, head=False, call_ms=call, stages_ms=ms, stages=out.stop, start=k
                )
            if out.answer is not None:
                self._local(fid, out.answer)
                return
            act = out.activation
            k += 1
        raise RuntimeError(f"frame {fid}: no exit answered after the last stage")

    # -- answers ---------------------------------------------------------------------

    def _local(self, fid: int, exit_answer: Any) -> None:
        now = _now()
        top = exit_answer.topk(self.config.top_k)
        answer, cancel = self.tracker.local_answer(
            fid, now, exit_answer.exit, tuple(c for c, _ in top), tuple(p for _, p in top)
        )
        if answer is not None:
            # The whole answer came from the device: latency less the scaled stage times is
            # the per-input overhead the predictions add (docs/SCHEDULER.md).
            # Waits for a compute slot are queueing behind other frames, which the
            # predictions exclude (a paced input does not wait): they are left out.
            waited = self._slot_wait_s.get(fid, 0.0)
            with contextlib.suppress(ValueError):
                self.profiler.observe_answer(
                    now, answer.exit_index, max(0.0, answer.latency_s - waited) * 1e3
                )
            self._publish(answer, now)
        # The answer is out before the CANCEL is written: a failing write can only lose the
        # CANCEL (the server then answers a request nobody awaits), never the answer.
        if cancel is not None and self._link is not None:
            # Its _Sent record stays: a RESULT that crossed the CANCEL still measures the link.
            with self.link_work():
                self._link.send(Cancel(cancel))

    def _implausible(self, result: Result) -> str | None:
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

    def _on_result(self, result: Result, now: float) -> None:
        problem = self._implausible(result)
        if problem is not None:
            self._sent.pop(result.request_id, None)
            log.warning("server answered request %d with %s", result.request_id, problem)
            self._wake(self.tracker.abandon(result.request_id))
            return
        sent = self._sent.pop(result.request_id, None)
        if sent is not None:
            elapsed = now - sent.sent_at
            response_bytes = 64 + 16 * len(result.classes)
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
            # Upload time from the answer time (spinn.runtime.uplink), less the time the
            # server held the request: all of it (held_ms), else its compute alone (a server
            # that does not send held_ms: its queue wait is then unknown). Without either
            # the server time hides in it: PING probes only.
            held_ms = result.compute_ms if result.held_ms is None else result.held_ms
            self._time_upload(
                sent,
                now,
                None if held_ms is None else held_ms / 1e3,
                queue_known=result.held_ms is not None,
            )
        answer = self.tracker.server_result(
            result.request_id, now, result.exit_index, result.classes, result.probs
        )
        if answer is not None:
            self._publish(answer, now)
            ev = self._changed.get(answer.frame_id)
            if ev is not None:
                ev.set()

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
            self.profiler.observe_upload(now, sample[0], sample[1], uploads)

    def _on_request_error(self, error: Error) -> None:
        assert error.request_id is not None
        sent = self._sent.pop(error.request_id, None)
        if sent is not None:
            # A refusal (BUSY, a bad tensor or split) is answered on arrival: it clocks the
            # uplink like a RESULT. A cancelled or expired request is answered when the
            # CANCEL reaches it or a worker picks it up: a bound (spinn.runtime.uplink).
            if error.code in _ANSWERED_ON_ARRIVAL:
                self._time_upload(sent, _now(), 0.0)
            elif error.code is ErrorCode.CANCELLED:
                self._time_upload(sent, _now(), 0.0, bound=True)
        fid = self.tracker.abandon(error.request_id)
        if error.code in (ErrorCode.CANCELLED, ErrorCode.BUSY):
            # Expected under load and after CANCEL; the frame finishes locally.
            log.debug("request %d: %s: %s", error.request_id, error.code.name, error.message)
        else:
            log.warning("server refused request %d: %s", error.request_id, error.message)
        self._wake(fid)

    def _wake(self, frame_id: int | None) -> None:
        """Wake the frame waiting on its request, if it still waits: it finishes locally."""
        ev = None if frame_id is None else self._changed.get(frame_id)
        if ev is not None:
            ev.set()

    def _on_link_lost(self) -> None:
        self._sent.clear()
        self._upload_timer.reset()
        for fid in self.tracker.server_lost():
            ev = self._changed.get(fid)
            if ev is not None:
                ev.set()

    def _wake_all(self) -> None:
        for ev in self._changed.values():
            ev.set()
        self._stop.set()

    def _publish(self, answer: Answer, now: float) -> None:
        frame = self._labels.get(answer.frame_id)
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
        names = self.meta.class_names
        if names and 0 <= answer.classes[0] < len(names):
            record["class_name"] = names[answer.classes[0]]
        if label is not None:
            record["label"] = label
        if frame is not None and frame.origin:
            record["origin"] = frame.origin
        self._write(record)

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

    async def _deadline_loop(self) -> None:
        while True:
            nxt = self.tracker.next_deadline()
            self._deadline_wake.clear()
            timeout = None if nxt is None else max(0.0, nxt - _now())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._deadline_wake.wait(), timeout)
            try:
                self._expire_requests()
            except Exception:
                # One failure must not end deadline fallbacks for the rest of the run.
                log.exception("deadline check failed")

    def _expire_requests(self) -> None:
        for exp in self.tracker.expire(_now()):
            log.info("request %d missed its deadline: finishing locally", exp.request_id)
            # Wake the frame before the (guarded) CANCEL write, so it finishes locally even
            # if the write fails.
            ev = self._changed.get(exp.frame_id)
            if ev is not None:
                ev.set()
            if self._link is not None:
                self._link.send(Cancel(exp.request_id))

    async def _status_loop(self, status: Status) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            self._show_status(status)

    def _show_status(self, status: Status) -> None:
        now = _now()
        est = self.profiler.snapshot(now)
        status(
            self.stats.status_line(
                now,
                split=self._decision.split,
                thr_conf=self._decision.thr_conf,
                bandwidth_bps=est.bandwidth_bps,
                latency_s=est.latency_s,
                server_up=None if self._link is None else self._link.up,
            )
        )


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


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


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
