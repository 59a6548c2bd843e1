"""Load test: N concurrent devices against one server process for a bounded time.

``python -m bench.load [--devices 50] [--seconds 20] [--rate 4] [--split 1]``

Each device is a protocol client on its own TCP connection (handshake, then INFERs
carrying real activations: Fashion-MNIST test images run through the model's first
``split`` stages here and packed as the runtime packs them, with a deadline as the runtime
sends it). Devices send open-loop at ``--rate`` requests per second each, at most
``--window`` unanswered, so an overloaded server shows as latency, BUSY and CANCELLED
answers rather than as a slower offered load. A request the server refuses with BUSY is
one the real device finishes locally at once (PROTOCOL.md §8); none may go unanswered.

Reported: answered requests per second, latency p50/p99 of RESULTs (send to answer),
the BUSY rate, the server's peak RSS, and frames lost (INFERs never answered: must be 0).
The last line is one JSON object with ``requests_per_s``, ``p50_ms``, ``p99_ms``,
``busy_rate``, ``rss_mb`` and ``frames_lost``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import ROOT
from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Bye,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Infer,
    PackedTensor,
    ProtocolError,
    Result,
    Role,
    Welcome,
    pack,
)
from spinn.runtime.processes import free_port, stop_process, wait_listening

__all__ = ["LoadResult", "activations", "main", "run_load"]


@dataclass
class LoadResult:
    """What the devices saw, summed over all of them."""

    sent: int = 0
    results: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    unanswered: int = 0
    connect_failures: int = 0
    connection_losses: int = 0

    @property
    def busy(self) -> int:
        return self.errors.get("BUSY", 0)


def activations(checkpoint: Path, split: int, count: int, codec: str) -> list[PackedTensor]:
    """Packed activations at ``split`` of ``count`` real test images, as a device sends."""
    import torch

    from spinn.model.checkpoint import load_checkpoint
    from spinn.model.exits import ExitRule
    from spinn.model.inference import run_stages
    from spinn.offline.data import load_fashion_mnist

    torch.set_num_threads(1)
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    data = load_fashion_mnist("test").head(count)
    out = []
    for i in range(count):
        x = model.input_spec.preprocess(data.images[i])
        act = run_stages(model, x, 0, split, ExitRule(None)).activation
        assert act is not None
        out.append(pack(act.numpy(), codec))
    return out


async def _device(
    index: int,
    port: int,
    meta: Any,
    tensors: list[PackedTensor],
    args: argparse.Namespace,
    stop_at: float,
    result: LoadResult,
) -> None:
    """One device: handshake, then INFERs at the rate until ``stop_at``, then drain."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), args.connect_timeout
        )
    except (OSError, TimeoutError):
        result.connect_failures += 1
        return
    conn = Connection(Role.DEVICE)
    writer.write(
        conn.send(
            Hello(
                PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, (args.codec,), f"load{index}"
            )
        )
    )
    sent_at: dict[int, float] = {}
    window = asyncio.Semaphore(args.window)
    welcomed = asyncio.Event()
    closed = asyncio.Event()

    async def read() -> None:
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await reader.read(1 << 16)
                    conn.receive_data(data)
                    continue
                now = time.perf_counter()
                if isinstance(event, Welcome):
                    welcomed.set()
                elif isinstance(event, Result):
                    result.results += 1
                    result.latencies_ms.append((now - sent_at.pop(event.request_id)) * 1e3)
                    window.release()
                elif isinstance(event, Error) and event.request_id is not None:
                    result.errors[event.code.name] += 1
                    sent_at.pop(event.request_id)
                    window.release()
                elif isinstance(event, Error | Bye | ConnectionClosed):
                    if isinstance(event, Error):
                        result.errors[f"fatal {event.code.name}"] += 1
                    return
        except (ProtocolError, OSError, ConnectionError):
            result.connection_losses += 1
        finally:
            closed.set()
            welcomed.set()

    reader_task = asyncio.create_task(read())
    period = 1.0 / args.rate
    rid = 0
    try:
        await asyncio.wait_for(welcomed.wait(), args.connect_timeout)
        if conn.welcome is None:
            result.connect_failures += 1
            return
        # Devices start spread over one period, as independent devices would.
        next_at = time.perf_counter() + period * (index / max(args.devices, 1))
        while time.perf_counter() < stop_at and not closed.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += period
            await window.acquire()
            if closed.is_set():
                break
            rid += 1
            tensor = tensors[(index + rid) % len(tensors)]
            sent_at[rid] = time.perf_counter()
            writer.write(conn.send(Infer(rid, args.split, 1.0, tensor, args.deadline_ms)))
            result.sent += 1
            await writer.drain()
        # Every request is answered: wait for the last answers (bounded).
        drain_until = time.perf_counter() + args.drain
        while sent_at and not closed.is_set() and time.perf_counter() < drain_until:
            await asyncio.sleep(0.01)
        with contextlib.suppress(ProtocolError, OSError):
            writer.write(conn.send(Bye("load done")))
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), 2.0)
    except (OSError, ConnectionError, TimeoutError):
        result.connection_losses += 1
    finally:
        result.unanswered += len(sent_at)
        reader_task.cancel()
        writer.close()


async def run_load(
    port: int, server_pid: int, meta: Any, tensors: list[PackedTensor], args: argparse.Namespace
) -> tuple[LoadResult, float, float]:
    """All devices at once; returns what they saw, the wall time and the server's peak RSS."""
    import psutil

    result = LoadResult()
    server = psutil.Process(server_pid)
    rss = [server.memory_info().rss]
    start = time.perf_counter()
    stop_at = start + args.seconds
    tasks = [
        asyncio.create_task(_device(i, port, meta, tensors, args, stop_at, result))
        for i in range(args.devices)
    ]
    while not all(t.done() for t in tasks):
        with contextlib.suppress(psutil.Error):
            rss.append(server.memory_info().rss)
        await asyncio.wait(tasks, timeout=0.25)
    await asyncio.gather(*tasks)
    return result, min(time.perf_counter() - start, args.seconds), max(rss) / 2**20


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> int:
    from spinn.pretrained import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    p.add_argument("--devices", type=int, default=50, help="concurrent devices (default 50)")
    p.add_argument("--seconds", type=float, default=20.0, help="sending time (default 20)")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s per device (default 4)")
    p.add_argument("--window", type=int, default=4, help="unanswered requests per device")
    p.add_argument("--split", type=int, default=1, help="split of the INFERs (default 1)")
    p.add_argument("--codec", default="sparse_int8")
    p.add_argument(
        "--deadline-ms", type=float, default=250.0, help="INFER deadline_ms (default 250)"
    )
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for last answers")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--workers", type=int, default=None, help="server compute threads")
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra spinn_server.py argument"
    )
    args = p.parse_args(argv)
    if args.devices < 1 or args.rate <= 0 or args.window < 1 or args.seconds <= 0:
        p.error("--devices, --rate, --window and --seconds must be positive")

    from spinn.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    if not 0 <= args.split < model.num_stages:
        p.error(f"--split must be in 0..{model.num_stages - 1}")
    tensors = activations(args.checkpoint, args.split, 64, args.codec)
    port = free_port()
    cmd = [sys.executable, str(ROOT / "spinn_server.py"), "--checkpoint", str(args.checkpoint),
           "--port", str(port), "--stats-interval", "0", "--grace", "2", "-q", *args.server_arg]  # fmt: skip
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        wait_listening(port, proc, 120)
        import uvloop

        result, wall, rss_mb = uvloop.run(run_load(port, proc.pid, meta, tensors, args))
        alive = proc.poll() is None
    finally:
        stop_process(proc)
    lat = result.latencies_ms
    answered = result.results + sum(v for k, v in result.errors.items() if " " not in k)
    figures: dict[str, Any] = {
        "devices": args.devices,
        "seconds": round(wall, 2),
        "offered_per_s": round(args.devices * args.rate, 1),
        "requests_sent": result.sent,
        "requests_per_s": round(result.results / wall, 1),
        "answered_per_s": round(answered / wall, 1),
        "p50_ms": None if not lat else round(statistics.median(lat), 2),
        "p99_ms": None if not lat else round(_percentile(lat, 99) or 0.0, 2),
        "busy_rate": round(result.busy / max(result.sent, 1), 4),
        "errors": dict(result.errors),
        "frames_lost": result.unanswered,
        "connect_failures": result.connect_failures,
        "connection_losses": result.connection_losses,
        "rss_mb": round(rss_mb, 1),
        "server_alive": alive,
    }
    print(
        f"{args.devices} devices × {args.rate:g} req/s for {wall:.1f} s: "
        f"{figures['requests_per_s']} RESULT/s (p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms), BUSY {100 * figures['busy_rate']:.1f}%, "
        f"errors {dict(result.errors)}, lost {result.unanswered}, server RSS {rss_mb:.0f} MB"
    )
    print(json.dumps(figures))
    return 0 if result.unanswered == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
