"""Accuracy and overhead of netshape: ``python -m bench.netshape``.

The proxy runs as its own process (``python -m tools.netshape`` with a control port), as
benchmarks use it; the traffic generator and the sink/echo servers run here. For each
configured rate a checksummed upload of about ``--seconds`` is timed at the sink; for each
configured one-way delay the median round-trip added by the proxy is compared with it; at
unlimited rate the proxy's throughput is compared with a direct loopback connection.

Prints a table, then ONE JSON line:
``{"bench": "netshape", "rate_error_max": ..., "delay_error_ms_max": ..., "overhead_vs_direct": ...}``
(relative rate error, absolute delay error in ms, proxied / direct unshaped throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench._common import ROOT
from tools.netshape import run, send_command
from tools.netshape.units import format_duration, format_rate, parse_duration, parse_rate

DEFAULT_RATES = "100kbit,1mbit,10mbit,50mbit,100mbit,200mbit"
DEFAULT_DELAYS = "1ms,5ms,20ms,50ms,100ms"


class _Sink:
    """Accepts connections; each one's reads (time, bytes) and digest resolve a future."""

    def __init__(self) -> None:
        self.results: asyncio.Queue[tuple[list[tuple[float, int]], str]] = asyncio.Queue()
        self.port = 0

    async def start(self) -> asyncio.Server:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            reads: list[tuple[float, int]] = []
            sha = hashlib.sha256()
            try:
                while chunk := await reader.read(1 << 20):
                    reads.append((time.perf_counter(), len(chunk)))
                    sha.update(chunk)
            finally:
                writer.close()
                await self.results.put((reads, sha.hexdigest()))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _upload(address: tuple[str, int], block: bytes, total: int) -> str:
    sha = hashlib.sha256()
    _, writer = await asyncio.open_connection(*address)
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        writer.write(piece)
        sha.update(piece)
        sent += len(piece)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()
    return sha.hexdigest()


def _rate_of(reads: list[tuple[float, int]]) -> float:
    """Least-squares slope of bytes received against time, in bit/s.

    Every read counts, so a late first or last read (the sink shares the machine) moves the
    figure far less than it would move (bytes after the first read) / (last - first).
    """
    times, cumulative, total = [], [], 0
    for t, n in reads:
        total += n
        times.append(t)
        cumulative.append(total)
    if len(times) < 2 or times[-1] == times[0]:
        return float("nan")
    return statistics.linear_regression(times, cumulative).slope * 8


async def _timed_upload(sink: _Sink, address: tuple[str, int], block: bytes, total: int) -> float:
    sent_digest = await _upload(address, block, total)
    reads, got_digest = await asyncio.wait_for(sink.results.get(), 120)
    if got_digest != sent_digest:
        raise RuntimeError(f"transfer to {address} corrupted: digest mismatch")
    return _rate_of(reads)


async def _rtts(address: tuple[str, int], count: int) -> list[float]:
    reader, writer = await asyncio.open_connection(*address)
    rtts = []
    for k in range(count):
        message = k.to_bytes(4, "big") * 16
        start = time.perf_counter()
        writer.write(message)
        if await reader.readexactly(len(message)) != message:
            raise RuntimeError("echo corrupted")
        rtts.append(time.perf_counter() - start)
    writer.close()
    return rtts


class _Proxy:
    """The CLI proxy in its own process, driven through its control port."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.proc: asyncio.subprocess.Process | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.control: tuple[str, int] = ("127.0.0.1", 0)

    async def __aenter__(self) -> _Proxy:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.netshape",
            "--upstream",
            f"127.0.0.1:{self.upstream}",
            "--control",
            "127.0.0.1:0",
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if not line:
            raise RuntimeError("netshape exited before listening")
        ready = json.loads(line)
        host, _, port = ready["listen"].rpartition(":")
        self.address = (host, int(port))
        host, _, port = ready["control"].rpartition(":")
        self.control = (host, int(port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            await self.proc.wait()

    async def set(self, **fields: Any) -> None:
        answer = await send_command(self.control, {"cmd": "set", "direction": "both", **fields})
        if not answer.get("ok"):
            raise RuntimeError(f"control refused {fields}: {answer}")


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    rates = [r for r in (parse_rate(x) for x in args.rates.split(",")) if r is not None]
    delays = [parse_duration(x) for x in args.delays.split(",")]
    block = os.urandom(1 << 20)
    sink = _Sink()
    sink_server = await sink.start()
    echo_server, echo_port = await _echo_server()
    rows: list[dict[str, Any]] = []
    delay_rows: list[dict[str, Any]] = []
    async with sink_server, echo_server:
        async with _Proxy(sink.port) as proxy:
            for rate in rates:
                await proxy.set(rate_bps=rate, delay_s=0)
                measured = await _timed_upload(
                    sink, proxy.address, block, max(20_000, int(rate / 8 * args.seconds))
                )
                rows.append({"rate_bps": rate, "measured_bps": measured})
                print(
                    f"rate  {format_rate(rate):>10}  measured {format_rate(measured):>14}"
                    f"  error {100 * (measured / rate - 1):+6.2f} %",
                    flush=True,
                )
            await proxy.set(rate_bps=None, delay_s=0)
            unshaped = [
                await _timed_upload(sink, proxy.address, block, args.overhead_bytes)
                for _ in range(3)
            ]
        direct = [
            await _timed_upload(sink, ("127.0.0.1", sink.port), block, args.overhead_bytes)
            for _ in range(3)
        ]
        overhead = statistics.median(unshaped) / statistics.median(direct)
        print(
            f"unlimited: direct {format_rate(statistics.median(direct))}, through the proxy "
            f"{format_rate(statistics.median(unshaped))}: ratio {overhead:.3f}",
            flush=True,
        )
        async with _Proxy(echo_port) as proxy:
            base = statistics.median(await _rtts(proxy.address, args.pings))
            direct_rtt = statistics.median(await _rtts(("127.0.0.1", echo_port), args.pings))
            for delay in delays:
                # One-way delay on "up" only: the round trip grows by exactly the delay.
                answer = await send_command(
                    proxy.control, {"cmd": "set", "direction": "up", "delay_s": delay}
                )
                if not answer.get("ok"):
                    raise RuntimeError(f"control refused delay {delay}: {answer}")
                added = statistics.median(await _rtts(proxy.address, args.pings)) - base
                delay_rows.append({"delay_s": delay, "measured_s": added})
                print(
                    f"delay {format_duration(delay):>10}  measured {added * 1e3:8.3f} ms"
                    f"  error {(added - delay) * 1e3:+6.3f} ms",
                    flush=True,
                )
        print(
            f"proxy round trip at zero delay {base * 1e3:.3f} ms, direct {direct_rtt * 1e3:.3f} ms",
            flush=True,
        )
    return {
        "bench": "netshape",
        "rate_error_max": max(abs(r["measured_bps"] / r["rate_bps"] - 1) for r in rows),
        "delay_error_ms_max": max(abs(r["measured_s"] - r["delay_s"]) * 1e3 for r in delay_rows),
        "overhead_vs_direct": overhead,
        "direct_bps": statistics.median(direct),
        "proxy_unshaped_bps": statistics.median(unshaped),
        "proxy_rtt_ms": base * 1e3,
        "direct_rtt_ms": direct_rtt * 1e3,
        "rates": rows,
        "delays": delay_rows,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; the last line printed is the JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m bench.netshape", description=__doc__)
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"({DEFAULT_RATES})")
    parser.add_argument("--delays", default=DEFAULT_DELAYS, help=f"({DEFAULT_DELAYS})")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each rate test")
    parser.add_argument("--pings", type=int, default=21, help="round trips per delay")
    parser.add_argument(
        "--overhead-bytes", type=int, default=256 << 20, help="bytes per unlimited transfer"
    )
    args = parser.parse_args(argv)
    try:
        summary = run(_bench(args))
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
