"""spinn-server: serve the server part of a progressive model to many devices.

Thin CLI (STYLE.md habit 5): argparse → ServerConfig → spinn.runtime.server.run_server.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spinn.runtime.server import ServerConfig

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    from spinn.pretrained import DEFAULT_CHECKPOINT
    from spinn.runtime.server import ServerConfig

    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="spinn-server",
        description="Serve the part of a SPINN progressive model after the split: devices "
        "send the activation at their split (INFER), the server finishes the inference "
        "with its own early exits and answers RESULT. Stops gracefully on SIGINT/SIGTERM.",
    )
    p.add_argument(
        "--checkpoint",
        "--model",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help=f"checkpoint to serve (default: the shipped model, {DEFAULT_CHECKPOINT.name})",
    )
    p.add_argument(
        "--allow-user-code",
        action="store_true",
        help="trust and import the model code the checkpoint names (a model trained with "
        "spinn train --arch package.module:callable; the module must be importable)",
    )
    p.add_argument(
        "--no-dictionaries",
        action="store_true",
        help="ignore the zstd dictionaries beside the checkpoint (model.zdict): devices then "
        "pack with plain sparse_int8 instead of sparse_int8_zdict",
    )
    p.add_argument(
        "--no-image-codec",
        action="store_true",
        help="do not accept the frame's uint8 pixels at split 0 (uint8_image, PROTOCOL.md "
        "§6.8): devices then send the preprocessed float input there",
    )
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument(
        "--port", type=int, default=d.port, help=f"TCP port, 0 = any free (default {d.port})"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="compute threads (default: cores // --torch-threads, never oversubscribing)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=d.torch_threads,
        help=f"torch intra-op threads per worker (default {d.torch_threads})",
    )
    p.add_argument(
        "--no-report-compute",
        action="store_true",
        help="do not send compute times in RESULT; devices then infer the server time",
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"classes per RESULT ({d.top_k})")
    p.add_argument(
        "--stats-interval",
        type=float,
        default=d.stats_interval_s,
        help=f"seconds between stats log lines, 0 = off (default {d.stats_interval_s})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=d.shutdown_grace_s,
        help=f"seconds in-flight requests may finish at shutdown (default {d.shutdown_grace_s})",
    )
    p.add_argument("--name", default=d.server_name, help="server name sent to devices")
    p.add_argument(
        "--slowdown",
        type=float,
        default=d.slowdown,
        metavar="K",
        help="emulate a loaded server: each stage takes K times as long (default 1)",
    )
    ops = p.add_argument_group("operations (deploy/README.md)")
    ops.add_argument(
        "--device",
        default=d.device,
        help=f"torch device: cpu, cuda[:N], or auto = cuda when available (default {d.device})",
    )
    ops.add_argument(
        "--batch-max",
        type=int,
        default=d.batch_max,
        help=f"dynamic batching: most requests per forward pass, 1 = off (default {d.batch_max})",
    )
    ops.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="with batching, how long a request may wait for others while a worker is free "
        f"(default {d.batch_wait_ms:g})",
    )
    ops.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at /metrics on this port (default: off)",
    )
    ops.add_argument(
        "--metrics-host",
        default=d.metrics_host,
        help=f"address of the metrics endpoint (default {d.metrics_host})",
    )
    sec = p.add_argument_group("security (docs/PROTOCOL.md §10)")
    sec.add_argument(
        "--token-file",
        type=Path,
        help="shared token (mode 600, >= 16 bytes); devices must prove they hold it",
    )
    sec.add_argument("--tls-cert", type=Path, help="PEM certificate: serve over TLS")
    sec.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    sec.add_argument(
        "--tls-client-ca", type=Path, help="require device certificates signed by this CA"
    )
    lim = p.add_argument_group("limits (safe defaults; see ServerConfig)")
    lim.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help=f"devices at once; more get ERROR BUSY (default {d.max_connections})",
    )
    lim.add_argument(
        "--max-queued",
        type=int,
        default=d.max_queued,
        help=f"requests queued over all devices; more get BUSY (default {d.max_queued})",
    )
    lim.add_argument(
        "--max-in-flight",
        type=int,
        default=d.max_queue_per_connection,
        help=f"requests queued per device; more get BUSY (default {d.max_queue_per_connection})",
    )
    lim.add_argument(
        "--max-frame-bytes",
        type=int,
        default=d.max_frame_bytes,
        help="largest frame accepted in bytes (default: the served model's largest float32"
        " activation x 1.25 + 64 KiB; about 95 KiB for the shipped model)",
    )
    lim.add_argument(
        "--max-tensor-elements",
        type=int,
        default=d.max_tensor_elements,
        help=f"largest activation in elements (default {d.max_tensor_elements})",
    )
    lim.add_argument(
        "--max-handshakes",
        type=int,
        default=d.max_handshakes,
        help="connections in the handshake at once, in a pool apart from the devices'; when"
        " it is full the oldest silent one (or the oldest past 1 s) is closed, else the new"
        " one is shed with BUSY"
        f" (default {d.max_handshakes})",
    )
    lim.add_argument(
        "--max-handshakes-per-address",
        type=int,
        default=d.max_handshakes_per_address,
        help="connections in the handshake at once from one source address (default: no limit)",
    )
    lim.add_argument(
        "--max-ping-rate",
        type=float,
        default=d.max_ping_rate,
        help="PINGs a second per connection, bursts of twice this; above, a fatal ERROR"
        f" TOO_LARGE (default {d.max_ping_rate:g})",
    )
    lim.add_argument(
        "--max-unknown-cancel-rate",
        type=float,
        default=d.max_unknown_cancel_rate,
        help="CANCELs of request ids the server does not hold, a second per connection,"
        f" bursts of twice this; above, a fatal ERROR TOO_LARGE (default"
        f" {d.max_unknown_cancel_rate:g})",
    )
    lim.add_argument(
        "--handshake-timeout",
        type=float,
        default=d.handshake_timeout_s,
        help=f"seconds for TLS + HELLO + authentication (default {d.handshake_timeout_s:g})",
    )
    lim.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout_s,
        help="close a device that sends no complete frame for this long while none of its "
        f"requests is outstanding (default {d.idle_timeout_s:g})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the parsed flags describe."""
    from spinn.runtime.server import ServerConfig

    return ServerConfig(
        checkpoint=args.checkpoint,
        allow_user_code=args.allow_user_code,
        dictionaries=not args.no_dictionaries,
        image_codec=not args.no_image_codec,
        host=args.host,
        port=args.port,
        workers=args.workers,
        torch_threads=args.torch_threads,
        report_compute=not args.no_report_compute,
        top_k=args.top_k,
        stats_interval_s=args.stats_interval,
        shutdown_grace_s=args.grace,
        server_name=args.name,
        slowdown=args.slowdown,
        metrics_port=args.metrics_port,
        device=args.device,
        batch_max=args.batch_max,
        batch_wait_ms=args.batch_wait_ms,
        metrics_host=args.metrics_host,
        token_file=args.token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        max_connections=args.max_connections,
        max_queued=args.max_queued,
        max_queue_per_connection=args.max_in_flight,
        max_frame_bytes=args.max_frame_bytes,
        max_tensor_elements=args.max_tensor_elements,
        handshake_timeout_s=args.handshake_timeout,
        max_handshakes=args.max_handshakes,
        max_handshakes_per_address=args.max_handshakes_per_address,
        max_ping_rate=args.max_ping_rate,
        max_unknown_cancel_rate=args.max_unknown_cancel_rate,
        idle_timeout_s=args.idle_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``spinn-server``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
        from spinn.runtime.accel import resolve_device

        resolve_device(config.device)  # --device cuda without a GPU is a bad flag
    except ValueError as exc:
        parser.error(str(exc))
    import uvloop

    from protocol.dictionaries import DictionaryError
    from spinn.checkpoint import CheckpointError
    from spinn.runtime.security import SecurityError
    from spinn.runtime.server import run_server

    try:
        return uvloop.run(run_server(config))
    except (CheckpointError, DictionaryError, SecurityError, OSError) as exc:
        # A bind error is a ListenError, which names the address and the flag that set it.
        print(f"spinn-server: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
