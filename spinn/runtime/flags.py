"""The command-line flags of ``spinn-device`` and ``spinn-server``: one table per end.

Each row ties a flag to the configuration field it sets (``spinn.runtime.config``) and
holds its help text; defaults are read from the configuration, never written here, and
shown in the help through ``{default}``. From the same table come the parser (grouped by
the configuration's concerns), the configuration the parsed flags describe, and the
translation of a configuration error into the flags to fix
(``link.probe_bytes must be ...`` → ``--probe-bytes must be ...``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinn.decisions.baselines import POLICY_NAMES
from spinn.decisions.sla import DEFAULT_RANK, SLA, SLAError
from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.runtime.config import (
    ACTIVATION_CODECS,
    MAX_PROBE_BYTES,
    ZSTD_MODES,
    DeviceConfig,
    ServerConfig,
    config_fields,
)

__all__ = [
    "DEVICE_FLAGS",
    "SERVER_FLAGS",
    "SLA_FLAGS",
    "Flag",
    "FlagGroup",
    "FlagTable",
    "host_ports",
    "sla_flags_given",
    "sla_from_args",
]


@dataclass(frozen=True)
class Flag:
    """One command-line flag."""

    names: tuple[str, ...]
    """The flag and its aliases, the first one naming it (``("--checkpoint", "--model")``)."""
    help: str
    """Help text; ``{default}`` stands for the field's default, ``{link.probe_share:.0%}``
    for another field's (with an optional format)."""
    field: str | None = None
    """The configuration field it sets, by path (``link.probe_bytes``); None for a flag
    that sets none (the frame source, logging)."""
    type: Callable[[str], Any] | None = None
    """Parser of its value; None for a switch or a string."""
    switch: bool = False
    """A flag without a value: it sets a boolean field to the opposite of its default."""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    append: bool = False
    """May be repeated; the values are collected in a list."""
    derived: bool = False
    """The field is computed by the command line from this flag and others (``--server``
    and ``--device-only``; the SLA); the generic conversion leaves it alone."""
    exclusive: bool = False
    """One of the group's required, mutually exclusive flags (the frame source)."""

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace that holds its value."""
        long = next(n for n in self.names if n.startswith("--"))
        return long.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class FlagGroup:
    """Flags shown together in ``--help``: one concern of the configuration."""

    title: str
    flags: tuple[Flag, ...]
    description: str | None = None


@dataclass(frozen=True)
class FlagTable:
    """All the flags of one command, and the configuration they fill."""

    config: type[DeviceConfig] | type[ServerConfig]
    groups: tuple[FlagGroup, ...]

    @property
    def flags(self) -> tuple[Flag, ...]:
        """Every flag of the table, in help order."""
        return tuple(f for g in self.groups for f in g.flags)

    def build_parser(self, prog: str, description: str) -> argparse.ArgumentParser:
        """The parser of these flags, with the help grouped as the table is."""
        defaults = config_fields(self.config)
        parser = argparse.ArgumentParser(prog=prog, description=description)
        for group in self.groups:
            g = parser.add_argument_group(group.title, group.description)
            exclusive = [f for f in group.flags if f.exclusive]
            choice = g.add_mutually_exclusive_group(required=True) if exclusive else None
            for flag in group.flags:
                target = choice if flag.exclusive and choice is not None else g
                _add(target, flag, defaults)
        return parser

    def config_from_args(self, args: argparse.Namespace, **derived: Any) -> Any:
        """The configuration the parsed flags describe: each flag given sets its field,
        ``derived`` (fields by name) the fields the command line computes itself, and the
        defaults the rest. A bad value raises ``ConfigError`` naming the field."""
        values: dict[str, Any] = {}
        for flag in self.flags:
            if flag.field is None or flag.derived:
                continue
            value = getattr(args, flag.dest)
            if value is None or (flag.switch and not value):
                continue  # not given: the configuration's default
            name = flag.field.split(".", 1)[1]
            values[name] = (not _default_of(self.config, flag.field)) if flag.switch else value
        return self.config.from_fields(**values, **derived)

    def flag_text(self, message: str) -> str:
        """``message`` with each configuration field it names replaced by its flag; a
        switch's field followed by the state the switch sets (``compute.dictionaries off``)
        is the switch alone (``--no-dictionaries``)."""
        flags = {f.field: f for f in self.flags if f.field is not None}
        defaults = config_fields(self.config)
        pattern = re.compile(
            r"(?<![\w.])(" + "|".join(re.escape(p) for p in sorted(flags, key=len, reverse=True))
            + r")(?![\w])( (?:on|off)\b)?"
        )  # fmt: skip

        def sub(m: re.Match[str]) -> str:
            flag, state = flags[m.group(1)], m.group(2)
            if state and flag.switch and (state == " on") != defaults.get(m.group(1), True):
                return flag.names[0]
            return flag.names[0] + (state or "")

        return pattern.sub(sub, message)


def _default_of(config: type[DeviceConfig] | type[ServerConfig], path: str) -> Any:
    return config_fields(config)[path]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"  # an address
    return str(value)


def _add(target: Any, flag: Flag, defaults: Mapping[str, Any]) -> None:
    # {default}: the flag's own field; {group.field}: another field's default.
    def value(m: re.Match[str]) -> str:
        path = flag.field if m.group(1) == "default" else m.group(1)
        assert path is not None, flag.names
        found = defaults[path]
        return format(found, m.group(2)) if m.group(2) else _show(found)

    text = re.sub(r"\{([\w.]+)(?::([^}]*))?\}", value, flag.help)
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "dest": flag.dest}
    if flag.switch:
        kwargs["action"] = "store_true"
    else:
        kwargs["default"] = None
        if flag.append:
            kwargs["action"] = "append"
        for key in ("type", "choices", "metavar"):
            if getattr(flag, key) is not None:
                kwargs[key] = getattr(flag, key)
    target.add_argument(*flag.names, **kwargs)


# -- value parsers ---------------------------------------------------------------------------


def host_ports(value: str) -> tuple[tuple[str, int], ...]:
    """``--server HOST:PORT[,HOST:PORT...]``: the addresses, or a usage error naming them."""
    from spinn.runtime.failover import parse_addresses

    try:
        return parse_addresses(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {x}")
    return x


# -- the shared rows -------------------------------------------------------------------------

_USER_CODE = (
    "trust and import the model code the checkpoint names (a model trained with spinn train "
    "--arch package.module:callable; the module must be importable)"
)
_LOGGING = (
    Flag(("-v", "--verbose"), "debug logging", switch=True),
    Flag(("-q", "--quiet"), "warnings and errors only", switch=True),
)

SLA_FLAGS = FlagGroup(
    "service-level agreement (docs/SCHEDULER.md)",
    (
        Flag(("--sla",), "SLA file (.toml or .json) of these keys; flags override it",
             field="policy.sla", metavar="FILE", derived=True),
        Flag(("--max-latency-ms",), "limit: expected end-to-end latency per input at most MS",
             field="policy.sla.max_latency_ms", type=float, metavar="MS", derived=True),
        Flag(("--min-throughput",), "limit: sustained inferences per second at least PER_S",
             field="policy.sla.min_throughput", type=float, metavar="PER_S", derived=True),
        Flag(("--max-server-cost-ms",), "limit: expected server compute per input at most MS",
             field="policy.sla.max_server_cost_ms", type=float, metavar="MS", derived=True),
        Flag(("--max-device-cost-ms",), "limit: expected device compute per input at most MS",
             field="policy.sla.max_device_cost_ms", type=float, metavar="MS", derived=True),
        Flag(("--min-accuracy",),
             "limit: accuracy on the profile's calibration set at least FRACTION (0..1)",
             field="policy.sla.min_accuracy", type=float, metavar="FRACTION", derived=True),
        Flag(("--rank",),
             "metrics in order of importance, the rest following in the default order ("
             + ",".join(m.value for m in DEFAULT_RANK) + ")",
             field="policy.sla.rank", metavar="M1,M2,...", derived=True),
    ),
    "Hard limits drop the split and threshold choices predicted to break them; the ranking "
    "picks among the rest. No limit is set unless given.",
)  # fmt: skip
"""The SLA flags (``spinn.decisions.sla.SLA``): file first, each flag given on top of it."""

_SLA_KEYS = tuple(f.dest for f in SLA_FLAGS.flags if f.dest != "sla")


def sla_flags_given(args: argparse.Namespace) -> tuple[str, ...]:
    """The SLA flags set in ``args``, as typed (``--sla`` included)."""
    return tuple(f.names[0] for f in SLA_FLAGS.flags if getattr(args, f.dest, None) is not None)


def sla_from_args(args: argparse.Namespace) -> SLA:
    """The SLA the flags give: the ``--sla`` file, then each limit flag on top of it."""
    sla = SLA.load(args.sla) if getattr(args, "sla", None) else SLA()
    changes = {k: getattr(args, k) for k in _SLA_KEYS if getattr(args, k, None) is not None}
    try:
        return sla.replace(**changes)
    except SLAError as exc:
        raise SLAError(f"flag {exc}") from None


# -- spinn-device ----------------------------------------------------------------------------

DEVICE_FLAGS = FlagTable(
    DeviceConfig,
    (
        FlagGroup("frame source", (
            Flag(("--camera",), "OpenCV camera index or stream URL", metavar="INDEX|URL",
                 exclusive=True),
            Flag(("--video",), "video file", type=Path, metavar="FILE", exclusive=True),
            Flag(("--images",), "directory of images", type=Path, metavar="DIR", exclusive=True),
            Flag(("--dataset",),
                 "replay a labelled dataset: fashion-mnist[:test|train], "
                 "fashion-mnist-camera[:test|train] (the same images as 3x96x96 RGB frames) "
                 "or mnist", metavar="NAME[:SPLIT]", exclusive=True),
            Flag(("--data-dir",), "directory of the Fashion-MNIST IDX files"),
            Flag(("--rate",), "frames per second (default: as fast as possible)",
                 field="source.rate_fps", type=float),
            Flag(("--limit",), "stop after N frames", field="source.limit", type=int),
            Flag(("--max-in-flight",), "frames in the pipeline at once (default {default})",
                 field="source.max_in_flight", type=int),
        )),
        FlagGroup("model and compute", (
            Flag(("--checkpoint", "--model"),
                 "checkpoint (must be the server's; default: the shipped model)",
                 field="compute.checkpoint", type=Path),
            Flag(("--allow-user-code",), _USER_CODE, field="compute.allow_user_code",
                 switch=True),
            Flag(("--torch-threads",), "torch threads for device compute (default {default})",
                 field="compute.torch_threads", type=int),
            Flag(("--slowdown",),
                 "emulate a weaker device: each stage takes K times as long (default {default})",
                 field="compute.slowdown", type=float, metavar="K"),
        )),
        FlagGroup("link to the server", (
            Flag(("--server",),
                 "server address (default {default}); repeat it or give a comma list for "
                 "several servers: on an outage the device fails over to the next one",
                 field="link.server", type=host_ports, append=True, derived=True,
                 metavar="HOST:PORT[,HOST:PORT...]"),
            Flag(("--device-only",), "never connect; everything runs locally", switch=True),
            Flag(("--codec",),
                 "activation codec (default {default}: sparse int8 + zstd with the per-split "
                 "dictionaries beside the checkpoint, model.zdict, when the server holds the "
                 "same; otherwise sparse_int8)",
                 field="link.codec", choices=ACTIVATION_CODECS),
            Flag(("--no-image-codec",),
                 "at split 0 send the preprocessed float input with --codec instead of the "
                 "frame's uint8 pixels (uint8_image, PROTOCOL.md §6.8), as a device without "
                 "that codec does", field="link.image_codec", switch=True),
            Flag(("--zstd",),
                 "when to compress the activation (default {default}): auto when the transfer "
                 "time it saves at the measured bandwidth exceeds its own, always for the "
                 "fewest bytes (a metered link), never",
                 field="link.zstd", choices=tuple(ZSTD_MODES)),
            Flag(("--probe-bytes",),
                 "largest padding of the PINGs that probe the uplink's bandwidth in trains "
                 "taking {link.probe_share:.0%} of the link (default {default}, at most "
                 f"{MAX_PROBE_BYTES}); 0 sends none, e.g. on a metered link: the bandwidth is "
                 "then measured from uploads alone", field="link.probe_bytes", type=int),
            Flag(("--seed",), "seed of the reconnect jitter (default {default})",
                 field="link.seed", type=int),
        )),
        FlagGroup("link security (docs/PROTOCOL.md §10)", (
            Flag(("--token-file",), "shared token (mode 600) to prove to the server",
                 field="link.token_file", type=Path),
            Flag(("--tls",), "speak TLS, verifying the server with the system CAs",
                 field="link.tls", switch=True),
            Flag(("--tls-ca",), "speak TLS, verifying the server with this PEM CA file",
                 field="link.tls_ca", type=Path),
            Flag(("--tls-cert",), "client certificate (PEM) for mutual TLS",
                 field="link.tls_cert", type=Path),
            Flag(("--tls-key",), "private key of --tls-cert", field="link.tls_key", type=Path),
            Flag(("--misconfig-tries",),
                 "give up (exit status 2, frames read still answered) after the handshake "
                 "failed this many times in a row the same misconfigured way, e.g. TLS on one "
                 "end only (default {default})", field="link.misconfig_tries", type=int),
            Flag(("--retry-forever",),
                 "keep retrying a server that looks misconfigured, answering locally meanwhile",
                 field="link.retry_forever", switch=True),
        )),
        FlagGroup("policy: split and exit threshold", (
            Flag(("--policy",),
                 "how split and threshold are chosen (default {default}): fixed keeps --split "
                 "and --thr; spinn is the SPINN scheduler, working to the SLA flags below "
                 "(they act only with spinn and spinn-no-ee; edgent reads --max-latency-ms); "
                 "the others are baselines",
                 field="policy.policy", choices=("fixed", *POLICY_NAMES)),
            Flag(("--profile",), "offline profile (default: beside the checkpoint)",
                 field="policy.profile", type=Path),
            Flag(("--split",),
                 "with --policy fixed: the device runs the model's first SPLIT stages and the "
                 "server the rest; 0 = server-only, S = device-only, where S is the model's "
                 "number of stages (default: S // 2)", field="policy.split", type=int),
            Flag(("--thr",),
                 "with --policy fixed: exit confidence threshold (default {default})",
                 field="policy.thr_conf", type=_fraction),
            Flag(("--no-continue",), "do not keep computing locally while the server works",
                 field="policy.continue_locally", switch=True),
            Flag(("--deadline-factor",),
                 "a RESULT may take this many times its expected time before the frame is "
                 "finished locally (default {default})",
                 field="policy.deadline_factor", type=float),
        )),
        SLA_FLAGS,
        FlagGroup("output", (
            Flag(("--out",), "write the per-frame JSON lines here, not stdout", type=Path),
            Flag(("--no-status",), "no live status line", switch=True),
            Flag(("--status-interval",), "seconds between status lines (default {default})",
                 field="output.status_interval_s", type=float),
            *_LOGGING,
        )),
    ),
)  # fmt: skip
"""``spinn-device``'s flags, by the concerns of ``DeviceConfig``."""


# -- spinn-server ----------------------------------------------------------------------------

SERVER_FLAGS = FlagTable(
    ServerConfig,
    (
        FlagGroup("model and compute", (
            Flag(("--checkpoint", "--model"),
                 f"checkpoint to serve (default: the shipped model, {DEFAULT_CHECKPOINT.name})",
                 field="compute.checkpoint", type=Path),
            Flag(("--allow-user-code",), _USER_CODE, field="compute.allow_user_code",
                 switch=True),
            Flag(("--no-dictionaries",),
                 "ignore the zstd dictionaries beside the checkpoint (model.zdict): devices "
                 "then pack with plain sparse_int8 instead of sparse_int8_zdict",
                 field="compute.dictionaries", switch=True),
            Flag(("--no-image-codec",),
                 "do not accept the frame's uint8 pixels at split 0 (uint8_image, PROTOCOL.md "
                 "§6.8): devices then send the preprocessed float input there",
                 field="compute.image_codec", switch=True),
            Flag(("--device",),
                 "torch device: cpu, cuda[:N], or auto = cuda when available "
                 "(default {default})", field="compute.device"),
            Flag(("--workers",),
                 "compute threads (default: cores // --torch-threads, never oversubscribing)",
                 field="compute.workers", type=int),
            Flag(("--torch-threads",), "torch intra-op threads per worker (default {default})",
                 field="compute.torch_threads", type=int),
            Flag(("--batch-max",),
                 "dynamic batching: most requests per forward pass, 1 = off (default {default})",
                 field="compute.batch_max", type=int),
            Flag(("--batch-wait-ms",),
                 "with batching, how long a request may wait for others while a worker is "
                 "free (default {default})", field="compute.batch_wait_ms", type=float),
            Flag(("--no-report-compute",),
                 "do not send compute times in RESULT; devices then infer the server time",
                 field="compute.report_compute", switch=True),
            Flag(("--top-k",), "classes per RESULT (default {default})",
                 field="compute.top_k", type=int),
            Flag(("--slowdown",),
                 "emulate a loaded server: each stage takes K times as long (default {default})",
                 field="compute.slowdown", type=float, metavar="K"),
        )),
        FlagGroup("operations (deploy/README.md)", (
            Flag(("--host",), "address to listen on (default {default})",
                 field="operations.host"),
            Flag(("--port",), "TCP port, 0 = any free (default {default})",
                 field="operations.port", type=int),
            Flag(("--name",), "server name sent to devices (default {default})",
                 field="operations.server_name"),
            Flag(("--stats-interval",),
                 "seconds between stats log lines, 0 = off (default {default})",
                 field="operations.stats_interval_s", type=float),
            Flag(("--grace",),
                 "seconds in-flight requests may finish at shutdown (default {default})",
                 field="operations.shutdown_grace_s", type=float),
            Flag(("--metrics-port",),
                 "serve Prometheus metrics at /metrics on this port (default: off)",
                 field="operations.metrics_port", type=int),
            Flag(("--metrics-host",), "address of the metrics endpoint (default {default})",
                 field="operations.metrics_host"),
            *_LOGGING,
        )),
        FlagGroup("security (docs/PROTOCOL.md §10)", (
            Flag(("--token-file",),
                 "shared token (mode 600, >= 16 bytes); devices must prove they hold it",
                 field="security.token_file", type=Path),
            Flag(("--tls-cert",), "PEM certificate: serve over TLS", field="security.tls_cert",
                 type=Path),
            Flag(("--tls-key",), "PEM private key of --tls-cert", field="security.tls_key",
                 type=Path),
            Flag(("--tls-client-ca",), "require device certificates signed by this CA",
                 field="security.tls_client_ca", type=Path),
        )),
        FlagGroup("limits (safe defaults; see LimitsConfig)", (
            Flag(("--max-connections",),
                 "devices at once; more get ERROR BUSY (default {default})",
                 field="limits.max_connections", type=int),
            Flag(("--max-queued",),
                 "requests queued over all devices; more get BUSY (default {default})",
                 field="limits.max_queued", type=int),
            Flag(("--max-in-flight",),
                 "requests queued per device; more get BUSY (default {default})",
                 field="limits.max_queue_per_connection", type=int),
            Flag(("--max-frame-bytes",),
                 "largest frame accepted in bytes (default: the served model's largest "
                 "float32 activation x 1.25 + 64 KiB; about 95 KiB for the shipped model)",
                 field="limits.max_frame_bytes", type=int),
            Flag(("--max-tensor-elements",),
                 "largest activation in elements (default {default})",
                 field="limits.max_tensor_elements", type=int),
            Flag(("--max-handshakes",),
                 "connections in the handshake at once, in a pool apart from the devices'; "
                 "when it is full the oldest silent one (or the oldest past 1 s) is closed, "
                 "else the new one is shed with BUSY (default {default})",
                 field="limits.max_handshakes", type=int),
            Flag(("--max-handshakes-per-address",),
                 "connections in the handshake at once from one source address "
                 "(default: no limit)",
                 field="limits.max_handshakes_per_address", type=int),
            Flag(("--max-ping-rate",),
                 "PINGs a second per connection, bursts of twice this; above, a fatal ERROR "
                 "TOO_LARGE (default {default})", field="limits.max_ping_rate", type=float),
            Flag(("--max-unknown-cancel-rate",),
                 "CANCELs of request ids the server does not hold, a second per connection, "
                 "bursts of twice this; above, a fatal ERROR TOO_LARGE (default {default})",
                 field="limits.max_unknown_cancel_rate", type=float),
            Flag(("--handshake-timeout",),
                 "seconds for TLS + HELLO + authentication (default {default})",
                 field="limits.handshake_timeout_s", type=float),
            Flag(("--idle-timeout",),
                 "close a device that sends no complete frame for this long while none of its "
                 "requests is outstanding (default {default})",
                 field="limits.idle_timeout_s", type=float),
        )),
    ),
)  # fmt: skip
"""``spinn-server``'s flags, by the concerns of ``ServerConfig``."""


def _check(table: FlagTable, extra: Iterable[str] = ()) -> None:
    """Every row names a real field, and no field has two flags."""
    paths = set(config_fields(table.config)) | set(extra)
    seen: set[str] = set()
    for flag in table.flags:
        if flag.field is None:
            continue
        assert flag.field in paths, f"{flag.names[0]}: no field {flag.field}"
        assert flag.field not in seen, f"{flag.field}: two flags"
        seen.add(flag.field)


_check(DEVICE_FLAGS, (f.field for f in SLA_FLAGS.flags if f.field and f.field != "policy.sla"))
_check(SERVER_FLAGS)
