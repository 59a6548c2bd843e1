"""`python -m spinn.demo` (make demo): runs, shows status and summary, leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import pytest

from tests.support.runtime import PYTHON, ROOT, make_small_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_demo_streams_reports_accuracy_and_cleans_up(tmp_path: Path) -> None:
    checkpoint = make_small_checkpoint(tmp_path)
    proc = subprocess.run(
        [PYTHON, "-m", "spinn.demo", "--checkpoint", str(checkpoint), "--frames", "120",
         "--rate", "200"],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-2000:]
    port = int(re.search(r"server on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert re.search(r"frames +\d+ \| +[\d.]+ fps", out), "live status line shown"
    assert "device: 120 frames" in out and "accuracy against the labels:" in out
    assert '"requests"' in out  # the server's final stats
    answers = Path(re.search(r"per-frame answers: (\S+)", out).group(1))  # type: ignore[union-attr]
    assert len(answers.read_text().splitlines()) == 120
    # Nothing left behind: the port is closed and no process still uses it.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if ("spinn_server.py" in cmd or "spinn_device.py" in cmd) and str(port) in cmd:
            leftovers.append(cmd)
    assert not leftovers


@pytest.mark.parametrize("when", ["streaming", "device-starting"])
def test_ctrl_c_stops_both_and_shows_what_was_measured(tmp_path: Path, when: str) -> None:
    """Ctrl-C signals the terminal's whole foreground process group: the demo's."""
    checkpoint = make_small_checkpoint(tmp_path)
    proc = subprocess.Popen(
        [PYTHON, "-m", "spinn.demo", "--checkpoint", str(checkpoint), "--frames", "100000",
         "--rate", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=_read_into, args=(proc.stdout, out)),
        threading.Thread(target=_read_into, args=(proc.stderr, err)),
    ]
    for r in readers:
        r.start()
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(out + err)
            children = psutil.Process(proc.pid).children(recursive=True)
            device_started = any("spinn_device.py" in _cmdline(c) for c in children)
            # The live status line shows results once the device answers frames.
            streaming = re.search(rb"frames +[1-9]\d* \|", b"".join(out))
            if streaming if when == "streaming" else device_started:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=40)
        _, left = psutil.wait_procs(children, timeout=5)
    finally:
        for p in [proc, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        proc.wait()
        for r in readers:
            r.join(10)
    stdout, stderr = b"".join(out).decode(), b"".join(err).decode()
    assert rc == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr, stdout[-3000:] + stderr[-3000:]
    if when == "streaming":
        assert re.search(r"device: \d+ frames, [\d.]+ fps, latency p50", stdout), stdout[-2000:]
        assert "accuracy against the labels:" in stdout and "interrupted" in stdout
    # Both the server and the device were stopped, not left behind.
    assert len(children) >= 2 and not left, [_cmdline(c) for c in left]
    port = int(re.search(r"server on 127\.0\.0\.1:(\d+)", stdout).group(1))  # type: ignore[union-attr]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _read_into(stream: IO[bytes], chunks: list[bytes]) -> None:
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        chunks.append(chunk)


def _cmdline(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""
