"""spinn_server.py: flags, clear errors, graceful SIGTERM/SIGINT with exit status 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import spinn_server
from spinn.runtime.processes import free_port, wait_listening
from tests.support.runtime import PYTHON, ROOT

pytestmark = pytest.mark.timeout(90)


def test_help_names_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        spinn_server.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--port", "--workers", "--torch-threads", "--no-report-compute"):
        assert flag in out


def test_flags_fill_the_config(checkpoint: Path) -> None:
    args = spinn_server.build_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--port", "0", "--no-report-compute", "--workers", "3"]
    )
    config = spinn_server.config_from_args(args)
    assert config.compute.report_compute is False and config.compute.workers == 3
    assert config.operations.port == 0 and config.compute.checkpoint == checkpoint
    assert config.compute.dictionaries is True
    no_dicts = spinn_server.build_parser().parse_args(["--no-dictionaries"])
    assert spinn_server.config_from_args(no_dicts).compute.dictionaries is False


def test_bad_values_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        spinn_server.main(["--port", "70000"])
    assert exc.value.code == 2
    assert "port must be in 0..65535" in capsys.readouterr().err
    missing = tmp_path / "nope.pt"
    assert spinn_server.main(["--checkpoint", str(missing), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--workers", "-3"], "--workers must be >= 1, got -3"),
        (["--torch-threads", "0"], "--torch-threads must be >= 1, got 0"),
        (["--max-in-flight", "0"], "--max-in-flight must be in 1..1024"),
        # Above the protocol's bound on unanswered requests, overload would be fatal, not BUSY.
        (["--max-in-flight", "2000"], "--max-in-flight must be in 1..1024"),
        (["--idle-timeout", "0"], "--idle-timeout must be > 0, got 0"),
        (["--handshake-timeout", "-1"], "--handshake-timeout must be > 0, got -1"),
        (["--max-queued", "0"], "--max-queued must be >= 1, got 0"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--max-frame-bytes", "10"], "--max-frame-bytes must be in [1024"),
        (["--grace", "-1"], "--grace must be >= 0, got -1"),
        (["--stats-interval", "-1"], "--stats-interval must be >= 0, got -1"),
        (["--port", "70000"], "--port must be in 0..65535, got 70000"),
        (["--batch-max", "0"], "--batch-max must be in 1..1024, got 0"),
        (["--device", "tpu"], "--device: unknown 'tpu'; choose one of auto, cpu, cuda or cuda:N"),
        (["--max-ping-rate", "0"], "--max-ping-rate must be > 0, got 0.0"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_bad_flags_are_named_before_the_model_loads(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        spinn_server.main(["--port", "0", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "named"),
    [("--port", "--host/--port"), ("--metrics-port", "--metrics-host/--metrics-port")],
)
def test_a_busy_port_is_named_with_its_flag(
    flag: str, named: str, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", flag: str(taken)}
        argv = ["--checkpoint", str(checkpoint), "--workers", "1", "-q"]
        for name, port in ports.items():
            argv += [name, port]
        assert spinn_server.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{taken} ({named}): Address already in use" in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.integration
def test_sigterm_stops_gracefully_with_status_0(checkpoint: Path) -> None:
    # SIGINT takes the same path; integration test (1) stops its server with it.
    sig = signal.SIGTERM
    port = free_port()
    proc = subprocess.Popen(
        [PYTHON, str(ROOT / "spinn_server.py"), "--checkpoint", str(checkpoint),
         "--port", str(port), "--stats-interval", "0.2"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_listening(port, proc, 60)
        time.sleep(0.5)  # let a stats line pass
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stats connections=" in err and "final stats" in err
