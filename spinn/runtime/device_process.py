"""The device as a process: ``run_device`` runs a ``SpinnDevice`` over a frame source with
the answers as JSON lines on stdout (or a file), the live status line and the summary on
stderr, and SIGINT/SIGTERM as a graceful stop (frames in flight are still answered).
``spinn-device`` and the benchmarks call it; the asyncio adapter itself is
``spinn.runtime.device``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from spinn.decisions.policy import Policy
from spinn.runtime.config import DeviceConfig
from spinn.runtime.device import DeviceError, SpinnDevice, Status
from spinn.runtime.sources import FrameSource

__all__ = ["run_device"]


def _stderr_status() -> Status:
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if tty:
            sys.stderr.write("\r" + line + "\x1b[K")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


async def run_device(
    config: DeviceConfig,
    source: FrameSource,
    *,
    out: Any = None,
    policy: Policy | None = None,
    show_status: bool = True,
) -> dict[str, Any]:
    """Run ``source`` through device and server; JSON lines to ``out`` (default stdout).

    Prints the summary as one JSON line on stderr at the end and returns it.
    SIGINT/SIGTERM stop reading the source; frames in flight are still answered.
    """
    sink = out if out is not None else sys.stdout
    device = SpinnDevice(config, policy=policy)

    def emit(record: dict[str, Any]) -> None:
        sink.write(json.dumps(record) + "\n")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, device.request_stop)
    try:
        summary = await device.run(source, emit, _stderr_status() if show_status else None)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        try:
            sink.flush()
        except OSError as exc:
            if device.output_error is None:
                raise DeviceError(f"cannot write the answers: {exc}") from exc
        if device.output_error is not None and sink is sys.stdout:
            # A closed pipe: nothing more can reach it, and the exit's flush must not
            # print a second error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if show_status and sys.stderr.isatty():
        sys.stderr.write("\n")
    sys.stderr.write("summary " + json.dumps(summary) + "\n")
    sys.stderr.flush()
    return summary
