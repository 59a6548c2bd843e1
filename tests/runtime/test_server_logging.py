"""What the server logs at INFO: devices, not load balancers' TCP health checks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import uvloop

from protocol import PROTOCOL_VERSION, Bye, Hello, Welcome
from spinn.runtime.config import ServerConfig
from spinn.runtime.server import SpinnServer
from tests.support.runtime import RawClient

pytestmark = pytest.mark.timeout(60)


def test_health_checks_stay_below_info_and_devices_do_not(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        server = SpinnServer(
            ServerConfig.from_fields(checkpoint=checkpoint, port=0, stats_interval_s=0)
        )
        await server.start()
        try:
            # A TCP health check: connect, say nothing, close.
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.close()
            while server.stats.connections_total < 1 or server.stats.connections:
                await asyncio.sleep(0.01)
            meta = server.meta
            device = await RawClient.open(server.port)
            device.send(Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, ("float32",)))
            assert isinstance(await device.next(), Welcome)
            device.send(Bye("done"))
            assert isinstance(await device.next(), Bye)
            device.close()
            while server.stats.connections:
                await asyncio.sleep(0.01)
        finally:
            await server.close()

    with caplog.at_level(logging.DEBUG, logger="spinn"):
        uvloop.run(main())
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert [r.levelno for r in disconnects] == [logging.DEBUG, logging.INFO]
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and "connected from" in r.getMessage()
    ]
