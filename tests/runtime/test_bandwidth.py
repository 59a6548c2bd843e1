"""The bandwidth estimate on a long, shaped path (netshape), from uploads alone.

Server, netshape and device are separate processes.  PING probes are off, so the
estimate comes only from the upload timer (``spinn.runtime.uplink``): requests paced at
20 per second over a 40 ms round trip each cross an idle 20 Mbit/s uplink in about 10 ms,
and every one of them leaves before the previous answer is back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spinn.runtime.processes import free_port
from tests.support.runtime import Device, Server, by_frame, netshape_process, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RATE_BPS = 20e6


def test_uploads_measure_a_long_paced_path(tmp_path: Path) -> None:
    n = 120
    server_port, proxy_port, control = free_port(), free_port(), free_port()
    server = Server(tmp_path, server_port)
    # A one-segment bucket: a 25 KB request cannot slip through in a burst.
    proxy = netshape_process(proxy_port, server_port, control, "--rate", "20mbit", "--delay",
                             "20ms", "--burst", "1500")  # fmt: skip
    # Split 1 in float32: 25 KB per request; thr 1.0 without the local race: all offloaded.
    device = Device(proxy_port, "--limit", str(n), "--rate", "20", "--split", "1", "--thr",
                    "1.0", "--no-continue", "--codec", "float32", "--probe-bytes", "0")  # fmt: skip
    try:
        summary = device.finish()
    finally:
        stop_all(device, proxy, server)
    by_frame(device.records, n)
    assert summary["answered_by"]["server"] >= n // 2, summary
    # Timed from the previous answer instead, each upload would read the 50 ms pacing:
    # about 4 Mbit/s.
    estimates = summary["estimates"]
    assert estimates["bandwidth_samples"] >= 10, estimates
    assert 0.6 * RATE_BPS <= estimates["bandwidth_bps"] <= 2 * RATE_BPS, estimates
