"""`python -m spinn.demo` (make demo): runs, shows status and summary, leaves nothing behind."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests._runtime_support import PYTHON, ROOT, make_small_checkpoint

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
