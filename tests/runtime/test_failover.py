"""ServerRotation and address parsing (spinn.runtime.failover), and the device CLI flags."""

from __future__ import annotations

import random

import pytest

import spinn_device
from spinn.runtime.backoff import Backoff
from spinn.runtime.failover import STABLE_LINK_S, ServerRotation, parse_address, parse_addresses

A, B, C = ("10.0.0.1", 7878), ("10.0.0.2", 7878), ("::1", 7000)


def _rotation(*addresses: tuple[str, int]) -> ServerRotation:
    return ServerRotation(addresses, Backoff(0.1, 2.0, random.Random(3)))


def test_parse_addresses_accepts_repeats_commas_and_ipv6() -> None:
    assert parse_address("10.0.0.1:7878") == A
    assert parse_addresses(["10.0.0.1:7878,10.0.0.2:7878", "[::1]:7000"]) == (A, B, C)


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("nohost", "HOST:PORT"),
        (":80", "HOST:PORT"),
        ("h:x", "number"),
        ("h:0", "1..65535"),
        ("[::1:80", "brackets"),
        ("::1:80", "brackets"),
        ("h]:80", "brackets"),
    ],  # fmt: skip
)
def test_parse_address_names_the_fault(text: str, fault: str) -> None:
    with pytest.raises(ValueError, match=fault):
        parse_address(text)
    with pytest.raises(ValueError, match="no server address"):
        parse_addresses(" , ")


def test_failover_tries_every_server_before_backing_off() -> None:
    rot = _rotation(A, B, C)
    assert rot.current == A
    assert rot.connect_failed() == 0.0 and rot.current == B
    assert rot.connect_failed() == 0.0 and rot.current == C
    first = rot.connect_failed()  # the whole round failed: back off
    assert 0.05 <= first <= 0.1 and rot.current == A
    assert rot.connect_failed() == 0.0
    assert rot.connect_failed() == 0.0
    second = rot.connect_failed()
    assert 0.1 <= second <= 0.2, "backoff grows round after round"
    assert rot.connection_lost(up_s=60.0) == 0.0, "a stable link is a success"
    assert rot.backoff.attempts == 0 and rot.failures_in_round == 0


def test_lost_connection_moves_on_and_single_server_reconnects_to_itself() -> None:
    rot = _rotation(A, B)
    assert rot.connection_lost() == 0.0
    assert rot.current == B
    assert rot.connect_failed() == 0.0 and rot.current == A, "A is retried without waiting"
    single = _rotation(A)
    assert single.connection_lost(up_s=STABLE_LINK_S) == 0.0
    assert single.current == A
    assert single.connect_failed() > 0, "one server: every failure backs off as before"
    with pytest.raises(ValueError, match="at least one"):
        ServerRotation(())


def test_a_server_that_drops_every_link_at_once_is_backed_off() -> None:
    single = _rotation(A)
    delays = [single.connection_lost(up_s=0.01) for _ in range(6)]
    assert all(d > 0 for d in delays), delays
    assert delays[-1] > 4 * delays[0], f"backoff grows: {delays}"
    pair = _rotation(A, B)  # two crash-looping servers: a wait after each round of both
    delays = [pair.connection_lost(up_s=0.01) for _ in range(6)]
    assert delays[0::2] == [0.0] * 3 and all(d > 0 for d in delays[1::2]), delays
    assert pair.connection_lost(up_s=STABLE_LINK_S) == 0.0 and pair.backoff.attempts == 0
    single.connection_lost(up_s=0.01)
    assert single.connection_lost(up_s=0.01, answers=1) == 0.0, "it answered: it works"
    assert single.backoff.attempts == 0


def test_device_cli_takes_several_servers() -> None:
    parser = spinn_device.build_parser()
    args = parser.parse_args(
        ["--dataset", "fashion-mnist:test", "--server", "10.0.0.1:7878,10.0.0.2:7878",
         "--server", "[::1]:7000"]
    )  # fmt: skip
    config = spinn_device.config_from_args(args)
    assert config.link.server == A and config.link.extra_servers == (B, C)
    assert config.link.server_addresses == (A, B, C)
    default = spinn_device.config_from_args(parser.parse_args(["--dataset", "x"]))
    assert default.link.server_addresses == (("127.0.0.1", 7878),)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "x", "--server", "10.0.0.1:99999"])
