"""spinn.runtime.flags: one table per command from which parser, configuration and the
translation of configuration errors into flags all come."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinn.decisions.sla import SLA, Metric
from spinn.runtime.config import DeviceConfig, ServerConfig, config_fields
from spinn.runtime.flags import (
    DEVICE_FLAGS,
    SERVER_FLAGS,
    SLA_FLAGS,
    FlagTable,
    sla_flags_given,
    sla_from_args,
)


@pytest.mark.parametrize("table", [DEVICE_FLAGS, SERVER_FLAGS], ids=["device", "server"])
def test_help_shows_each_default_from_the_config(table: FlagTable) -> None:
    parser = table.build_parser("x", "")
    defaults = config_fields(table.config)
    shown = {a.dest: a.help for a in parser._actions}
    for flag in table.flags:
        assert shown[flag.dest], flag.names
        if "{default}" in flag.help:
            value = defaults[flag.field]  # type: ignore[index]
            text = f"{value:g}" if isinstance(value, float) else str(value)
            if isinstance(value, tuple):
                text = f"{value[0]}:{value[1]}"
            assert f"default {text}" in (shown[flag.dest] or ""), flag.names


def test_flags_not_given_leave_the_defaults() -> None:
    assert SERVER_FLAGS.config_from_args(SERVER_FLAGS.build_parser("x", "").parse_args([])) == (
        ServerConfig()
    )


def test_each_switch_turns_its_field_from_the_default() -> None:
    parser = SERVER_FLAGS.build_parser("x", "")
    args = parser.parse_args(["--no-dictionaries", "--allow-user-code"])
    config = SERVER_FLAGS.config_from_args(args)
    assert config.compute.dictionaries is False and config.compute.allow_user_code is True


@pytest.mark.parametrize(
    ("table", "message", "expected"),
    [
        (DEVICE_FLAGS, "link.probe_bytes must be in [0, 10], got -1",
         "--probe-bytes must be in [0, 10], got -1"),
        (DEVICE_FLAGS, "link.tls_cert/link.tls_key need link.tls or link.tls_ca",
         "--tls-cert/--tls-key need --tls or --tls-ca"),
        (DEVICE_FLAGS, "policy.thr_conf and policy.policy", "--thr and --policy"),
        (DEVICE_FLAGS, "link.probe_share must be in (0, 0.5]",
         "link.probe_share must be in (0, 0.5]"),  # no flag: the library's name stays
        (SERVER_FLAGS, "limits.max_queue_per_connection must be in 1..1024",
         "--max-in-flight must be in 1..1024"),
        (SERVER_FLAGS, "operations.shutdown_grace_s must be >= 0", "--grace must be >= 0"),
        (SERVER_FLAGS, "compute.device: unknown 'tpu'", "--device: unknown 'tpu'"),
        (SERVER_FLAGS, "a.limits.max_queued.b stays", "a.limits.max_queued.b stays"),
        (SERVER_FLAGS, "or serve without them: compute.dictionaries off",
         "or serve without them: --no-dictionaries"),
        (SERVER_FLAGS, "compute.allow_user_code on", "--allow-user-code"),
        (SERVER_FLAGS, "compute.allow_user_code off", "--allow-user-code off"),
    ],
)  # fmt: skip
def test_config_errors_are_translated_into_flags(
    table: FlagTable, message: str, expected: str
) -> None:
    assert table.flag_text(message) == expected


def test_every_field_path_of_a_table_is_real_and_flagged_once() -> None:
    for table in (DEVICE_FLAGS, SERVER_FLAGS):
        paths = set(config_fields(table.config))
        fields = [f.field for f in table.flags if f.field and not f.field.startswith("policy.sla")]
        assert len(fields) == len(set(fields))
        assert set(fields) <= paths


def test_every_server_field_an_operator_sets_has_a_flag() -> None:
    flagged = {f.field for f in SERVER_FLAGS.flags}
    assert set(config_fields(ServerConfig)) - flagged == set()


def test_sla_flags_override_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "sla.toml"
    toml.write_text('max_latency_ms = 80\nrank = ["accuracy", "server_cost"]\n')
    parser = FlagTable(DeviceConfig, (SLA_FLAGS,)).build_parser("x", "")
    args = parser.parse_args(["--sla", str(toml), "--max-latency-ms", "50", "--rank", "latency"])
    assert sla_from_args(args) == SLA(max_latency_ms=50, rank=(Metric.LATENCY,))
    assert sla_flags_given(args) == ("--sla", "--max-latency-ms", "--rank")
    assert sla_from_args(parser.parse_args([])) == SLA()


def test_device_fields_without_a_flag_are_the_library_only_ones() -> None:
    flagged = {f.field for f in DEVICE_FLAGS.flags}
    unflagged = set(config_fields(DeviceConfig)) - flagged
    # Timers, probes and names a library user tunes; the command line keeps their defaults.
    assert unflagged == {
        "link.extra_servers",  # from --server
        "link.ping_interval_s",
        "link.probe_share",
        "link.ping_timeout_s",
        "link.connect_timeout_s",
        "link.reconnect_base_s",
        "link.reconnect_cap_s",
        "link.device_name",
        "policy.deadline_margin_s",
        "policy.server_budget_share",
        "compute.workers",
        "output.top_k",
    }
