"""``make demo``: a SPINN server and a device on loopback, streaming Fashion-MNIST.

Starts ``spinn_server.py`` and ``spinn_device.py`` as real processes (as they
would run on two machines), streams the Fashion-MNIST test set through the
shipped model at a mid split, shows the device's live status line, then the
summary with the accuracy against the labels.  Both processes are stopped
before it returns; nothing is left running.  Ctrl-C ends the stream early and
still shows the summary of the frames answered so far (exit status 130).  The
per-frame answers and the server log stay in a ``spinn-demo-*`` folder in the
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from spinn.runtime.config import PolicyConfig
from spinn.runtime.processes import free_port, stop_process, wait_listening

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spinn.demo",
        description="Run a SPINN server and device on loopback over the Fashion-MNIST test set.",
    )
    parser.add_argument("--frames", type=int, default=2000, help="frames to stream (2000)")
    parser.add_argument("--rate", type=float, default=150.0, help="frames per second (150)")
    parser.add_argument(
        "--policy",
        default="spinn",
        choices=("spinn", "fixed", "device-only", "server-only", "neurosurgeon", "spinn-no-ee"),
        help="how split and threshold are chosen (default spinn: the scheduler, whose "
        "choice the live line shows; fixed: --split/--thr)",
    )
    parser.add_argument(
        "--split", type=int, help="split point of --policy fixed (default: the middle one)"
    )
    parser.add_argument(
        "--thr",
        type=float,
        help=f"exit threshold of --policy fixed (default {PolicyConfig.thr_conf})",
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default: the shipped model)")
    args = parser.parse_args(argv)
    # The fixed policy's knobs, passed on to the device; any other policy chooses them.
    knobs = [f"{f}={v}" for f, v in (("--split", args.split), ("--thr", args.thr)) if v is not None]
    if knobs and args.policy != "fixed":
        print(f"note: {' '.join(knobs)} ignored: they act with --policy fixed", file=sys.stderr)
        knobs = []

    port = free_port()
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="spinn-demo-"))
    server_log = work / "server.log"
    answers = work / "answers.jsonl"
    model = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"SPINN demo: server on 127.0.0.1:{port}, {args.frames} Fashion-MNIST test images")
    print(f"  per-frame answers: {answers}\n  server log:        {server_log}")
    device: subprocess.Popen[bytes] | None = None
    awaiting_server = False
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        # The device stops reading frames, answers those in flight and prints its summary
        # on SIGTERM as on SIGINT; reading its output on shows that summary.  SIGTERM
        # rather than SIGINT: a device still starting ends quietly on it, where SIGINT
        # would print a traceback.  A second Ctrl-C does not wait for the frames in flight.
        nonlocal interrupted
        again, interrupted = interrupted, True
        if device is None:
            if awaiting_server:
                raise KeyboardInterrupt  # nothing measured yet
            return  # the device is being started: it is stopped once it is
        if device.poll() is None:
            if again:
                device.kill()
            else:
                device.terminate()

    # The children run in process groups of their own, so that Ctrl-C in the terminal
    # reaches this process only and the children stop in order: the device first.
    previous = {sig: signal.signal(sig, on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    summary: dict[str, Any] | None = None
    device_rc: int | None = None
    try:
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [python, str(ROOT / "spinn_server.py"), "--port", str(port), "--stats-interval",
                 "5", *model],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, process_group=0,
            )  # fmt: skip
            try:
                awaiting_server = True
                if interrupted:
                    raise KeyboardInterrupt
                wait_listening(port, server, 60.0)
                awaiting_server = False
                device = subprocess.Popen(
                    [python, str(ROOT / "spinn_device.py"), "--server", f"127.0.0.1:{port}",
                     "--dataset", "fashion-mnist:test", "--limit", str(args.frames),
                     "--rate", str(args.rate), "--policy", args.policy,
                     "--out", str(answers),
                     "--quiet", *knobs, *model],
                    stderr=subprocess.PIPE, env=env, cwd=ROOT, process_group=0,
                )  # fmt: skip
                if interrupted:
                    device.terminate()
                assert device.stderr is not None
                for raw in device.stderr:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    if line.startswith("summary "):
                        summary = json.loads(line[len("summary ") :])
                    elif line.startswith("frames "):
                        print("\r" + line, end="", flush=True)
                    else:
                        print("\n" + line, flush=True)
                device_rc = device.wait()
            finally:
                if device is not None and device.poll() is None:
                    stop_process(device)
                server_rc = stop_process(server)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print()
    final = [ln for ln in server_log.read_text().splitlines() if "final stats" in ln]
    if final:
        print("server:", final[-1].split("final stats ", 1)[1])
    if summary is None and interrupted:
        print("interrupted before the device reported", file=sys.stderr)
        return 130
    if summary is None or device_rc != 0:
        print(f"the device failed (exit status {device_rc}); see above", file=sys.stderr)
        return 1
    latency = summary["latency_ms"]
    assert isinstance(latency, dict)
    print(
        f"device: {summary['frames']} frames, {summary['fps']} fps, latency p50 "
        f"{latency['p50']} ms p95 {latency['p95']} ms, answered by {summary['answered_by']}, "
        f"split {summary['split']} "
        + ("no early exit" if summary["thr_conf"] is None else f"thr {summary['thr_conf']}")
    )
    if "accuracy" in summary:
        print(f"accuracy against the labels: {100 * float(summary['accuracy']):.2f}%")
    if interrupted:
        print(f"interrupted: the figures above cover the {summary['frames']} frames answered")
        return 130
    return 0 if server_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
