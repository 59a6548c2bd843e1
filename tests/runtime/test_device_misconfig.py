"""A device configured unlike its server says what is likely wrong (PROTOCOL.md §10).

TLS on one end only reads like a server that is down, so the device keeps answering
locally, but logs one warning naming the flag, and gives up (an error, exit status 2)
when the handshake failed that way ``misconfig_tries`` times in a row, unless told to
retry forever; a token that differs ends the run at once with an error that says the
tokens differ. Either way the frames already read are answered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import uvloop

from spinn.runtime.config import DeviceConfig, ServerConfig
from spinn.runtime.device import DeviceError, SpinnDevice
from spinn.runtime.server import SpinnServer
from tests.support.runtime import by_frame, needs_openssl, noise_frames, run_in_process

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
    run = run_in_process(
        checkpoint, noise_frames(20), rate_fps=10.0, tls_ca=certs["ca_pem"], retry_forever=True
    )
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
    run = run_in_process(
        checkpoint, noise_frames(20), rate_fps=10.0, server_options=tls, retry_forever=True
    )
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


@needs_openssl
@pytest.mark.parametrize("tls_on", ["device", "server"])
def test_a_device_failing_the_same_way_gives_up_and_answers_what_it_read(
    certs: dict[str, Path], checkpoint: Path, tls_on: str
) -> None:
    records: list[dict[str, object]] = []
    tls_server: dict[str, Any] = {"tls_cert": certs["server_pem"], "tls_key": certs["server_key"]}

    async def main() -> tuple[SpinnDevice, str]:
        server = SpinnServer(
            ServerConfig.from_fields(
                checkpoint=checkpoint,
                port=0,
                stats_interval_s=0,
                **(tls_server if tls_on == "server" else {}),
            )  # fmt: skip
        )
        await server.start()
        device = SpinnDevice(
            DeviceConfig.from_fields(
                checkpoint=checkpoint,
                server=("127.0.0.1", server.port),
                status_interval_s=0,
                rate_fps=50.0,
                # The first connect is awaited for 0.5 s, then frames are read while the
                # device retries every 0.2..0.4 s: the fourth failure comes after some.
                connect_timeout_s=0.5,
                misconfig_tries=4,
                reconnect_base_s=0.2,
                reconnect_cap_s=0.4,
                tls_ca=certs["ca_pem"] if tls_on == "device" else None,
            )
        )
        try:
            with pytest.raises(DeviceError) as info:
                await device.run(noise_frames(100_000), records.append)
        finally:
            await server.close()
        return device, str(info.value)

    device, message = uvloop.run(main())
    assert "is the server using TLS?" in message, message
    assert "failed this way 4 times in a row; --retry-forever keeps trying" in message
    # It stopped reading frames, and every frame it had read was answered, once.
    assert 0 < device.core.frames_read < 100_000
    by_frame(records, device.core.frames_read)  # type: ignore[arg-type]
