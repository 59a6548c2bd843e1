"""Prometheus metrics of the server, scraped over HTTP on loopback (spinn.runtime.prometheus_metrics)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from protocol import Cancel, Error, ErrorCode, Infer, Result, pack
from spinn.runtime.config import ConfigError, OperationsConfig, ServerConfig
from spinn.runtime.server import SpinnServer
from tests.support.runtime import RawClient, hello, sample_input

pytestmark = pytest.mark.timeout(60)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, get)


def test_metrics_count_requests_cancels_errors_and_compute(checkpoint: Path) -> None:
    config = ServerConfig.from_fields(checkpoint=checkpoint, port=0, stats_interval_s=0, workers=1,
                          metrics_port=0)  # fmt: skip
    scraped: dict[str, str] = {}

    async def main() -> None:
        server = SpinnServer(config)
        await server.start()
        assert server.metrics_port is not None and server.metrics_port > 0
        try:
            scraped["idle"] = await _scrape(server.metrics_port)
            client = await RawClient.open(server.port)
            await hello(client, server)
            x = pack(sample_input(5).numpy(), "float32")
            # One worker: 1 runs, 2 queues and is cancelled, 3 runs; split 99 is refused.
            client.send(Infer(1, 0, 1.0, x), Infer(2, 0, 1.0, x), Cancel(2), Infer(3, 0, 1.0, x),
                        Infer(4, 99, 1.0, x))  # fmt: skip
            events = [await client.next() for _ in range(4)]
            assert sum(isinstance(e, Result) for e in events) == 2
            codes = sorted(e.code.name for e in events if isinstance(e, Error))
            assert codes == [ErrorCode.BAD_SPLIT.name, ErrorCode.CANCELLED.name]
            scraped["busy"] = await _scrape(server.metrics_port)
            client.close()
        finally:
            await server.close()
        with pytest.raises(OSError):  # the endpoint closes with the server
            await _scrape(server.metrics_port)

    uvloop.run(main())
    idle = _samples(scraped["idle"])
    assert idle[("spinn_server_requests_total", ())] == 0
    assert idle[("spinn_server_queue_depth", ())] == 0
    m = _samples(scraped["busy"])
    assert m[("spinn_server_connections", ())] == 1
    assert m[("spinn_server_connections_total", ())] == 1
    assert m[("spinn_server_requests_total", ())] == 3  # the bad split was never accepted
    assert m[("spinn_server_results_total", ())] == 2
    assert m[("spinn_server_cancels_received_total", ())] == 1
    assert m[("spinn_server_requests_dropped_total", (("reason", "cancelled_queued"),))] == 1
    assert m[("spinn_server_errors_total", (("code", "CANCELLED"),))] == 1
    assert m[("spinn_server_errors_total", (("code", "BAD_SPLIT"),))] == 1
    assert m[("spinn_server_queue_depth", ())] == 0
    assert m[("spinn_server_compute_seconds_count", ())] == 2
    assert m[("spinn_server_compute_seconds_sum", ())] > 0
    assert m[("spinn_server_queue_wait_seconds_count", ())] == 3
    assert m[("spinn_server_batch_size_count", ())] == 2
    assert m[("spinn_server_batch_size_bucket", (("le", "1.0"),))] == 2


def test_metrics_are_off_by_default_and_bad_port_is_named() -> None:
    assert ServerConfig().operations.metrics_port is None
    with pytest.raises(ConfigError, match=r"^operations\.metrics_port must be in 0\.\.65535"):
        OperationsConfig(metrics_port=70000)
