"""Several servers: HAProxy (deploy/haproxy.cfg) in front of two server processes, and the
device's own failover over several ``--server`` addresses.

A real device streams frames; the server that holds its connection is killed with SIGKILL
mid-stream.  Every frame must be answered exactly once (paper §4.4, robust to server
failure; DESIGN.md part 7) and offloading must continue through the other server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spinn.runtime.processes import free_port, wait_listening
from tests.support.runtime import ROOT, Device, Server, by_frame, make_small_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CONFIG = ROOT / "deploy" / "haproxy.cfg"


def _start_haproxy(tmp: Path, bind_port: int, ports: tuple[int, int]) -> subprocess.Popen[str]:
    # The shipped configuration itself, its addresses rendered through the environment.
    env = dict(os.environ, SPINN_LB_BIND=f"127.0.0.1:{bind_port}",
               SPINN_SERVER_1=f"127.0.0.1:{ports[0]}", SPINN_SERVER_2=f"127.0.0.1:{ports[1]}")  # fmt: skip
    log = open(tmp / "haproxy.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_listening(bind_port, proc, 60.0)
    return proc


def _welcomed(server: Server) -> int:
    return server.log.read_text().count(" welcomed")


@pytest.mark.parametrize("route", ["haproxy", "device-failover"])
def test_killing_one_server_mid_stream_loses_no_frame(tmp_path: Path, route: str) -> None:
    if route == "haproxy" and not Path(HAPROXY).exists():
        pytest.skip(f"haproxy binary not found ({HAPROXY}); `make` installs Debian's haproxy")
    checkpoint = str(make_small_checkpoint(tmp_path))
    ports = (free_port(), free_port())
    # Everything starts at once (each process spends seconds importing torch); the device
    # answers locally until a server is up, then offloads.
    pool = ThreadPoolExecutor(2)
    starting = [pool.submit(Server, tmp_path, p, checkpoint=checkpoint) for p in ports]
    lb = None
    if route == "haproxy":
        lb_port = free_port()
        lb = _start_haproxy(tmp_path, lb_port, ports)
        first, more = lb_port, []  # the device knows only the balancer
    else:
        # --server given twice: the helper's first address, then the second server.
        first, more = ports[0], ["--server", f"127.0.0.1:{ports[1]}"]
    # thr 1.0 and --no-continue: every frame is offloaded, so "server" answers show that
    # offloading works.
    device = Device(first, "--limit", "20000", "--rate", "40", "--split", "2", "--thr", "1.0",
                    "--no-continue", "--no-status", *more, checkpoint=checkpoint)  # fmt: skip
    servers = [f.result() for f in starting]
    pool.shutdown()
    try:
        device.wait_for(lambda rs: sum(r["where"] == "server" for r in rs) >= 20)
        holder = next(i for i, s in enumerate(servers) if _welcomed(s) > 0)
        other = servers[1 - holder]
        before = _welcomed(other)
        servers[holder].stop(signal.SIGKILL)
        killed_at = len(device.records)
        device.wait_for(
            lambda rs: sum(r["where"] == "server" for r in rs[killed_at:]) >= 20, timeout_s=30
        )
        device.proc.send_signal(signal.SIGINT)
        summary = device.finish()
    finally:
        device.kill()
        if lb is not None:
            lb.send_signal(signal.SIGTERM)
            lb.wait(10)
        for server in servers:
            server.stop()
    n = summary["frames"]
    records = by_frame(device.records, n)  # every frame answered exactly once, none lost
    assert sum(summary["answered_by"].values()) == n
    assert _welcomed(other) > before, "the device was taken over by the other server"
    assert records[-1]["where"] == "server", "the stream ends offloading"
    assert summary["server_connects"] >= 2
