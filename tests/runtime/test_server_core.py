"""ServerCore driven by scripted events and a fake clock: no socket, no thread, no model.

Each test plays one or more devices through a real ``protocol.Connection`` (the device's
end), feeds the bytes to the core with ``now`` chosen by the test, and reads the core's
actions: what it sends (decoded by the device's end), whom it closes and why, which
requests it hands to a worker, what it logs and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from protocol import (
    NEED_DATA,
    Bye,
    Cancel,
    Connection,
    ConnectionConfig,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    Result,
    Role,
    Welcome,
    pack,
    unpack,
)
from protocol.messages import Message
from spinn.runtime.config import ServerConfig
from spinn.runtime.server_core import (
    FRAMES_PER_TURN,
    LINGER_S,
    Action,
    Close,
    Log,
    Outcome,
    Record,
    RunBatch,
    Send,
    ServedModel,
    ServerCore,
    StartTls,
    Stopped,
)

MODEL = ServedModel("m" * 16, "ab" * 32, split_shapes=((1, 4, 4), (2, 2, 2), (4,)))
"""Three splits; split 1 takes (1, 2, 2, 2) activations."""


def _decode(tensor: object) -> np.ndarray:
    return unpack(tensor)  # type: ignore[arg-type]


@dataclass
class Device:
    """One device's connection, as the core sees it: an id and a real device state machine."""

    cid: int
    conn: Connection = field(default_factory=lambda: Connection(Role.DEVICE))
    received: list[Message] = field(default_factory=list)
    closed: Close | None = None


class Harness:
    """A core, its devices, and the actions it took, in order."""

    def __init__(self, workers: int = 1, **overrides: Any) -> None:
        self.config = ServerConfig.from_fields(**overrides)
        self.core = ServerCore(self.config, MODEL, workers=workers, decode=_decode)
        self.devices: dict[int, Device] = {}
        self.actions: list[Action] = []
        self.batches: list[RunBatch] = []
        self._next = 0

    def apply(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Send):
                device = self.devices[action.cid]
                device.conn.receive_data(b"".join(action.data))
                while (event := device.conn.next_event()) is not NEED_DATA:
                    device.received.append(event)  # type: ignore[arg-type]
            elif isinstance(action, Close):
                self.devices[action.cid].closed = action
            elif isinstance(action, RunBatch):
                self.batches.append(action)
        self.actions += actions
        return actions

    def connect(self, now: float = 0.0, address: str = "10.0.0.1") -> Device:
        self._next += 1
        device = Device(self._next)
        self.devices[device.cid] = device
        self.apply(self.core.connection_made(device.cid, (address, 40000 + device.cid), now))
        return device

    def send(self, device: Device, *messages: Message, now: float = 0.0) -> list[Action]:
        data = b"".join(device.conn.send(m) for m in messages)
        return self.apply(self.core.data_received(device.cid, data, now))

    def welcome(self, now: float = 0.0, codecs: tuple[str, ...] = ("float32",)) -> Device:
        device = self.connect(now)
        self.send(device, Hello(1, MODEL.model_id, MODEL.weights_sha256, codecs), now=now)
        assert isinstance(device.received[-1], Welcome), device.received
        return device

    def infer(
        self, device: Device, rid: int, now: float = 0.0, deadline_ms: float | None = None
    ) -> list[Action]:
        tensor = pack(np.full((1, 2, 2, 2), rid, np.float32), "float32")
        return self.send(device, Infer(rid, 1, 0.5, tensor, deadline_ms), now=now)

    def finish(
        self, batch: RunBatch, now: float, results: list[Outcome | Stopped] | None = None
    ) -> list[Action]:
        if results is None:
            results = [Outcome(0, (3, 1), (0.9, 0.1), 2.0, 2) for _ in batch.jobs]
        return self.apply(self.core.compute_done(batch, results, None, now))

    def logs(self, level: int = logging.DEBUG) -> list[str]:
        return [a.msg % a.args for a in self.actions if isinstance(a, Log) and a.level >= level]

    def records(self, metric: str) -> list[Record]:
        return [a for a in self.actions if isinstance(a, Record) and a.metric == metric]


def test_handshake_welcomes_the_served_model_and_refuses_another() -> None:
    h = Harness()
    device = h.welcome()
    welcome = device.received[-1]
    assert isinstance(welcome, Welcome) and welcome.codecs == ("float32",)
    assert h.core.devices == 1 and len(h.core.handshakes) == 0
    assert "device 10.0.0.1:40001 (unnamed) welcomed" in h.logs(logging.INFO)

    other = h.connect()
    h.send(other, Hello(1, "other-model", "", ("float32",)))
    refusal = other.received[-1]
    assert isinstance(refusal, Error) and refusal.code is ErrorCode.MODEL_MISMATCH
    assert "model id 'other-model'" in refusal.message
    assert other.closed is not None and other.closed.reason.startswith("closed by the server")
    assert h.core.stats.errors_sent == 1 and h.core.devices == 1


def test_codec_negotiation_keeps_what_both_know_and_names_both_lists_without_one() -> None:
    h = Harness(image_codec=False)
    device = h.welcome(codecs=("sparse_int8", "uint8_image", "float32"))
    assert device.received[-1].codecs == ("sparse_int8", "float32")  # type: ignore[union-attr]
    # The dictionary codec needs the same dictionaries on both ends: none loaded here.
    none = h.connect()
    h.send(none, Hello(1, MODEL.model_id, "", ("uint8_image",)))
    refusal = none.received[-1]
    assert isinstance(refusal, Error) and refusal.code is ErrorCode.BAD_TENSOR
    assert "device offers ['uint8_image']" in refusal.message and "float32" in refusal.message
    assert none.closed is not None


def test_full_server_refuses_busy_and_strangers_never_take_a_device_slot() -> None:
    h = Harness(max_connections=1, max_handshakes=2)
    h.welcome()
    late = h.connect()
    refusal = late.received[-1]
    assert isinstance(refusal, Error) and refusal.code is ErrorCode.BUSY
    assert refusal.message == "server full (1 devices)"
    assert late.closed is not None and late.closed.linger_s > 0
    assert h.core.stats.connections_refused == 1
    assert h.records("errors")[-1].label == "BUSY"
    # The refused connection was never a served one: its close logs nothing.
    assert h.core.connection_closed(late.cid, 0.1) == []


def test_full_handshake_pool_evicts_the_silent_then_sheds() -> None:
    h = Harness(max_handshakes=2, handshake_timeout_s=5.0)
    quiet = h.connect(now=0.0)
    spoke = h.connect(now=0.1)
    h.apply(h.core.data_received(spoke.cid, b"\x00", 0.2))  # a byte: no longer silent
    newcomer = h.connect(now=0.3)
    assert quiet.closed is not None and "no handshake after 0.30 s" in quiet.closed.reason
    error = quiet.received[-1]
    assert isinstance(error, Error) and error.message.startswith("timeout: closed by the server")
    assert newcomer.closed is None and h.core.stats.handshakes_evicted == 1
    h.apply(h.core.connection_closed(quiet.cid, 0.3))
    # Both spoke now, neither had its grace (1 s, at most half the timeout): shed.
    h.apply(h.core.data_received(newcomer.cid, b"\x00", 0.35))
    shed = h.connect(now=0.4)
    assert shed.closed is not None and h.core.stats.handshakes_shed == 1
    refusal = shed.received[-1]
    assert isinstance(refusal, Error) and refusal.code is ErrorCode.BUSY
    assert "2 connections already in the handshake" in refusal.message
    assert h.core.stats.handshakes == 2


def test_per_address_limit_of_the_handshake_pool() -> None:
    h = Harness(max_handshakes_per_address=1)
    h.connect(address="10.0.0.9")
    again = h.connect(address="10.0.0.9")
    assert again.closed is not None
    assert "1 connections from 10.0.0.9 already in the handshake" in again.received[-1].message  # type: ignore[union-attr]
    assert h.connect(address="10.0.0.8").closed is None


def test_handshake_timeout_then_idle_timeout_on_the_fake_clock() -> None:
    h = Harness(handshake_timeout_s=5.0, idle_timeout_s=60.0)
    stranger = h.connect(now=10.0)
    assert h.core.deadline(stranger.cid, 10.0) == 15.0
    assert h.apply(h.core.timer_fired(stranger.cid, 14.9)) == []
    h.apply(h.core.timer_fired(stranger.cid, 15.0))
    assert stranger.closed is not None and stranger.closed.linger_s == LINGER_S
    assert stranger.closed.reason == "closed by the server: timeout: no handshake within 5 s"
    assert h.core.stats.handshakes_timed_out == 1 and h.core.stats.connections_refused == 1

    device = h.welcome(now=20.0)
    h.send(device, Ping(1, 0.0), now=30.0)  # any complete frame restarts the idle clock
    assert h.core.deadline(device.cid, 30.0) == 90.0
    h.apply(h.core.timer_fired(device.cid, 90.0))
    assert device.closed is not None and "no complete frame for 60 s" in device.closed.reason


def test_a_device_waiting_on_its_answers_is_not_idle() -> None:
    h = Harness(idle_timeout_s=60.0)
    device = h.welcome(now=0.0)
    h.infer(device, 1, now=0.0)
    # Its request runs for longer than the idle timeout: the deadline keeps moving.
    assert h.apply(h.core.timer_fired(device.cid, 61.0)) == []
    assert device.closed is None
    h.finish(h.batches[0], now=100.0)
    assert isinstance(device.received[-1], Result)
    assert h.core.deadline(device.cid, 100.0) == 160.0  # the clock restarts at the answer


def test_ping_rate_limit_is_a_fatal_too_large_naming_the_limit() -> None:
    h = Harness(max_ping_rate=2.0)
    device = h.welcome()
    h.send(device, *(Ping(i, 0.0) for i in range(4)), now=1.0)  # a burst of 2 × 2
    pong = device.received[-1]
    assert isinstance(pong, Pong) and pong.received_at == 1.0  # on the core's one clock
    assert device.closed is None
    h.send(device, Ping(9, 0.0), now=1.1)
    refusal = device.received[-1]
    assert isinstance(refusal, Error) and refusal.code is ErrorCode.TOO_LARGE
    assert refusal.message.startswith("more than 2 PINGs a second (bursts of 4)")
    assert device.closed is not None and device.closed.linger_s == LINGER_S
    assert h.core.stats.rate_limited == 1


def test_unknown_cancels_are_counted_apart_and_rate_limited() -> None:
    h = Harness(max_unknown_cancel_rate=1.0)
    device = h.welcome()
    h.send(device, Cancel(7), Cancel(8), now=1.0)
    assert h.core.stats.cancels_unknown == 2 and device.closed is None
    h.send(device, Cancel(9), now=1.5)  # half a token back: over the rate
    assert device.closed is not None and "CANCELs of unknown requests" in device.closed.reason
    assert h.core.stats.cancels_received == 0


def test_frames_beyond_one_turn_wait_for_the_next() -> None:
    h = Harness(max_ping_rate=1000.0)
    device = h.welcome()
    h.send(device, *(Ping(i, 0.0) for i in range(FRAMES_PER_TURN + 5)))
    assert len(device.received) == 1 + FRAMES_PER_TURN and h.core.wants_turn(device.cid)
    h.apply(h.core.resume(device.cid, 0.0))
    assert len(device.received) == 1 + FRAMES_PER_TURN + 5 and not h.core.wants_turn(device.cid)


def test_queue_is_round_robin_by_device_and_cancel_of_a_queued_request_answers_it() -> None:
    h = Harness(workers=1)
    flood, good = h.welcome(), h.welcome()
    for rid in range(4):
        h.infer(flood, rid)
    h.infer(good, 100)
    h.infer(good, 101)
    assert [j.request_id for b in h.batches for j in b.jobs] == [0]  # one worker
    assert h.core.queued == 5
    h.send(flood, Cancel(3))  # queued: out at once, answered CANCELLED, never run
    cancelled = flood.received[-1]
    assert isinstance(cancelled, Error) and cancelled.code is ErrorCode.CANCELLED
    assert h.core.stats.cancelled_queued == 1 and h.core.queued == 4
    order = []
    for t in range(1, 6):
        batch = h.batches[-1]
        order.append(batch.jobs[0].request_id)
        h.finish(batch, now=float(t))
    # Turn about: the neighbour waits for one flood request per turn, not for all of them.
    assert order == [0, 1, 100, 2, 101]
    assert h.core.queued == 0 and h.core.in_flight == 0
    assert h.core.stats.computed == 5 and h.core.stats.requests == 6


def test_cancel_of_a_running_request_flags_it_and_answers_cancelled() -> None:
    h = Harness()
    device = h.welcome()
    h.infer(device, 1)
    job = h.batches[0].jobs[0]
    h.send(device, Cancel(1))
    assert job.cancelled and h.core.stats.cancels_received == 1
    h.finish(h.batches[0], 0.5, [Stopped(stages_run=1)])
    answer = device.received[-1]
    assert isinstance(answer, Error) and answer.code is ErrorCode.CANCELLED
    assert answer.message == "cancelled by the device"
    assert h.core.stats.cancelled_running == 1 and h.core.stats.stages_run == 1


def test_busy_per_device_and_when_the_queue_is_full() -> None:
    h = Harness(max_queue_per_connection=2, max_queued=3)
    a, b = h.welcome(), h.welcome()
    h.infer(a, 1)
    h.infer(a, 2)
    h.infer(a, 3)
    busy = a.received[-1]
    assert isinstance(busy, Error) and busy.code is ErrorCode.BUSY and busy.request_id == 3
    assert busy.message == "2 requests already queued for this device"
    h.infer(b, 1)
    h.infer(b, 2)  # three-quarters full: b holds its share (3 // 2 = 1) already
    share = b.received[-1]
    assert isinstance(share, Error) and "its share of a busy server" in share.message
    assert h.core.stats.busy_sent == 2


def test_busy_when_the_answer_would_miss_the_deadline() -> None:
    h = Harness()
    device = h.welcome()
    for rid in range(10):  # ten requests of 20 ms each: the mean compute is known
        h.infer(device, rid, now=float(rid))
        h.finish(h.batches[-1], float(rid), [Outcome(0, (1,), (1.0,), 20.0, 1)])
    h.infer(device, 10, now=20.0)  # running now
    h.infer(device, 11, now=20.0)  # queued behind it
    h.infer(device, 12, now=20.0, deadline_ms=30.0)
    busy = device.received[-1]
    assert isinstance(busy, Error) and busy.code is ErrorCode.BUSY
    assert "past the request's deadline of 30 ms" in busy.message
    answered = len(device.received)
    h.infer(device, 13, now=20.0, deadline_ms=500.0)
    assert len(device.received) == answered and h.core.in_flight == 3


def test_a_request_past_its_deadline_is_dropped_unrun() -> None:
    h = Harness()
    device = h.welcome()
    h.infer(device, 1, now=0.0)
    h.infer(device, 2, now=0.0, deadline_ms=100.0)
    h.finish(h.batches[0], now=0.5)  # request 2 reaches the worker after its deadline
    expired = device.received[-1]
    assert isinstance(expired, Error) and expired.code is ErrorCode.CANCELLED
    assert expired.message == "past its deadline" and h.core.stats.expired_unrun == 1
    assert len(h.batches) == 1 and h.core.in_flight == 0


def test_bad_split_and_shape_answer_the_request_and_keep_the_connection() -> None:
    h = Harness()
    device = h.welcome()
    tensor = pack(np.zeros((1, 2, 2, 2), np.float32), "float32")
    h.send(device, Infer(1, 3, 0.5, tensor))
    assert device.received[-1].code is ErrorCode.BAD_SPLIT  # type: ignore[union-attr]
    assert "split 3 outside 0..2" in device.received[-1].message  # type: ignore[union-attr]
    h.send(device, Infer(2, 0, 0.5, tensor))
    assert "does not match split 0, which expects (1, 1, 4, 4)" in device.received[-1].message  # type: ignore[union-attr]
    assert device.closed is None and h.core.stats.errors_sent == 2 and not h.batches


def test_batches_group_by_split_and_wait_their_time() -> None:
    h = Harness(workers=1, batch_max=3, batch_wait_ms=10.0)
    a, b = h.welcome(), h.welcome()
    h.infer(a, 1, now=0.0)
    h.infer(b, 1, now=0.001)
    assert not h.batches and h.core.next_wakeup() == pytest.approx(0.010)
    h.apply(h.core.wakeup(0.010))
    (batch,) = h.batches
    assert batch.batched and [j.request_id for j in batch.jobs] == [1, 1]
    assert h.core.next_wakeup() is None  # the worker is busy: groups fill meanwhile
    for rid in (2, 3, 4, 5):
        h.infer(a, rid, now=0.02)
    h.send(a, Cancel(3), now=0.02)  # waiting for its batch: removed, never run
    h.finish(batch, now=0.03)
    assert [j.request_id for j in h.batches[-1].jobs] == [2, 4, 5]  # full: at once
    assert h.records("batch_size")[-1].value == 2
    h.finish(h.batches[-1], 0.04, [Outcome(0, (1,), (1.0,), 1.0, 1), Stopped(0), Stopped(None)])
    assert h.records("batch_size")[-1].value == 2  # two started, one stopped at a boundary
    assert h.core.stats.cancelled_queued == 2 and h.core.stats.cancelled_running == 1


def test_bye_is_a_half_close_answered_then_byed() -> None:
    h = Harness(idle_timeout_s=60.0)
    device = h.welcome()
    h.infer(device, 1)
    h.send(device, Bye("done"), now=1.0)
    assert device.closed is None  # its request is still answered
    h.apply(h.core.data_received(device.cid, b"", 1.1))  # the half-close is legal
    assert device.closed is None
    h.finish(h.batches[0], now=2.0)
    assert isinstance(device.received[-2], Result) and isinstance(device.received[-1], Bye)
    assert device.closed is not None and device.closed.drain
    assert device.closed.reason == "closed after BYE from the device and the server's BYE"


def test_bye_with_a_stalled_request_cancels_it_after_the_idle_timeout() -> None:
    h = Harness(idle_timeout_s=60.0)
    device = h.welcome()
    h.infer(device, 1)
    h.send(device, Bye("done"), now=1.0)
    assert h.core.deadline(device.cid, 1.0) == 61.0
    h.apply(h.core.timer_fired(device.cid, 61.0))
    cancelled = device.received[-2]
    assert isinstance(cancelled, Error) and cancelled.message == "device said BYE"
    assert isinstance(device.received[-1], Bye) and device.closed is not None
    assert h.batches[0].jobs[0].cancelled


def test_a_frame_after_bye_is_a_fatal_error() -> None:
    h = Harness()
    device = h.welcome()
    h.infer(device, 1)
    raw = device.conn.send(Bye("done")) + device_ping_frame()
    h.apply(h.core.data_received(device.cid, raw, 1.0))
    assert device.closed is not None and device.closed.linger_s == LINGER_S
    assert "after its own BYE" in device.closed.reason


def device_ping_frame() -> bytes:
    """A PING framed by a fresh device end (the real one refuses to send after its BYE)."""
    from protocol.framing import FRAME_HEADER
    from protocol.messages import encode_message_parts

    head, blob = encode_message_parts(Ping(5, 0.0))
    return FRAME_HEADER.pack(len(head) + len(blob)) + head + blob


def test_tls_on_a_plain_port_is_named_and_logged_once_a_minute() -> None:
    h = Harness()
    first = h.connect(now=0.0)
    h.apply(h.core.data_received(first.cid, b"\x16\x03\x01\x02\x00", 0.0))
    assert first.closed is not None and "TLS handshake on a plain port" in first.closed.reason
    second = h.connect(now=1.0)
    h.apply(h.core.data_received(second.cid, b"\x16\x03\x01\x02\x00", 1.0))
    assert sum("TLS handshake" in line for line in h.logs(logging.WARNING)) == 1
    assert h.core.stats.connections_refused == 2


def test_disconnect_drops_queued_requests_and_logs_the_reason() -> None:
    h = Harness(workers=1)
    device = h.welcome()
    h.infer(device, 1)
    h.infer(device, 2)
    h.apply(h.core.connection_lost(device.cid, "reset by peer", 1.0))
    assert device.closed is not None and device.closed.reason == "connection lost: reset by peer"
    h.apply(h.core.connection_closed(device.cid, 1.0))
    assert "device 10.0.0.1:40001 disconnected: connection lost: reset by peer" in h.logs()
    assert h.core.queued == 0 and h.core.in_flight == 0 and h.core.connections == 0
    assert h.batches[0].jobs[0].cancelled  # the running one stops at a stage boundary
    h.finish(h.batches[0], 1.5, [Stopped(1)])  # its answer goes nowhere
    assert h.core.stats.cancelled_running == 1 and h.core.stats.cancelled_queued == 1


def test_compute_failure_answers_internal_and_the_connection_stays() -> None:
    h = Harness()
    device = h.welcome()
    h.infer(device, 1)
    h.apply(h.core.compute_done(h.batches[0], None, RuntimeError("boom"), 1.0))
    answer = device.received[-1]
    assert isinstance(answer, Error) and answer.code is ErrorCode.INTERNAL
    assert answer.message == "compute failed: boom" and device.closed is None


def test_shutdown_answers_busy_then_bye_to_everyone() -> None:
    h = Harness()
    device = h.welcome()
    h.infer(device, 1)
    h.apply(h.core.stop_accepting(1.0))
    assert "shutting down: 1 request(s) in flight" in h.logs(logging.INFO)
    h.infer(device, 2, now=1.0)
    assert device.received[-1].message == "server shutting down"  # type: ignore[union-attr]
    h.apply(h.core.shutdown(6.0))
    assert [type(m).__name__ for m in device.received[-2:]] == ["Error", "Bye"]
    assert device.received[-2].code is ErrorCode.BUSY  # type: ignore[union-attr]
    assert device.closed is not None and h.core.in_flight == 0


def test_token_handshake_challenges_before_the_model_check() -> None:
    token = b"t" * 32
    config = ConnectionConfig(auth_token=token)
    core = ServerCore(
        ServerConfig(), MODEL, workers=1, decode=_decode, connection_config=config,
        random_bytes=lambda n: b"\x01" * n,
    )  # fmt: skip
    device = Connection(Role.DEVICE, config)
    out = core.connection_made(1, ("10.0.0.1", 1), 0.0)
    hello = Hello(1, MODEL.model_id, "", ("float32",), auth_nonce=b"\x02" * 16)
    out = core.data_received(1, device.send(hello), 0.0)
    sends = [a for a in out if isinstance(a, Send)]
    device.receive_data(b"".join(sends[0].data))
    challenge = device.next_event()
    assert type(challenge).__name__ == "Challenge" and core.devices == 0
    with pytest.raises(ValueError, match="random_bytes"):
        ServerCore(ServerConfig(), MODEL, workers=1, decode=_decode, connection_config=config)


def _tls_harness(**overrides: Any) -> Harness:
    h = Harness(**overrides)
    h.core = ServerCore(h.config, MODEL, workers=1, decode=_decode, tls=True)
    return h


def test_tls_port_hands_a_client_hello_to_tls_even_a_byte_at_a_time() -> None:
    h = _tls_harness()
    device = h.connect()
    assert h.apply(h.core.data_received(device.cid, b"\x16", 0.1)) == []
    (upgrade,) = h.apply(h.core.data_received(device.cid, b"\x03\x01rest", 0.2))
    assert isinstance(upgrade, StartTls) and upgrade.replay == b"\x16\x03\x01rest"
    assert h.core.handshakes.silent == 0 and h.core.deadline(device.cid, 0.2) == 5.0
    h.apply(h.core.tls_started(device.cid, 0.3))
    # From here on the (decrypted) bytes are the protocol's, HELLO first.
    h.send(device, Hello(1, MODEL.model_id, MODEL.weights_sha256, ("float32",)), now=0.4)
    assert isinstance(device.received[-1], Welcome)


def test_tls_port_names_plain_bytes_and_sends_nothing_before_tls() -> None:
    h = _tls_harness()
    device = h.connect()
    hello = device.conn.send(Hello(1, MODEL.model_id, "", ("float32",)))
    h.apply(h.core.data_received(device.cid, hello, 0.0))
    assert device.closed is not None and not device.received
    assert "plain (non-TLS) bytes on a TLS port" in device.closed.reason
    assert h.core.stats.connections_refused == 1
    stalled = h.connect(now=1.0)
    h.apply(h.core.data_received(stalled.cid, b"\x16\x03\x01", 1.0))
    h.apply(h.core.timer_fired(stalled.cid, 6.0))  # still in the TLS handshake
    assert stalled.closed is not None and stalled.closed.linger_s == 0 and not stalled.received
    assert stalled.closed.reason == "closed by the server: timeout: no handshake within 5 s"
    assert h.core.stats.handshakes_timed_out == 1
    failed = h.connect(now=7.0)
    h.apply(h.core.data_received(failed.cid, b"\x16\x03\x01", 7.0))
    h.apply(h.core.tls_failed(failed.cid, "certificate verify failed", 7.1))
    assert failed.closed is not None
    assert failed.closed.reason == "TLS handshake failed: certificate verify failed"


def test_tls_port_refuses_and_evicts_without_a_plain_error() -> None:
    h = _tls_harness(max_handshakes=1, max_connections=1)
    first = h.connect(now=0.0)
    second = h.connect(now=0.1)  # the silent first one makes room, told nothing
    assert first.closed is not None and not first.received
    assert h.core.stats.handshakes_evicted == 1 and second.closed is None


def test_shutdown_is_due_once_answered_or_at_the_end_of_the_grace() -> None:
    h = Harness(shutdown_grace_s=5.0, idle_timeout_s=7.0)
    assert h.core.shutdown_at() is None and h.core.drain_timeout_s == 7.0
    device = h.welcome()
    h.infer(device, 1)
    h.apply(h.core.stop_accepting(1.0))
    assert h.core.shutdown_at() == 6.0  # a request in flight: the grace bounds the wait
    (batch,) = h.batches
    h.apply(h.core.compute_done(batch, None, RuntimeError("boom"), 2.0))
    assert h.core.in_flight == 0 and h.core.shutdown_at() == 1.0  # answered: at once
    quiet = Harness(shutdown_grace_s=5.0)
    quiet.apply(quiet.core.stop_accepting(3.0))
    assert quiet.core.shutdown_at() == 3.0


def test_a_connection_is_closed_once_and_only_an_abort_follows() -> None:
    h = Harness(max_handshakes=1, handshake_timeout_s=5.0, idle_timeout_s=7.0)
    bad = h.connect(now=0.0)
    h.apply(h.core.data_received(bad.cid, b"\xff" * 8, 0.1))  # garbage: a fatal ERROR
    assert bad.closed is not None and bad.closed.linger_s == LINGER_S
    # Still lingering in the pool when the next one comes: it is not closed a second time
    # (nor counted evicted); its first close stands, reason and all.
    h.connect(now=2.0)
    assert [a for a in h.actions if isinstance(a, Close) and a.cid == bad.cid] == [bad.closed]
    assert h.core.stats.handshakes_evicted == 0
    # A BYE answered: the close drains; a drain that does not finish is the one later
    # Close, an abort, which replaces it (the adapter carries out the last).
    device = h.welcome(now=3.0)
    h.send(device, Bye("done"), now=3.1)
    assert device.closed is not None and device.closed.drain and not device.closed.abort
    h.apply(h.core.not_reading(device.cid, 10.1))
    assert device.closed.abort and "not reading its answers for 7 s" in device.closed.reason


def test_the_core_times_the_adapters_waits() -> None:
    h = Harness(handshake_timeout_s=5.0)
    device = h.connect(now=1.0)
    assert h.core.wait_s(device.cid, 2.0) == 4.0 and h.core.wait_s(device.cid, 9.0) == 0.0
    # The TLS layer's own handshake timeout comes after the core's deadline, never first.
    wait = h.core.wait_s(device.cid, 2.0)
    assert wait is not None and h.core.tls_timeout_s(device.cid, 2.0) > wait
    h.apply(h.core.timer_fired(device.cid, 6.0))
    assert device.closed is not None and h.core.wait_s(device.cid, 6.0) is None
