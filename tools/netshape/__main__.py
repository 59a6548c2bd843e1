"""Command line of netshape: ``python -m tools.netshape --listen ... --upstream ... [options]``.

Thin by design (STYLE.md): argparse into a ShapeConfig, then one call into the library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tools.netshape.config import DirectionConfig, OutageSpec, ShapeConfig, parse_outage_spec
from tools.netshape.control import start_control
from tools.netshape.proxy import NetShape, run
from tools.netshape.trace import Trace, load_trace
from tools.netshape.units import (
    parse_address,
    parse_duration,
    parse_probability,
    parse_rate,
    parse_size,
)

__all__ = ["build_parser", "config_from_args", "main"]

# (option suffix, DirectionConfig field, parser, metavar, help)
_DIRECTION_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str, str], ...] = (
    ("rate", "rate_bps", parse_rate, "RATE", "bottleneck rate: 5mbit, 500kbit, 1gbit, 100kbps"),
    ("burst", "burst_bytes", parse_size, "SIZE", "token bucket depth (default 5 ms of rate)"),
    ("delay", "delay_s", parse_duration, "DUR", "one-way delay: 40ms, 1s"),
    ("jitter", "jitter_s", parse_duration, "DUR", "delay varies by +/- this (uniform, seeded)"),
    ("loss", "loss", parse_probability, "P", "per-segment loss probability: 0.01 or 1%%"),
    ("ge-p", "ge_p", parse_probability, "P", "Gilbert-Elliott: P(good->bad) per segment"),
    ("ge-r", "ge_r", parse_probability, "P", "Gilbert-Elliott: P(bad->good) per segment"),
    ("ge-loss-bad", "ge_loss_bad", parse_probability, "P", "loss probability in the bad state"),
    ("mss", "mss_bytes", parse_size, "SIZE", "segment size the loss refers to (1448)"),
    ("rto-min", "rto_min_s", parse_duration, "DUR", "floor of the loss stall (200ms)"),
    ("stall", "stall_s", parse_duration, "DUR", "fixed loss stall instead of the RTO rule"),
    ("slice", "slice_bytes", parse_size, "SIZE", "cut writes into slices of about SIZE"),
    ("slice-variation", "slice_variation", parse_size, "SIZE", "slice size varies by +/-"),
    ("slice-delay", "slice_delay_s", parse_duration, "DUR", "pause between slices"),
    ("limit-data", "limit_bytes", parse_size, "SIZE", "close the connection after SIZE bytes"),
    ("slow-close", "slow_close_s", parse_duration, "DUR", "hold the close (FIN) this long"),
)


def _arg_type(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parser.__name__.removeprefix("parse_")
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.netshape",
        description=(
            "A TCP proxy that shapes bandwidth, delay, jitter, loss and outages on loopback,\n"
            "without root. 'up' is client->upstream (device->server), 'down' the reverse.\n"
            "Rates use tc units: bit/kbit/mbit/gbit are bits/s, bps/kbps/mbps/gbps bytes/s.\n"
            "Durations: us, ms, s, m, h. Sizes: b, kb, mb, kib, mib. See docs/NETSHAPE.md."
        ),
        epilog=(
            "Examples:\n"
            "  python -m tools.netshape --listen 127.0.0.1:9000 --upstream 127.0.0.1:8000 "
            "--rate 24mbit --delay 20ms\n"
            "  ... --up-rate 5mbit --down-rate 50mbit --loss 1% --outage 5s@20s "
            "--outage reset:2s@10s/30s,p=0.5\n"
            "  ... --trace tools/netshape/traces/4g.csv --trace-loop --control 127.0.0.1:9001\n"
            'Control: one JSON object per line on --control, e.g. {"cmd": "stats"}, '
            '{"cmd": "set", "direction": "up", "rate_bps": "5mbit"}, '
            '{"cmd": "outage", "mode": "reset", "duration_s": "2s"}, {"cmd": "restore"}.'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        type=_arg_type(parse_address),
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where clients connect (default 127.0.0.1:0, a free port; printed at start)",
    )
    parser.add_argument(
        "--upstream",
        type=_arg_type(parse_address),
        required=True,
        metavar="HOST:PORT",
        help="the server the proxy forwards to",
    )
    shaping = parser.add_argument_group(
        "shaping",
        description=(
            "Each option applies to both directions; --up-OPTION or --down-OPTION (e.g. "
            "--up-rate 5mbit --down-delay 10ms) sets one direction only."
        ),
    )
    for suffix, field, parse, metavar, help_text in _DIRECTION_OPTIONS:
        shaping.add_argument(
            f"--{suffix}", type=_arg_type(parse), metavar=metavar, help=help_text, dest=field
        )
        for side in ("up", "down"):
            shaping.add_argument(
                f"--{side}-{suffix}",
                type=_arg_type(parse),
                metavar=metavar,
                help=argparse.SUPPRESS,
                dest=f"{side}_{field}",
            )
    conn = parser.add_argument_group("connections and outages")
    conn.add_argument(
        "--connect-delay",
        type=_arg_type(parse_duration),
        default=0.0,
        metavar="DUR",
        help="wait this long before connecting upstream",
    )
    conn.add_argument(
        "--outage",
        type=_arg_type(parse_outage_spec),
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            "scheduled outage [MODE:]DUR@START[/PERIOD][,p=PROB]; MODE is blackhole "
            "(default), reset or refuse; e.g. 5s@20s, reset:2s@10s/30s, 3s@0s/10s,p=0.2"
        ),
    )
    conn.add_argument("--seed", type=int, default=0, help="seed of all random draws (0)")
    conn.add_argument(
        "--read-size",
        type=_arg_type(parse_size),
        default=65536,
        metavar="SIZE",
        help="largest socket read (64kib)",
    )
    conn.add_argument(
        "--max-buffer",
        type=_arg_type(parse_size),
        default=16 * 1024 * 1024,
        metavar="SIZE",
        help="bytes a direction of a connection may hold before reads pause (16mib)",
    )
    trace = parser.add_argument_group("traces")
    trace.add_argument(
        "--trace", metavar="CSV", help="replay time,up_rate,down_rate,delay,loss,outage rows"
    )
    trace.add_argument("--trace-loop", action="store_true", help="repeat the trace")
    trace.add_argument(
        "--trace-interp",
        choices=("step", "linear"),
        default="step",
        help="hold each row (step) or interpolate between rows (linear)",
    )
    ops = parser.add_argument_group("control and output")
    ops.add_argument(
        "--control",
        type=_arg_type(parse_address),
        metavar="HOST:PORT",
        help="serve the JSON-lines control interface here (loopback only)",
    )
    ops.add_argument(
        "--stats-interval",
        type=_arg_type(parse_duration),
        default=0.0,
        metavar="DUR",
        help="print stats as a JSON line every DUR (default off)",
    )
    ops.add_argument(
        "--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    return parser


def _direction(args: argparse.Namespace, side: str) -> DirectionConfig:
    values: dict[str, Any] = {}
    for _suffix, field, _parse, _metavar, _help in _DIRECTION_OPTIONS:
        both = getattr(args, field, None)
        own = getattr(args, f"{side}_{field}", None)
        value = own if own is not None else both
        if value is not None:
            values[field] = value
    return DirectionConfig(**values)


def config_from_args(args: argparse.Namespace) -> tuple[ShapeConfig, Trace | None]:
    """Turn parsed arguments into the proxy's configuration and optional trace."""
    outages: tuple[OutageSpec, ...] = tuple(args.outage)
    config = ShapeConfig(
        up=_direction(args, "up"),
        down=_direction(args, "down"),
        connect_delay_s=args.connect_delay,
        seed=args.seed,
        read_size=args.read_size,
        max_buffer_bytes=args.max_buffer,
        outages=outages,
    )
    trace = None
    if args.trace is not None:
        trace = load_trace(args.trace, interpolation=args.trace_interp, loop=args.trace_loop)
    return config, trace


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(args: argparse.Namespace, config: ShapeConfig, trace: Trace | None) -> None:
    proxy = NetShape(config, upstream=args.upstream, listen=args.listen, trace=trace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with proxy:
        control = None
        ready: dict[str, Any] = {
            "event": "listening",
            "listen": f"{proxy.address[0]}:{proxy.port}",
            "upstream": f"{args.upstream[0]}:{args.upstream[1]}",
        }
        if args.control is not None:
            control = await start_control(proxy, *args.control)
            ready["control"] = "{}:{}".format(*control.sockets[0].getsockname()[:2])
        print(json.dumps(ready), flush=True)
        try:
            while not stop.is_set():
                if args.stats_interval > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.stats_interval)
                    print(json.dumps({"event": "stats", **proxy.stats()}), flush=True)
                else:
                    await stop.wait()
        finally:
            if control is not None:
                control.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tools.netshape`` and the ``netshape`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(name)s: %(message)s"
    )
    if args.control is not None and not _is_loopback(args.control[0]):
        parser.error(
            f"--control {args.control[0]}: the control port has no authentication, "
            "so it must listen on loopback"
        )
    try:
        config, trace = config_from_args(args)
    except OSError as exc:
        parser.error(f"--trace {args.trace}: {exc.strerror or exc}")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(_serve(args, config, trace))
    except OSError as exc:
        print(f"netshape: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
