"""Helpers for running SPINN's own processes on loopback: the demo, the benchmarks and
the tests start a server (and netshape) as real processes and need a free port, to wait
until it listens, and to stop it gracefully."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Any

__all__ = ["free_port", "stop_process", "wait_listening"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """Return once ``proc`` accepts connections on ``port``; raise RuntimeError naming the
    command if it exits first or does not listen within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def stop_process(
    proc: subprocess.Popen[Any], timeout_s: float = 10.0, sig: int = signal.SIGTERM
) -> int:
    """``sig`` (default SIGTERM, a graceful shutdown), SIGKILL after ``timeout_s``; the
    exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
