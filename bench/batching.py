"""Dynamic batching on the server: throughput and latency with batching off and on.

``python -m bench.batching [--concurrency 1,4,16,64] [--seconds 4] [--split 0]``

Two server processes run side by side for the whole run, one with batching off
(``--batch-max 1``) and one with it on (``--batch-max``/``--batch-wait-ms`` below);
each level of concurrency is measured against both, back to back, so both see the
same machine.  The devices are ``bench.load``'s protocol clients (real activations of
Fashion-MNIST test images at ``--split``), closed-loop: each keeps ``--window``
requests unanswered, so the offered load follows what the server sustains.
``--device`` is passed to both servers (``auto``: the GPU when there is one).

Reported per level and mode: RESULT/s, latency p50/p99 (send to answer), the mean batch
size (from the server's Prometheus metrics) and frames lost (must be 0).  The last line
is one JSON object with ``batching_speedup`` (RESULT/s with batching ÷ without, at the
highest concurrency) and every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench._common import ROOT
from bench.load import _percentile, activations, run_load
from spinn.runtime.processes import free_port, stop_process, wait_listening

__all__ = ["main"]


def _start_server(
    args: argparse.Namespace, batch_max: int
) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, str(ROOT / "spinn_server.py"), "--checkpoint", str(args.checkpoint),
           "--port", str(port), "--stats-interval", "0", "--grace", "2", "-q",
           "--device", args.device, "--batch-max", str(batch_max),
           "--batch-wait-ms", str(args.batch_wait_ms), "--metrics-port", str(metrics),
           "--max-queued", "100000", "--max-in-flight", "1024"]  # fmt: skip
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    wait_listening(port, proc, 120)
    return proc, port, metrics


def _batch_counts(metrics_port: int) -> tuple[float, float]:
    """(batches, requests in them) so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "spinn_server_batch_size_count":
                count = s.value
            elif s.name == "spinn_server_batch_size_sum":
                total = s.value
    return count, total


def _measure(
    args: argparse.Namespace, port: int, pid: int, metrics: int, meta: Any, tensors: Any, n: int
) -> dict[str, Any]:
    import uvloop

    load_args = argparse.Namespace(
        devices=n, seconds=args.seconds, rate=1e6, window=args.window, split=args.split,
        codec=args.codec, deadline_ms=None, drain=15.0, connect_timeout=10.0,
    )  # fmt: skip
    before = _batch_counts(metrics)
    result, wall, _ = uvloop.run(run_load(port, pid, meta, tensors, load_args))
    after = _batch_counts(metrics)
    batches = after[0] - before[0]
    lat = result.latencies_ms
    return {
        "devices": n,
        "requests_per_s": round(result.results / wall, 1),
        "p50_ms": None if not lat else round(statistics.median(lat), 2),
        "p99_ms": None if not lat else round(_percentile(lat, 99) or 0.0, 2),
        "mean_batch": round((after[1] - before[1]) / batches, 2) if batches else None,
        "errors": dict(result.errors),
        "frames_lost": result.unanswered,
    }


def main(argv: list[str] | None = None) -> int:
    from spinn.pretrained import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__)
    p.add_argument("--concurrency", default="1,4,16,64", help="devices per level (1,4,16,64)")
    p.add_argument("--seconds", type=float, default=4.0, help="sending time per point (4)")
    p.add_argument("--window", type=int, default=2, help="unanswered requests per device (2)")
    p.add_argument("--split", type=int, default=0, help="split of the INFERs (0: server-only)")
    p.add_argument("--codec", default="sparse_int8")
    p.add_argument("--batch-max", type=int, default=32, help="batch size with batching on (32)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="batch wait (2 ms)")
    p.add_argument("--device", default="auto", help="server torch device (auto)")
    p.add_argument("--workers", type=int, default=None, help="server compute threads")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = p.parse_args(argv)
    try:
        levels = sorted({int(v) for v in args.concurrency.split(",") if v.strip()})
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not levels or levels[0] < 1 or args.seconds <= 0 or args.window < 1:
        p.error("--concurrency levels, --seconds and --window must be positive")
    if args.batch_max < 2:
        p.error("--batch-max must be >= 2 (1 is batching off, always measured)")

    from spinn.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    if not 0 <= args.split < model.num_stages:
        p.error(f"--split must be in 0..{model.num_stages - 1}")
    tensors = activations(args.checkpoint, args.split, 64, args.codec)
    servers: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    rows: list[dict[str, Any]] = []
    try:
        servers["off"] = _start_server(args, 1)
        servers["on"] = _start_server(args, args.batch_max)
        print(f"{'devices':>7} | {'batching off: RESULT/s p50 p99 ms':>36} | "
              f"{'batching on: RESULT/s p50 p99 ms (mean batch)':>48}")  # fmt: skip
        for n in levels:
            pair = {}
            for mode in ("off", "on"):
                proc, port, metrics = servers[mode]
                pair[mode] = _measure(args, port, proc.pid, metrics, meta, tensors, n)
                rows.append({"mode": mode, **pair[mode]})
            off, on = pair["off"], pair["on"]
            print(f"{n:>7} | {off['requests_per_s']:>14} {off['p50_ms']:>9} {off['p99_ms']:>9} | "
                  f"{on['requests_per_s']:>14} {on['p50_ms']:>9} {on['p99_ms']:>9} "
                  f"({on['mean_batch']})", flush=True)  # fmt: skip
    finally:
        for proc, _, _ in servers.values():
            stop_process(proc)
    top = levels[-1]
    rate = {r["mode"]: r["requests_per_s"] for r in rows if r["devices"] == top}
    speedup = round(rate["on"] / rate["off"], 2) if rate.get("off") else None
    lost = sum(r["frames_lost"] for r in rows)
    print(f"batching speedup at {top} devices: {speedup}x; frames lost: {lost}")
    import torch

    print(json.dumps({
        "batching_speedup": speedup,
        "devices": top,
        "device": args.device if args.device != "auto" else
        ("cuda" if torch.cuda.is_available() else "cpu"),
        "split": args.split,
        "batch_max": args.batch_max,
        "batch_wait_ms": args.batch_wait_ms,
        "frames_lost": lost,
        "rows": rows,
    }))  # fmt: skip
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
