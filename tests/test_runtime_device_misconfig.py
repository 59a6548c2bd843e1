"""A device configured unlike its server says what is likely wrong (PROTOCOL.md §10).

TLS on one end only reads like a server that is down, so the device keeps answering
locally, but logs one warning naming the flag; a token that differs ends the run with
an error that says the tokens differ.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spinn.runtime.device import DeviceError
from tests._runtime_support import needs_openssl, noise_frames, run_in_process

pytestmark = pytest.mark.timeout(90)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "spinn.device" and r.levelno == logging.WARNING
    ]


def _hints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in _warnings(caplog) if "TLS" in m]


@needs_openssl
def test_tls_device_against_a_plain_server_warns_once(
    certs: dict[str, Path], checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spinn.device")
    run = run_in_process(checkpoint, noise_frames(20), rate_fps=10.0, tls_ca=certs["ca_pem"])
    # Unchanged: the frames are answered locally.
    assert run.summary["frames"] == 20 and run.summary["server_connects"] == 0
    hints = _hints(caplog)
    assert len(hints) == 1, _warnings(caplog)
    assert "is the server using TLS? If not, start the device without --tls/--tls-ca" in hints[0]


@needs_openssl
def test_plain_device_against_a_tls_server_warns_once(
    certs: dict[str, Path], checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "spinn.device")
    tls = {"tls_cert": certs["server_pem"], "tls_key": certs["server_key"]}
    run = run_in_process(checkpoint, noise_frames(20), rate_fps=10.0, server_options=tls)
    assert run.summary["frames"] == 20 and run.summary["server_connects"] == 0
    hints = _hints(caplog)
    assert len(hints) == 1, _warnings(caplog)
    assert "is the server using TLS? If so, start the device with --tls or --tls-ca" in hints[0]


def _token(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_different_token_is_named_as_such(checkpoint: Path, tmp_path: Path) -> None:
    server_token = _token(tmp_path / "server", "a-shared-token-of-32-bytes-long!")
    device_token = _token(tmp_path / "device", "an-older-token-of-enough-bytes!!")
    with pytest.raises(DeviceError) as info:
        run_in_process(checkpoint, noise_frames(3), token_file=device_token,
                       server_options={"token_file": server_token})  # fmt: skip
    message = str(info.value)
    assert "the device's and the server's tokens differ" in message
    assert "server failed" not in message
