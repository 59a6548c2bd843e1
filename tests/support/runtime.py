"""Shared by the runtime tests: a small real checkpoint with its profile, and helpers.

The model is a real ResNet-20 (width 8) progressive model with seeded random
weights: fast on two cores and bit-for-bit reproducible.  The profile holds
per-stage times measured here and activation sizes from the model itself.

The helpers drive a server two ways: in this process over loopback (``serve``,
``hello``, ``RawClient``), and as real processes (``Server``, ``Device``,
``netshape_process``), as they would run on separate machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvloop

from protocol import NEED_DATA, PROTOCOL_VERSION, Connection, ConnectionClosed, Hello, Welcome
from spinn.decisions.offline_profile import Profile
from spinn.decisions.policy import Policy
from spinn.model.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from spinn.model.progressive import InputSpec
from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.runtime.config import DeviceConfig, ServerConfig
from spinn.runtime.device import SpinnDevice
from spinn.runtime.processes import free_port, stop_process, wait_listening
from spinn.runtime.server import SpinnServer
from spinn.runtime.sources import ArraySource, FrameSource

__all__ = [
    "CHECKPOINT",
    "DeviceRun",
    "PYTHON",
    "ROOT",
    "Device",
    "RawClient",
    "Server",
    "by_frame",
    "hello",
    "make_small_checkpoint",
    "netshape_control",
    "netshape_process",
    "noise_frames",
    "run_in_process",
    "sample_input",
    "serve",
    "until_closed",
]

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")

# The shipped model, which the process launchers run unless told otherwise;
# SPINN_TEST_CHECKPOINT runs the same tests against another one.
CHECKPOINT = Path(os.environ.get("SPINN_TEST_CHECKPOINT", DEFAULT_CHECKPOINT))


# Files (and the global torch RNG state after building) of each seed already built in this
# process: a build takes seconds on two busy cores, and its output depends on the seed alone.
_BUILT: dict[int, tuple[bytes, bytes, torch.Tensor]] = {}


def make_small_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write ``model.pt`` and ``profile.json`` into ``directory``; returns the model path."""
    path = directory / "model.pt"
    if seed in _BUILT:
        model_bytes, profile_bytes, rng_state = _BUILT[seed]
        path.write_bytes(model_bytes)
        (directory / "profile.json").write_bytes(profile_bytes)
        torch.set_rng_state(rng_state)  # as if built here: callers may draw from it next
        return path
    _build_small_checkpoint(directory, seed)
    _BUILT[seed] = (path.read_bytes(), (directory / "profile.json").read_bytes(),
                    torch.get_rng_state())  # fmt: skip
    return path


def _build_small_checkpoint(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="resnet20",
        input_spec=InputSpec(1, 28, 28, (0.286,), (0.353,)),
        num_classes=10,
        arch_options={"width": 8},
    )
    model = config.build().eval()
    path = directory / "model.pt"
    meta = save_checkpoint(path, model, config, class_names=[f"c{i}" for i in range(10)])
    model, meta = load_checkpoint(path)
    write_stub_profile(model, meta, directory / "profile.json")


def write_stub_profile(model: Any, meta: Any, out: Path) -> None:
    """A profile for ``model`` (a loaded checkpoint and its metadata) with made-up times and
    rates: 0.5 ms per device stage, 0.4 ms per server stage, every input at the first exit
    at threshold 0 and at the last at 1 — enough for a device to run."""
    stages = model.num_stages
    splits = []
    for s in range(stages):
        shape = tuple(model.split_shape(s))
        numel = int(torch.tensor(shape).prod())
        splits.append({"split": s, "shape": list(shape), "numel": numel,
                       "bytes": {"float32": 4 * numel}})  # fmt: skip
    exits = len(model.exit_stages)
    Profile(
        model_id=meta.model_id,
        weights_sha256=meta.weights_sha256,
        arch=meta.arch,
        num_stages=stages,
        exit_stages=tuple(model.exit_stages),
        splits=tuple(splits),  # type: ignore[arg-type]
        stage_device_ms=(0.5,) * stages,
        stage_server_ms=(0.4,) * stages,
        exit_accuracy=(0.1,) * exits,
        thresholds=(  # type: ignore[arg-type]
            {"thr_conf": 0.0, "exit_rate": [1.0] + [0.0] * (exits - 1), "accuracy": 0.1},
            {"thr_conf": 1.0, "exit_rate": [0.0] * (exits - 1) + [1.0], "accuracy": 0.1},
        ),
        calibration_size=1,
    ).save(out)


class RawClient:
    """A device end speaking the protocol by hand, to probe the server."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ):
        self.reader, self.writer, self.conn = reader, writer, conn
        self.sent_bytes = 0
        """Bytes written so far (what the server's PONG ``received_bytes`` counts)."""

    @classmethod
    async def open(cls, port: int) -> RawClient:
        from protocol import Role

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, Connection(Role.DEVICE))

    def send(self, *events: object) -> None:
        data = b"".join(self.conn.send(e) for e in events)  # type: ignore[arg-type]
        self.sent_bytes += len(data)
        self.writer.write(data)

    async def next(self, timeout: float = 5.0) -> object:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            self.conn.receive_data(data)

    def close(self) -> None:
        self.writer.close()


def serve(
    checkpoint: Path, body: Callable[[SpinnServer, int], Awaitable[None]], **options: object
) -> SpinnServer:
    """Run ``body(server, port)`` against a server started in this process; the closed server."""
    config = ServerConfig.from_fields(checkpoint=checkpoint, port=0, stats_interval_s=0, **options)  # type: ignore[arg-type]

    async def main() -> SpinnServer:
        server = SpinnServer(config)
        await server.start()
        try:
            await body(server, server.port)
        finally:
            await server.close()
        return server

    return uvloop.run(main())


async def until_closed(client: RawClient, timeout: float = 5.0) -> list[object]:
    """Events from the server until it closes the connection."""
    events: list[object] = []
    while True:
        event = await client.next(timeout)
        if isinstance(event, ConnectionClosed):
            return events
        events.append(event)


async def hello(client: RawClient, server: SpinnServer) -> Welcome:
    """Complete ``client``'s handshake with ``server`` (float32 only); the WELCOME."""
    meta = server.meta
    client.send(Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, ("float32",)))
    welcome = await client.next()
    assert isinstance(welcome, Welcome), welcome
    return welcome


def sample_input(seed: int) -> torch.Tensor:
    """A seeded random input of the small model's shape (1, 1, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, 28, 28, generator=g)


class Server:
    """spinn_server.py in its own process; its log goes to a file."""

    def __init__(
        self, tmp: Path, port: int, *flags: str, checkpoint: Path | str = CHECKPOINT
    ) -> None:
        self.log = tmp / f"server-{port}-{time.monotonic_ns()}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PYTHON, str(ROOT / "spinn_server.py"), "--checkpoint", str(checkpoint),
             "--port", str(port), "--stats-interval", "1", *flags],
            stdout=self._fh, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            wait_listening(port, self.proc, 60.0)
        except BaseException:
            self.stop(signal.SIGKILL)  # no process or open log left behind
            raise

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGKILL after 30 s); the exit status."""
        status = stop_process(self.proc, 30.0, sig)
        self._fh.close()
        return status

    def final_stats(self) -> dict[str, Any]:
        """The stats line the server logs as it exits."""
        text = self.log.read_text()
        match = re.search(r"final stats (\{.*\})", text)
        assert match, text[-2000:]
        return dict(json.loads(match.group(1)))


class Device:
    """spinn_device.py in its own process; JSON lines are collected as they come."""

    def __init__(self, port: int, *flags: str, checkpoint: Path | str = CHECKPOINT) -> None:
        self.records: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [PYTHON, str(ROOT / "spinn_device.py"), "--checkpoint", str(checkpoint),
             "--server", f"127.0.0.1:{port}", "--dataset", "fashion-mnist:test",
             "--status-interval", "0.5", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self._err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    @property
    def stderr(self) -> str:
        """Everything the device wrote to stderr so far."""
        return "".join(self._err)

    def wait_for(self, predicate: Any, timeout_s: float = 60.0) -> None:
        """Return once ``predicate(records)`` holds; fail if the device ends or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not predicate(list(self.records)):
            assert self.proc.poll() is None or self._reader.is_alive(), "device ended early"
            assert time.monotonic() < deadline, "device did not get there in time"
            time.sleep(0.02)

    def finish(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Wait for a clean exit; the summary the device printed."""
        self.proc.wait(timeout_s)
        self._reader.join(5)
        self._err_reader.join(5)
        assert self.proc.returncode == 0, self.stderr[-3000:]
        match = re.search(r"^summary (\{.*\})$", self.stderr, re.MULTILINE)
        assert match, self.stderr[-3000:]
        return dict(json.loads(match.group(1)))

    def kill(self) -> None:
        """SIGKILL the device if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def by_frame(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``records`` in frame order, asserting that frames 0..n-1 were each answered once."""
    ids = sorted(r["frame"] for r in records)
    assert ids == list(range(n)), "every frame answered exactly once"
    return sorted(records, key=lambda r: r["frame"])


def netshape_process(
    port: int, upstream: int, control: int, *shaping: str
) -> subprocess.Popen[str]:
    """tools.netshape in its own process, relaying ``port`` to ``upstream``, once it listens;
    ``shaping`` are its flags (e.g. ``--rate 20mbit``)."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "tools.netshape", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{upstream}", "--control", f"127.0.0.1:{control}", *shaping],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_listening(port, proc, 60.0)
        wait_listening(control, proc, 60.0)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def netshape_control(port: int, command: dict[str, Any]) -> dict[str, Any]:
    """Send one JSON command to netshape's control port; its reply, asserted ``ok``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((json.dumps(command) + "\n").encode())
        answer = s.makefile().readline()
    reply = dict(json.loads(answer))
    assert reply["ok"], reply
    return reply


def noise_frames(n: int, seed: int = 0) -> ArraySource:
    """`n` random 28×28 uint8 images with random labels: a camera at the system's edge."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return ArraySource(images, rng.integers(0, 10, n), name="noise")


@dataclass(frozen=True)
class DeviceRun:
    """What one in-process device run left behind (``run_in_process``)."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    device: SpinnDevice
    server: SpinnServer | None
    run_s: float
    """Wall time of ``SpinnDevice.run`` alone (server start-up excluded)."""


# Device options for a test that needs every offloaded frame answered by the server: a
# RESULT is awaited 100x its expected time plus 10 s, so that a slow moment of a shared
# machine does not finish a frame locally as ``fallback`` (PolicyConfig.deadline_factor).
PATIENT = {"deadline_factor": 100.0, "deadline_margin_s": 10.0}


def run_in_process(
    checkpoint: Path,
    source: FrameSource,
    *,
    serve: bool = True,
    connect: bool = True,
    custom_policy: Policy | None = None,
    server_options: dict[str, Any] | None = None,
    **options: Any,
) -> DeviceRun:
    """``source`` through a real device in this process, against a real server on loopback
    when ``serve`` (``connect=False``: no server configured at all, a device-only run).
    ``custom_policy`` is a policy object used instead of the one ``PolicyConfig.policy``
    names; ``options`` go to ``DeviceConfig``, ``server_options`` to ``ServerConfig``."""
    records: list[dict[str, Any]] = []

    async def main() -> DeviceRun:
        port = free_port()
        server = None
        if serve:
            # server_options may name another checkpoint (a server with other files).
            fields = {"checkpoint": checkpoint, "port": port, "stats_interval_s": 0}
            server = SpinnServer(ServerConfig.from_fields(**{**fields, **(server_options or {})}))
            await server.start()
        config = DeviceConfig.from_fields(
            checkpoint=checkpoint,
            server=("127.0.0.1", port) if connect else None,
            status_interval_s=0,
            **options,
        )
        device = SpinnDevice(config, policy=custom_policy)
        t0 = time.perf_counter()
        try:
            summary = await device.run(source, records.append)
        finally:
            run_s = time.perf_counter() - t0
            if server is not None:
                await server.close()
        return DeviceRun(records, summary, device, server, run_s)

    return uvloop.run(main())


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a device certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(directory, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=spinn-test-ca")  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "device.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "device"):
        _openssl(directory, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=spinn-{name}")  # fmt: skip
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                 "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext")  # fmt: skip
    # A second CA that signed nothing here: trusting it must not be enough.
    _openssl(directory, "req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem",
             "-days", "2", "-subj", "/CN=other-ca")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in directory.iterdir()}


def stop_all(device: Device, proxy: subprocess.Popen[str], server: Server) -> None:
    """Tear down a device → netshape → server path: the device killed, netshape stopped by
    SIGTERM and given 10 s to exit (a hang fails the test), then the server."""
    device.kill()
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(10)
    server.stop()
