"""Runtime benchmark: throughput and latency of device-only, server-only and a mid split.

``python -m bench.runtime`` starts ``spinn_server.py`` and then one
``spinn_device.py`` per policy, as separate processes on loopback at unlimited
bandwidth, streams the Fashion-MNIST test set through the shipped model as fast
as the device goes, and reports frames/s, latency p50/p95, where frames were
answered, and the server-side overhead per request (framing + unpack +
dispatch on the event loop) as a share of its model compute time.  Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._common import ROOT
from spinn.runtime.processes import free_port, wait_listening


def _run_device(
    port: int, frames: int, policy_args: list[str], checkpoint: list[str], work: Path, name: str
) -> dict[str, Any]:
    out = work / f"{name}.jsonl"
    cmd = [sys.executable, str(ROOT / "spinn_device.py"), "--server", f"127.0.0.1:{port}",
           "--dataset", "fashion-mnist:test", "--limit", str(frames), "--out", str(out),
           "--no-status", "--quiet", *policy_args, *checkpoint]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"device {name} failed: {proc.stderr[-2000:]}")
    match = re.search(r"^summary (\{.*\})$", proc.stderr, re.MULTILINE)
    if not match:
        raise RuntimeError(f"device {name} printed no summary: {proc.stderr[-2000:]}")
    summary = dict(json.loads(match.group(1)))
    ids = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    summary["lost"] = frames - len(set(ids))
    summary["duplicates"] = len(ids) - len(set(ids))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__)
    parser.add_argument("--frames", type=int, default=600, help="frames per policy (600)")
    parser.add_argument("--split", type=int, help="the mid split (default S // 2)")
    parser.add_argument("--thr", type=float, default=0.8, help="exit threshold (0.8)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default: shipped model)")
    args = parser.parse_args(argv)

    from spinn.model.checkpoint import load_checkpoint
    from spinn.pretrained import DEFAULT_CHECKPOINT

    model, _ = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT)
    mid = args.split if args.split is not None else model.num_stages // 2
    checkpoint = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    policies = {
        "device-only": ["--policy", "device-only"],
        # Without the local continuation: split 0 would otherwise race the whole network
        # on the device, which is not what a server-only baseline does.
        "server-only": ["--policy", "server-only", "--no-continue"],
        f"split-{mid}": ["--split", str(mid), "--thr", str(args.thr)],
    }
    work = Path(tempfile.mkdtemp(prefix="spinn-bench-runtime-"))
    port = free_port()
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "spinn_server.py"), "--port", str(port),
             "--stats-interval", "0", *checkpoint],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
        )  # fmt: skip
        try:
            wait_listening(port, server, 90.0)
            results = {
                name: _run_device(port, args.frames, flags, checkpoint, work, name)
                for name, flags in policies.items()
            }
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    match = re.search(r"final stats (\{.*\})", log_path.read_text())
    stats = json.loads(match.group(1)) if match else {}
    compute = float(stats.get("compute_ms_total", 0.0))
    overhead = float(stats.get("overhead_ms_total", 0.0))
    requests = int(stats.get("requests", 0))

    print(f"runtime on loopback, unlimited bandwidth, {args.frames} frames per policy, "
          f"{os.cpu_count()} cores")  # fmt: skip
    header = f"{'policy':<14}{'fps':>8}{'p50 ms':>9}{'p95 ms':>9}{'offload':>9}  answered by"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        lat = r["latency_ms"]
        print(
            f"{name:<14}{r['fps']:>8.1f}{lat['p50']:>9.2f}{lat['p95']:>9.2f}"
            f"{100 * r['offload_rate']:>8.1f}%  {r['answered_by']}"
        )
    share = overhead / compute if compute > 0 else float("nan")
    per_request = overhead / requests if requests else float("nan")
    print(
        f"server: {requests} requests, compute {compute / max(stats.get('computed', 1), 1):.2f} "
        f"ms/request, overhead {per_request:.3f} ms/request = {100 * share:.1f}% of compute"
    )
    frames_lost = sum(r["lost"] for r in results.values())
    duplicates = sum(r["duplicates"] for r in results.values())
    record = {
        "bench": "runtime",
        "frames": args.frames * len(results),
        "frames_lost": frames_lost,
        "frames_duplicated": duplicates,
        "fps": {name: r["fps"] for name, r in results.items()},
        "latency_p50_ms": {name: r["latency_ms"]["p50"] for name, r in results.items()},
        "latency_p95_ms": {name: r["latency_ms"]["p95"] for name, r in results.items()},
        "server_overhead_share": round(share, 4),
        "server_overhead_ms_per_request": round(per_request, 4),
    }
    print(json.dumps(record))
    return 0 if frames_lost == 0 and duplicates == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
