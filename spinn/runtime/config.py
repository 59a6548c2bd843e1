"""What the device and the server are told: their configurations, grouped by concern.

Each end takes one frozen dataclass made of smaller ones (STYLE.md habit 5), every field
documented where it is defined, with its default:

- :class:`DeviceConfig`: ``source`` (the frames read), ``link`` (the connection to the
  server, its codecs and its security), ``policy`` (how split and exit threshold are
  chosen, and when an offloaded frame is given up), ``compute`` (the model and the
  threads that run it) and ``output`` (what is reported);
- :class:`ServerConfig`: ``compute`` (the model, the codecs it accepts and the threads
  and batches that run it), ``limits`` (what one peer, and all of them, may hold),
  ``security`` (TLS and the shared token) and ``operations`` (addresses, logs, metrics).

A bad value raises :class:`ConfigError` from the group's ``__post_init__``, naming the
field by its path (``link.probe_bytes must be in [0, 1048576], got -1``); the command
lines translate these paths into their flags (``spinn.runtime.flags``). Neither end
imports the other for its configuration, and this module imports nothing of asyncio,
torch or either end, so a pure core may take its configuration from here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from protocol import ConnectionConfig
from protocol.packing import DICT_CODEC, IMAGE_CODEC, KNOWN_CODECS
from spinn.decisions.sla import SLA
from spinn.pretrained import DEFAULT_CHECKPOINT

__all__ = [
    "ACTIVATION_CODECS",
    "DEVICE_CHOICES",
    "MAX_PROBE_BYTES",
    "SERVER_BUDGET_SHARE",
    "ZSTD_MODES",
    "ConfigError",
    "DeviceComputeConfig",
    "DeviceConfig",
    "LimitsConfig",
    "LinkConfig",
    "OperationsConfig",
    "OutputConfig",
    "PolicyConfig",
    "SecurityConfig",
    "ServerComputeConfig",
    "ServerConfig",
    "SourceConfig",
    "check_device_name",
    "config_fields",
]

ACTIVATION_CODECS = tuple(c for c in KNOWN_CODECS if c != IMAGE_CODEC)
"""The activation codecs a device may pack with: every codec but the split-0 one."""
ZSTD_MODES: dict[str, bool | None] = {"auto": None, "always": True, "never": False}
"""``LinkConfig.zstd`` → pack's `compress` (None: the packer decides from the bandwidth)."""
MAX_PROBE_BYTES = 1 << 20
"""Largest probe padding: it crosses the link while everything queued behind it waits."""
SERVER_BUDGET_SHARE = 0.5
"""Share of a request's deadline (from now) the INFER grants the server as ``deadline_ms``
(PROTOCOL.md §5.3). The server counts it from receipt, so the upload's part of the device's
budget must be left out of it: the server then drops a request the device will have
answered itself by the time a RESULT could come back."""
DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""Values of ``ServerComputeConfig.device`` besides ``cuda:N``."""
_MAX_OUTSTANDING = ConnectionConfig().max_outstanding
"""Unanswered INFERs one connection may hold: ``max_queue_per_connection`` cannot exceed it."""


class ConfigError(ValueError):
    """A configuration field holds a bad value; the message names it by its path."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path} {message}")


def check_device_name(name: str, path: str = "compute.device") -> None:
    """ConfigError unless ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a number)."""
    if name in DEVICE_CHOICES or re.fullmatch(r"cuda:[0-9]+", name):
        return
    raise ConfigError(
        f"{path}: unknown {name!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N"
    )


# -- the device ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """The frames the device reads, and how many it works on at once."""

    rate_fps: float | None = None
    """Frame rate of the source replay; None or 0 = as fast as possible."""
    limit: int | None = None
    """Stop after this many frames."""
    max_in_flight: int = 4
    """Frames begun but not answered at most (bounds the pipelining window)."""

    def __post_init__(self) -> None:
        if self.rate_fps is not None and not (math.isfinite(self.rate_fps) and self.rate_fps >= 0):
            # Checked here as well as by the Pacer: before the model loads and tasks start.
            raise _fail("source.rate_fps", f"must be a finite number >= 0, got {self.rate_fps}")
        if self.limit is not None and self.limit < 0:
            raise _fail("source.limit", f"must be >= 0, got {self.limit}")
        if self.max_in_flight < 1:
            raise _fail("source.max_in_flight", f"must be >= 1, got {self.max_in_flight}")


@dataclass(frozen=True)
class LinkConfig:
    """The device's connection to its servers: addresses, codecs, probes, timers, security."""

    server: tuple[str, int] | None = ("127.0.0.1", 7878)
    """Server address; None runs device-only and never connects."""
    extra_servers: tuple[tuple[str, int], ...] = ()
    """Further server addresses: on an outage the device fails over to the next one
    (``spinn.runtime.failover``)."""
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
    ping_interval_s: float = 0.5
    """Period of bare PINGs while connected (latency L, and a dead link noticed)."""
    probe_bytes: int = 61_440
    """Padding of the largest PING of a bandwidth probe train (``uplink.ProbeTrains``);
    0 sends no trains (B then comes from uploads alone)."""
    probe_share: float = 0.03
    """Fraction of the link the probe trains take at the estimated bandwidth."""
    ping_timeout_s: float = 1.5
    """Unanswered PING this long (plus the time queued bytes need at B) = link dead."""
    connect_timeout_s: float = 2.0
    """TCP connect plus handshake must complete within this."""
    reconnect_base_s: float = 0.1
    """First reconnect delay scale (exponential backoff with jitter)."""
    reconnect_cap_s: float = 2.0
    """Longest reconnect delay before jitter."""
    seed: int = 0
    """Seed of the reconnect jitter."""
    device_name: str = "spinn-device"
    """Name sent in HELLO."""
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
        if self.zstd not in ZSTD_MODES:
            raise _fail("link.zstd", f"must be one of {', '.join(ZSTD_MODES)}, got {self.zstd!r}")
        if self.codec not in ACTIVATION_CODECS:
            # uint8_image is the split-0 codec, offered beside this one (image_codec).
            raise ConfigError(
                f"link.codec: unknown {self.codec!r}; choose one of {', '.join(ACTIVATION_CODECS)}"
            )
        if not 0 <= self.probe_bytes <= MAX_PROBE_BYTES:
            raise _fail(
                "link.probe_bytes", f"must be in [0, {MAX_PROBE_BYTES}], got {self.probe_bytes}"
            )
        if not 0.0 < self.probe_share <= 0.5:
            raise _fail("link.probe_share", f"must be in (0, 0.5], got {self.probe_share}")
        for name in ("ping_interval_s", "ping_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise _fail(f"link.{name}", f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.reconnect_base_s <= self.reconnect_cap_s:
            raise _fail(
                "link.reconnect_base_s",
                f"must be > 0 and at most link.reconnect_cap_s ({self.reconnect_cap_s}), "
                f"got {self.reconnect_base_s}",
            )
        if self.misconfig_tries < 1:
            raise _fail("link.misconfig_tries", f"must be >= 1, got {self.misconfig_tries}")
        if (self.tls_cert is not None or self.tls_key is not None) and not self.use_tls:
            raise _fail("link.tls_cert/link.tls_key", "need link.tls or link.tls_ca")

    @property
    def server_addresses(self) -> tuple[tuple[str, int], ...]:
        """Every configured server address, ``server`` first (empty when device-only)."""
        return () if self.server is None else (self.server, *self.extra_servers)

    @property
    def use_tls(self) -> bool:
        """Whether the link speaks TLS."""
        return self.tls or self.tls_ca is not None


@dataclass(frozen=True)
class PolicyConfig:
    """How split and exit threshold are chosen, and when an offloaded frame is given up."""

    policy: str = "fixed"
    """``fixed`` (split/thr_conf below) or a name of ``spinn.decisions.baselines.POLICY_NAMES``."""
    sla: SLA | None = None
    """Service-level agreement for the scheduler policies (None = the SLA defaults)."""
    profile: Path | None = None
    """Offline profile; None = ``profile.json`` beside the checkpoint."""
    split: int | None = None
    """Fixed split for ``FixedPolicy``; None = the middle split ``S // 2`` (``S`` without
    a server)."""
    thr_conf: float = 0.8
    """Fixed exit threshold for ``FixedPolicy``."""
    continue_locally: bool = True
    """Keep computing after the split while the server works (first answer wins)."""
    deadline_factor: float = 3.0
    """A RESULT is awaited ``factor ×`` its expected time (2L + bytes/B + server time)…"""
    deadline_margin_s: float = 0.1
    """…plus this, before the frame is finished locally as ``fallback``."""
    server_budget_share: float = SERVER_BUDGET_SHARE
    """Share of a request's deadline granted to the server as INFER's ``deadline_ms``
    (``SERVER_BUDGET_SHARE``): counted from receipt, it leaves the upload's part out, so
    the server drops a request the device will have answered."""

    def __post_init__(self) -> None:
        # Finite: the deadline it scales goes on the wire, which carries no inf or nan.
        if not (math.isfinite(self.deadline_factor) and 1 <= self.deadline_factor <= 1e6):
            raise _fail(
                "policy.deadline_factor", f"must be in [1, 1e6], got {self.deadline_factor}"
            )
        if not (math.isfinite(self.deadline_margin_s) and self.deadline_margin_s >= 0):
            raise _fail(
                "policy.deadline_margin_s",
                f"must be a finite number >= 0, got {self.deadline_margin_s}",
            )
        if not 0.0 < self.server_budget_share <= 1.0:
            raise _fail(
                "policy.server_budget_share",
                f"must be in (0, 1], got {self.server_budget_share}",
            )


@dataclass(frozen=True)
class DeviceComputeConfig:
    """The device's model and the threads that run it."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    """Checkpoint of the progressive model (must match the server's)."""
    allow_user_code: bool = False
    """Import the module a checkpoint of a user model ('module:callable') names to rebuild
    it; off, such a checkpoint is refused (``spinn.model.checkpoint.load_checkpoint``)."""
    workers: int | None = 1
    """Device compute threads; a weak device computes one thing at a time."""
    torch_threads: int = 1
    """Torch intra-op threads per device worker."""
    slowdown: float = 1.0
    """Emulate a weaker device: after each stage and exit head the worker waits (K−1)× the
    time it took (``spinn.runtime.compute.slow_down``), so device compute takes K× as long
    (bench/paper.py, one machine for both ends)."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise _fail("compute.workers", f"must be >= 1, got {self.workers}")
        if self.torch_threads < 1:
            raise _fail("compute.torch_threads", f"must be >= 1, got {self.torch_threads}")
        if not 1.0 <= self.slowdown <= 1000.0:
            raise _fail("compute.slowdown", f"must be in [1, 1000], got {self.slowdown}")


@dataclass(frozen=True)
class OutputConfig:
    """What the device reports per frame and while it runs."""

    top_k: int = 5
    """Classes reported per frame."""
    status_interval_s: float = 0.5
    """Period of the live status line; 0 disables it."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise _fail("output.top_k", f"must be >= 1, got {self.top_k}")
        if not self.status_interval_s >= 0:
            raise _fail("output.status_interval_s", f"must be >= 0, got {self.status_interval_s}")


_C = TypeVar("_C")


def _groups(cls: type[Any]) -> dict[str, Callable[..., Any]]:
    """Group name → its class, for a configuration made of groups."""
    out: dict[str, Callable[..., Any]] = {}
    for group in dataclasses.fields(cls):
        assert callable(group.default_factory), group.name
        out[group.name] = group.default_factory
    return out


def _group_of(cls: type[Any]) -> dict[str, str]:
    """Field name → the group holding it, for a configuration made of groups."""
    out: dict[str, str] = {}
    for name, group in _groups(cls).items():
        for f in dataclasses.fields(group()):
            assert f.name not in out, f"{cls.__name__}: field {f.name} in two groups"
            out[f.name] = name
    return out


def _from_fields(cls: type[_C], fields: dict[str, Any]) -> _C:
    groups = cls._GROUP_OF  # type: ignore[attr-defined]
    unknown = sorted(set(fields) - set(groups))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    kwargs: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        kwargs.setdefault(groups[name], {})[name] = value
    types = _groups(cls)
    return cls(**{g: types[g](**kw) for g, kw in kwargs.items()})


@dataclass(frozen=True)
class DeviceConfig:
    """Everything the device needs, by concern; the CLI only fills this in."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """The frames read and the pipelining window."""
    link: LinkConfig = field(default_factory=LinkConfig)
    """The connection to the servers."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Split, threshold and deadlines."""
    compute: DeviceComputeConfig = field(default_factory=DeviceComputeConfig)
    """The model and its threads."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """What is reported."""

    _GROUP_OF: ClassVar[dict[str, str]]

    @classmethod
    def from_fields(cls, **fields: Any) -> DeviceConfig:
        """The configuration with these fields, named without their group (field names are
        unique across groups), and the defaults elsewhere: ``from_fields(server=None)``."""
        return _from_fields(cls, fields)


DeviceConfig._GROUP_OF = _group_of(DeviceConfig)


# -- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerComputeConfig:
    """The model the server runs after the split, the codecs it accepts, and the threads
    and batches that run it."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    """Checkpoint whose server part is served (default: the shipped model)."""
    allow_user_code: bool = False
    """Import the module a checkpoint of a user model ('module:callable') names to rebuild
    it; off, such a checkpoint is refused (``spinn.model.checkpoint.load_checkpoint``)."""
    dictionaries: bool = True
    """Load the zstd dictionaries beside the checkpoint (``model.zdict``), when there, and
    accept the sparse_int8_zdict codec from devices holding the same (PROTOCOL.md §6.7)."""
    image_codec: bool = True
    """Accept uint8_image at split 0: the frame's pixels, which the server normalises with
    the model's input spec (PROTOCOL.md §6.8). Off, devices send the float input there, as
    to a server that does not know the codec."""
    workers: int | None = None
    """Compute threads; None = cores // torch_threads, so the pool never oversubscribes."""
    torch_threads: int = 1
    """Torch intra-op threads per worker (batch-1 requests gain little from more)."""
    report_compute: bool = True
    """Send the compute time in RESULT; off makes devices infer it (DESIGN.md part 4)."""
    top_k: int = 5
    """Classes returned per RESULT."""
    batch_max: int = 1
    """Dynamic batching (``spinn.runtime.batching``): most requests for one split run as
    one forward pass. 1 (default) = off: each request runs alone, as before."""
    batch_wait_ms: float = 2.0
    """With batching, how long the oldest request of a split may wait for others while a
    worker is free; while all workers are busy, batches fill up regardless."""
    device: str = "auto"
    """Torch device of the server's compute: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``
    (CUDA when torch sees a GPU; ``spinn.runtime.accel``)."""
    slowdown: float = 1.0
    """Emulate a loaded or weaker server: after each stage and exit head the worker waits
    (K−1)× the time it took (``spinn.runtime.compute.slow_down``); the reported compute time
    includes the wait (bench/paper.py, server load)."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise _fail("compute.workers", f"must be >= 1, got {self.workers}")
        if self.torch_threads < 1:
            raise _fail("compute.torch_threads", f"must be >= 1, got {self.torch_threads}")
        if self.top_k < 1:
            raise _fail("compute.top_k", f"must be >= 1, got {self.top_k}")
        if not 1 <= self.batch_max <= 1024:
            raise _fail("compute.batch_max", f"must be in 1..1024, got {self.batch_max}")
        if not 0.0 <= self.batch_wait_ms <= 1000.0:
            raise _fail("compute.batch_wait_ms", f"must be in [0, 1000], got {self.batch_wait_ms}")
        check_device_name(self.device)
        if not 1.0 <= self.slowdown <= 1000.0:
            raise _fail("compute.slowdown", f"must be in [1, 1000], got {self.slowdown}")


@dataclass(frozen=True)
class LimitsConfig:
    """What one peer, and all of them together, may hold of the server (safe defaults)."""

    max_queue_per_connection: int = 256
    """Requests one device may have queued or running; beyond that INFER gets ERROR(BUSY)."""
    max_queued: int = 512
    """Requests queued or running over all devices; beyond that INFER gets ERROR(BUSY)."""
    max_connections: int = 256
    """Devices connected at once (through the handshake); one more gets a fatal
    ERROR(BUSY) and is closed. Connections still in the handshake never take these slots."""
    max_handshakes: int = 128
    """Connections in the handshake at once (HELLO, authentication), in a pool of their
    own. When it is full, room is made by closing the oldest that has sent nothing, else
    the oldest that has had a second; with neither, the new connection is shed at once:
    fatal ERROR(BUSY) (``spinn.runtime.admission.HandshakePool``)."""
    max_handshakes_per_address: int | None = None
    """Connections in the handshake at once from one source address; None: no limit (a
    fleet behind one NAT address would otherwise be limited as one peer)."""
    max_ping_rate: float = 50.0
    """PINGs a connection may send a second (bursts of twice this); above, a fatal
    ERROR(TOO_LARGE). A device pings every 0.5 s."""
    max_unknown_cancel_rate: float = 200.0
    """CANCELs for request ids the server does not hold (already answered, or never
    sent) a connection may send a second (bursts of twice this); above, a fatal
    ERROR(TOO_LARGE). A device cancels only what it sent."""
    max_frame_bytes: int | None = None
    """Largest frame accepted, which bounds each connection's receive buffer (and so the
    server's memory: about ``max_connections`` × this). None (default): derived from the
    served model by ``frame_limit_for`` — the largest float32 activation at any split plus
    a quarter and 64 KiB for the message envelope and PING probes (≈ 95 KiB for the
    shipped model). Larger frames: fatal ERROR(TOO_LARGE)."""
    max_tensor_elements: int = 2**22
    """Largest activation an INFER may declare, in elements (16 MiB as float32)."""
    handshake_timeout_s: float = 5.0
    """TLS, HELLO and authentication must be done this long after accepting."""
    idle_timeout_s: float = 60.0
    """A connection that delivers no complete frame for this long, with none of its
    requests outstanding, is closed: devices PING every 0.5 s, while a slow-loris peer
    trickling a frame never completes one. A device waiting on its answers from a busy
    server is not idle; the clock restarts when its last request is answered."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_queue_per_connection <= _MAX_OUTSTANDING:
            raise _fail(
                "limits.max_queue_per_connection",
                f"must be in 1..{_MAX_OUTSTANDING} (unanswered requests a connection may "
                f"hold), got {self.max_queue_per_connection}",
            )
        if self.max_handshakes_per_address is not None and self.max_handshakes_per_address < 1:
            raise _fail(
                "limits.max_handshakes_per_address",
                f"must be >= 1 (or unset), got {self.max_handshakes_per_address}",
            )
        for name in ("max_ping_rate", "max_unknown_cancel_rate"):
            if not getattr(self, name) > 0:
                raise _fail(f"limits.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("max_queued", "max_connections", "max_handshakes", "max_tensor_elements"):
            if getattr(self, name) < 1:
                raise _fail(f"limits.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.max_frame_bytes is not None and not 1024 <= self.max_frame_bytes <= 2**32 - 1:
            raise _fail(
                "limits.max_frame_bytes",
                f"must be in [1024, 2**32 - 1], got {self.max_frame_bytes}",
            )
        for name in ("handshake_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise _fail(f"limits.{name}", f"must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SecurityConfig:
    """The server's TLS and shared token (PROTOCOL.md §10)."""

    token_file: Path | None = None
    """Shared token (PROTOCOL.md §10); devices must prove it. None: no authentication."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the server; with ``tls_key`` the server speaks TLS."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """CA that must have signed the devices' certificates (mutual TLS); None: not required."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise _fail("security.tls_cert", "and security.tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise _fail("security.tls_client_ca", "needs security.tls_cert and security.tls_key")


@dataclass(frozen=True)
class OperationsConfig:
    """Where the server listens, what it logs and exposes, and how it stops."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 7878
    """TCP port; 0 picks a free one (see ``SpinnServer.port``)."""
    server_name: str = "spinn-server"
    """Name sent in WELCOME."""
    stats_interval_s: float = 10.0
    """Period of the stats log line; 0 disables it."""
    shutdown_grace_s: float = 5.0
    """On SIGINT/SIGTERM, how long in-flight requests may still finish."""
    metrics_port: int | None = None
    """Port of the Prometheus ``/metrics`` endpoint (``spinn.runtime.prometheus_metrics``); None: off,
    0: a free one (see ``SpinnServer.metrics_port``)."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint: loopback unless the operator exposes it."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise _fail("operations.port", f"must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise _fail("operations.metrics_port", f"must be in 0..65535, got {self.metrics_port}")
        if not self.stats_interval_s >= 0:
            raise _fail("operations.stats_interval_s", f"must be >= 0, got {self.stats_interval_s}")
        if not self.shutdown_grace_s >= 0:
            raise _fail("operations.shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, by concern; the CLI only fills this in."""

    compute: ServerComputeConfig = field(default_factory=ServerComputeConfig)
    """The model, the codecs accepted, workers and batching."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """What peers may hold."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """TLS and the shared token."""
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    """Addresses, logs, metrics, shutdown."""

    _GROUP_OF: ClassVar[dict[str, str]]

    @classmethod
    def from_fields(cls, **fields: Any) -> ServerConfig:
        """The configuration with these fields, named without their group (field names are
        unique across groups), and the defaults elsewhere: ``from_fields(port=0)``."""
        return _from_fields(cls, fields)


ServerConfig._GROUP_OF = _group_of(ServerConfig)


def config_fields(cls: type[DeviceConfig] | type[ServerConfig]) -> dict[str, Any]:
    """Every field of a configuration by its path (``link.probe_bytes``) → its default."""
    out: dict[str, Any] = {}
    for name, group in _groups(cls).items():
        instance = group()
        for f in dataclasses.fields(instance):
            out[f"{name}.{f.name}"] = getattr(instance, f.name)
    return out
