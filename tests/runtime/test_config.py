"""spinn.runtime.config: the grouped configurations and the errors that name their fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.runtime.config import (
    ConfigError,
    DeviceComputeConfig,
    DeviceConfig,
    LimitsConfig,
    LinkConfig,
    OperationsConfig,
    OutputConfig,
    PolicyConfig,
    SecurityConfig,
    ServerComputeConfig,
    ServerConfig,
    SourceConfig,
    config_fields,
)

# A bad value per group, and the field path its error must start with.
BAD: list[tuple[type[Any], dict[str, Any], str]] = [
    (SourceConfig, {"max_in_flight": 0}, "source.max_in_flight must be >= 1, got 0"),
    (SourceConfig, {"rate_fps": float("nan")}, "source.rate_fps must be a finite number >= 0"),
    (SourceConfig, {"limit": -1}, "source.limit must be >= 0, got -1"),
    (LinkConfig, {"probe_bytes": -1}, "link.probe_bytes must be in [0, 1048576], got -1"),
    (LinkConfig, {"probe_share": 0.9}, "link.probe_share must be in (0, 0.5], got 0.9"),
    (LinkConfig, {"connect_timeout_s": 0}, "link.connect_timeout_s must be > 0, got 0"),
    (LinkConfig, {"zstd": "sometimes"}, "link.zstd must be one of auto, always, never"),
    (LinkConfig, {"codec": "uint8_image"}, "link.codec: unknown 'uint8_image'"),
    (LinkConfig, {"misconfig_tries": 0}, "link.misconfig_tries must be >= 1, got 0"),
    (LinkConfig, {"reconnect_base_s": 5.0}, "link.reconnect_base_s must be > 0 and at most"),
    (LinkConfig, {"tls_key": Path("k")}, "link.tls_cert/link.tls_key need link.tls or link.tls_ca"),
    (PolicyConfig, {"deadline_factor": float("inf")}, "policy.deadline_factor must be in [1, 1e6]"),
    (PolicyConfig, {"deadline_margin_s": -1.0}, "policy.deadline_margin_s must be a finite"),
    (PolicyConfig, {"server_budget_share": 0.0}, "policy.server_budget_share must be in (0, 1]"),
    (DeviceComputeConfig, {"torch_threads": 0}, "compute.torch_threads must be >= 1, got 0"),
    (DeviceComputeConfig, {"slowdown": 0.5}, "compute.slowdown must be in [1, 1000], got 0.5"),
    (OutputConfig, {"top_k": 0}, "output.top_k must be >= 1, got 0"),
    (OutputConfig, {"status_interval_s": -1}, "output.status_interval_s must be >= 0, got -1"),
    (ServerComputeConfig, {"workers": 0}, "compute.workers must be >= 1, got 0"),
    (ServerComputeConfig, {"device": "tpu"}, "compute.device: unknown 'tpu'"),
    (LimitsConfig, {"max_queue_per_connection": 0}, "limits.max_queue_per_connection must be in"),
    (LimitsConfig, {"max_ping_rate": 0.0}, "limits.max_ping_rate must be > 0, got 0.0"),
    (LimitsConfig, {"max_handshakes_per_address": 0}, "limits.max_handshakes_per_address must"),
    (SecurityConfig, {"tls_client_ca": Path("ca")}, "security.tls_client_ca needs security.tls_cert"),
    (OperationsConfig, {"port": 70000}, "operations.port must be in 0..65535, got 70000"),
    (OperationsConfig, {"shutdown_grace_s": -1}, "operations.shutdown_grace_s must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize(("group", "values", "message"), BAD)
def test_a_bad_value_is_named_by_its_field_path(
    group: type[Any], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        group(**values)


def test_every_error_path_is_a_real_field() -> None:
    paths = set(config_fields(DeviceConfig)) | set(config_fields(ServerConfig))
    for _, _, message in BAD:
        for path in re.findall(r"\b[a-z]+\.[a-z_]+\b", message):
            assert path in paths, path


def test_defaults_and_the_shipped_checkpoint() -> None:
    device, server = DeviceConfig(), ServerConfig()
    assert device.compute.checkpoint == server.compute.checkpoint == DEFAULT_CHECKPOINT
    assert device.link.server == ("127.0.0.1", 7878) and server.operations.port == 7878
    assert device.link.server_addresses == (("127.0.0.1", 7878),)
    assert not device.link.use_tls and LinkConfig(tls_ca=Path("ca")).use_tls
    assert server.limits.max_queue_per_connection == 256 and server.compute.workers is None


def test_from_fields_routes_each_field_to_its_group() -> None:
    config = DeviceConfig.from_fields(server=None, thr_conf=0.5, top_k=3, limit=7, workers=2)
    assert config == DeviceConfig(
        source=SourceConfig(limit=7),
        link=LinkConfig(server=None),
        policy=PolicyConfig(thr_conf=0.5),
        compute=DeviceComputeConfig(workers=2),
        output=OutputConfig(top_k=3),
    )
    assert ServerConfig.from_fields(port=0, idle_timeout_s=3.0) == ServerConfig(
        operations=OperationsConfig(port=0), limits=LimitsConfig(idle_timeout_s=3.0)
    )
    with pytest.raises(TypeError, match="no field colour"):
        DeviceConfig.from_fields(colour="red")
    with pytest.raises(ConfigError, match="^source.max_in_flight"):
        DeviceConfig.from_fields(max_in_flight=0)


def test_configs_are_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_queued = 1  # type: ignore[misc]
