"""Chaos: one device stream through netshape while the path and the server fail in turn.

Chaos: during a single stream, a connection reset, a black hole, a
``limit_data`` cut in the middle of a frame (netshape's ``limit_bytes``, as toxiproxy's
``limit_data``), and a server killed with SIGKILL then restarted on the same port. After
each fault the device must be back to offloading (server answers again) and, at the end,
every frame must have been answered exactly once (paper §4.4, "robust to server failure";
DESIGN.md part 7). Server, proxy and device are real processes, launched as the runtime's
integration tests launch them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spinn.runtime.processes import free_port
from tests.support.runtime import (
    Device,
    Server,
    by_frame,
    make_small_checkpoint,
    netshape_control,
    netshape_process,
    stop_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

_RATE = "40"
"""Frames per second: enough answers per phase to see each fault and the recovery."""


def _server_answers_since(start: int, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda rs: sum(r["where"] == "server" for r in rs[start:]) >= n


def _not_server_since(start: int, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda rs: sum(r["where"] != "server" for r in rs[start:]) >= n


def test_faults_in_sequence_lose_nothing_and_offloading_resumes(tmp_path: Path) -> None:
    checkpoint = str(make_small_checkpoint(tmp_path))
    server_port, proxy_port, control = free_port(), free_port(), free_port()
    server = Server(tmp_path, server_port, checkpoint=checkpoint)
    proxy = netshape_process(proxy_port, server_port, control)
    # thr 1.0 and --no-continue: every frame is offloaded, so "server" answers show that
    # offloading works and anything else shows a fault being absorbed on the device.
    device = Device(proxy_port, "--limit", "20000", "--rate", _RATE, "--split", "2",
                    "--thr", "1.0", "--no-continue", "--no-status",
                    checkpoint=checkpoint)  # fmt: skip
    phases: list[tuple[str, int, int]] = []
    try:
        device.wait_for(_server_answers_since(0, 10))

        def fault(name: str, inject: Callable[[], None], restore: Callable[[], None]) -> None:
            start = len(device.records)
            inject()
            device.wait_for(_not_server_since(start, 5), timeout_s=30)
            restore()
            back = len(device.records)
            device.wait_for(_server_answers_since(back, 8), timeout_s=30)
            phases.append((name, start, back))

        fault(
            "reset",
            lambda: netshape_control(control, {"cmd": "outage", "mode": "reset"}),
            lambda: netshape_control(control, {"cmd": "restore"}),
        )
        fault(
            "blackhole",
            lambda: netshape_control(control, {"cmd": "outage", "mode": "blackhole"}),
            lambda: netshape_control(control, {"cmd": "restore"}),
        )
        # 3001 bytes: the live connection is cut at once, and every reconnection after
        # HELLO and a few INFERs, in the middle of a frame (no frame here is 3001 bytes).
        fault(
            "limit_data",
            lambda: netshape_control(
                control, {"cmd": "set", "direction": "up", "limit_bytes": 3001}
            ),
            lambda: netshape_control(
                control, {"cmd": "set", "direction": "up", "limit_bytes": None}
            ),
        )

        def kill() -> None:
            server.stop(signal.SIGKILL)

        def restart() -> None:
            nonlocal server
            server = Server(tmp_path, server_port, checkpoint=checkpoint)

        fault("server kill", kill, restart)
        device.proc.send_signal(signal.SIGINT)
        summary = device.finish()
    finally:
        stop_all(device, proxy, server)

    n = summary["frames"]
    by_frame(device.records, n)  # every frame answered exactly once
    assert sum(summary["answered_by"].values()) == n
    assert [name for name, _, _ in phases] == ["reset", "blackhole", "limit_data", "server kill"]
    for name, start, back in phases:
        during = [r["where"] for r in device.records[start:back]]
        assert "fallback" in during, f"{name}: frames in flight were finished on the device"
    # Each fault cost the connection; each recovery made a new one (limit_data: several).
    assert summary["server_connects"] >= 5, summary["server_connects"]
