"""The asyncio server over real loopback sockets: handshake, INFER, CANCEL, bad peers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol import (
    PROTOCOL_VERSION,
    Bye,
    Cancel,
    Error,
    ErrorCode,
    Hello,
    Infer,
    Ping,
    Pong,
    Result,
    pack,
    unpack,
)
from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.runtime.batching import run_jobs
from spinn.runtime.server import SpinnServer
from spinn.runtime.server_core import Job, Outcome, RunBatch, Stopped
from tests.support.runtime import RawClient, hello, sample_input, serve

pytestmark = pytest.mark.timeout(60)


def test_infer_matches_offline_execution_from_every_split(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    results: dict[int, Result] = {}

    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        welcome = await hello(client, server)
        assert welcome.reports_compute_time and welcome.codecs == ("float32",)
        x = sample_input(1)
        for split in range(model.num_stages):
            act = run_stages(model, x, 0, split, ExitRule(None)).activation
            assert act is not None
            client.send(Infer(split + 1, split, 0.6, pack(act.numpy(), "float32")))
        for _ in range(model.num_stages):
            event = await client.next()
            assert isinstance(event, Result), event
            results[event.request_id] = event
        client.close()

    server = serve(checkpoint, body, top_k=3)
    x = sample_input(1)
    for split in range(model.num_stages):
        act = run_stages(model, x, 0, split, ExitRule(None)).activation
        offline = run_stages(model, act, split, model.num_stages, ExitRule(0.6))
        assert offline.answer is not None
        got = results[split + 1]
        assert got.exit_index == offline.answer.exit
        assert got.classes == tuple(c for c, _ in offline.answer.topk(3))
        np.testing.assert_allclose(got.probs, [p for _, p in offline.answer.topk(3)], atol=1e-5)
        assert got.compute_ms is not None and got.compute_ms > 0
    assert server.stats.computed == model.num_stages


def test_early_exits_off_answers_from_the_final_exit(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    answers: dict[int, Result] = {}

    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        x = pack(sample_input(5).numpy(), "float32")
        # Threshold 0: the first exit answers, unless early exits are off.
        client.send(Infer(1, 0, 0.0, x), Infer(2, 0, 0.0, x, early_exits=False))
        for _ in range(2):
            event = await client.next()
            assert isinstance(event, Result), event
            answers[event.request_id] = event
        client.close()

    serve(checkpoint, body)
    assert answers[1].exit_index == 0
    assert answers[2].exit_index == model.num_exits - 1


def test_no_report_compute_leaves_compute_time_out(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        welcome = await hello(client, server)
        assert welcome.reports_compute_time is False
        client.send(Infer(7, 0, 0.5, pack(sample_input(2).numpy(), "float32")))
        result = await client.next()
        assert isinstance(result, Result) and result.compute_ms is None
        client.send(Ping(1, 123.5, b"\0" * 1000))
        pong = await client.next()
        assert isinstance(pong, Pong) and pong.sent_at == 123.5 and pong.padding_len == 1000
        # Every byte read so far, HELLO to this PING: the device times probe trains by it.
        assert pong.received_bytes == client.sent_bytes
        client.send(Ping(2, 124.0, b"\0" * 70_000), Ping(3, 124.0))
        pongs = [await client.next(), await client.next()]
        assert [p.received_bytes for p in pongs if isinstance(p, Pong)][-1] == client.sent_bytes
        client.close()

    serve(checkpoint, body, report_compute=False)


def test_model_mismatch_is_refused_with_both_ids(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, "resnet20-other", "ab" * 32, ("float32",)))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.MODEL_MISMATCH
        assert "resnet20-other" in error.message and server.meta.model_id in error.message
        assert "weights sha256" in error.message
        assert await client.reader.read() == b""  # closed by the server
        client.close()

    server = serve(checkpoint, body)
    assert server.stats.errors_sent == 1


def test_bad_requests_answer_that_request_and_keep_the_connection(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        s = server.model.num_stages
        client.send(Infer(1, s, 0.5, pack(np.zeros((1, 4), np.float32), "float32")))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_SPLIT
        assert error.request_id == 1 and f"split {s}" in error.message
        client.send(Infer(2, 1, 0.5, pack(np.zeros((1, 3, 5, 5), np.float32), "float32")))
        error = await client.next()
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_SPLIT
        assert "(1, 3, 5, 5)" in error.message and error.request_id == 2
        client.send(Infer(3, 0, 0.5, pack(sample_input(3).numpy(), "float32")))
        assert isinstance(await client.next(), Result)
        client.close()

    serve(checkpoint, body)


def test_garbage_from_one_peer_closes_only_that_peer(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        good = await RawClient.open(port)
        await hello(good, server)
        bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", port)
        bad_writer.write(b"\x00\x00\x00\x05\xc1garbage!")
        rest = await asyncio.wait_for(bad_reader.read(), 5.0)
        assert rest, "the bad peer gets an ERROR before the close"
        assert b"msgpack" in rest or b"frame" in rest or b"HELLO" in rest, rest
        bad_writer.close()
        good.send(Infer(1, 0, 0.5, pack(sample_input(4).numpy(), "float32")))
        assert isinstance(await good.next(), Result)
        good.close()

    server = serve(checkpoint, body)
    assert server.stats.connections_total == 2 and server.stats.errors_sent == 1


def test_cancel_of_a_queued_request_never_runs_it(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        x = pack(sample_input(5).numpy(), "float32")
        # One worker: request 1 runs, 2 and 3 queue behind it; CANCEL 2 arrives with them.
        client.send(Infer(1, 0, 1.0, x), Infer(2, 0, 1.0, x), Cancel(2), Infer(3, 0, 1.0, x))
        events = [await client.next() for _ in range(3)]
        by_id = {getattr(e, "request_id", None): e for e in events}
        assert isinstance(by_id[1], Result) and isinstance(by_id[3], Result)
        assert isinstance(by_id[2], Error) and by_id[2].code is ErrorCode.CANCELLED
        client.close()

    server = serve(checkpoint, body, workers=1)
    assert server.stats.cancelled_queued == 1 and server.stats.computed == 2
    assert server.stats.stages_run == 2 * server.model.num_stages


class _CancelledAfter(Job):
    """A job that reads as cancelled from its n-th check on: cancels mid-request."""

    def __init__(self, n: int, *args: object) -> None:
        self.checks = 0
        self.n = n
        super().__init__(*args)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def cancelled(self) -> bool:
        self.checks += 1
        return self.checks >= self.n

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        pass


def test_running_request_stops_at_a_stage_boundary(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    act = sample_input(6)[0].numpy()
    cpu = torch.device("cpu")
    # Check 1 is before it starts; checks 2.. follow each stage: set at check 4 = after stage 3.
    job = _CancelledAfter(4, 1, 1, 0, ExitRule(1.0), act, 0.0)
    (stopped,) = run_jobs(model, cpu, 3, RunBatch((job,), 0, batched=False))
    assert stopped == Stopped(3)
    full = Job(1, 2, 0, ExitRule(1.0), act, 0.0)
    (outcome,) = run_jobs(model, cpu, 3, RunBatch((full,), 0, batched=False))
    assert isinstance(outcome, Outcome) and outcome.stages_run == model.num_stages
    before = Job(1, 3, 0, ExitRule(1.0), act, 0.0, cancelled=True)
    assert run_jobs(model, cpu, 3, RunBatch((before,), 0, batched=False)) == [Stopped(None)]


def test_eof_mid_frame_is_told_then_closed(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        client.writer.write(b"\x00\x00\x10")  # a partial length prefix, then EOF
        client.writer.write_eof()
        # PROTOCOL.md §3, §8.1 frame-truncated: a fatal ERROR the half-closed peer can read.
        error = await client.next()
        assert isinstance(error, Error) and error.fatal and error.code is ErrorCode.PROTOCOL
        assert "stream ended inside a frame" in error.message, error
        assert await asyncio.wait_for(client.reader.read(), 5.0) == b""
        client.close()
        again = await RawClient.open(port)
        await hello(again, server)
        again.close()

    server = serve(checkpoint, body)
    assert server.stats.connections == 0


def test_request_past_its_deadline_is_dropped_unrun(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        x = pack(sample_input(7).numpy(), "float32")
        client.send(Infer(1, 0, 1.0, x), Infer(2, 0, 1.0, x, deadline_ms=0.0))
        events = {
            getattr(e, "request_id", None): e for e in [await client.next() for _ in range(2)]
        }
        assert isinstance(events[1], Result)
        assert isinstance(events[2], Error) and events[2].code is ErrorCode.CANCELLED
        assert "deadline" in events[2].message
        client.close()

    server = serve(checkpoint, body, workers=1)
    assert server.stats.computed == 1 and server.stats.expired_unrun == 1


def test_no_codec_in_common_is_a_fatal_bad_tensor_naming_both_sides(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        meta = server.meta
        client = await RawClient.open(port)
        client.send(Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, ("bfloat9",)))
        error = await client.next()
        # PROTOCOL.md §5.2: no WELCOME the device would have to refuse, but BAD_TENSOR.
        assert isinstance(error, Error) and error.code is ErrorCode.BAD_TENSOR, error
        assert error.request_id is None
        assert "bfloat9" in error.message and "float32" in error.message
        assert "sparse_int8" in error.message
        assert await asyncio.wait_for(client.reader.read(), 5.0) == b""
        client.close()

    server = serve(checkpoint, body)
    assert server.stats.errors_sent == 1 and server.stats.connections == 0


def test_bye_answers_outstanding_requests_then_says_bye(checkpoint: Path) -> None:
    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        await hello(client, server)
        x = pack(sample_input(8).numpy(), "float32")
        # One write: the server reads BYE before any of the three requests has run.
        client.send(Infer(1, 0, 1.0, x), Infer(2, 0, 1.0, x), Infer(3, 0, 1.0, x), Bye("done"))
        events = [await client.next() for _ in range(4)]
        assert [type(e) for e in events] == [Result, Result, Result, Bye], events
        assert sorted(e.request_id for e in events[:3]) == [1, 2, 3]  # type: ignore[attr-defined]
        # Both BYEs exchanged (PROTOCOL.md §7.3): the server closes the TCP connection.
        assert await asyncio.wait_for(client.reader.read(), 5.0) == b""
        client.close()

    server = serve(checkpoint, body, workers=1)
    assert server.stats.computed == 3 and server.stats.connections == 0


def test_sparse_uintb_is_accepted_and_decoded_within_half_a_step(checkpoint: Path) -> None:
    # The lossy codec (PROTOCOL.md §6.8) over a real socket: offered beside sparse_int8,
    # accepted, and answered as the offline model answers the decoded activation.
    model, _ = load_checkpoint(checkpoint)
    split = 2
    act = run_stages(model, sample_input(3), 0, split, ExitRule(None)).activation
    assert act is not None
    packed = pack(act.numpy(), "sparse_uintb", compress=True, bits=4)
    got: list[object] = []

    async def body(server: SpinnServer, port: int) -> None:
        client = await RawClient.open(port)
        meta = server.meta
        codecs = ("sparse_uintb", "sparse_int8")
        client.send(Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, codecs))
        welcome = await client.next()
        got.append(welcome)
        client.send(Infer(1, split, 0.0, packed, early_exits=False))
        got.append(await client.next())
        client.close()

    serve(checkpoint, body, top_k=3)
    welcome, result = got
    assert welcome.codecs == ("sparse_uintb", "sparse_int8")  # type: ignore[attr-defined]
    assert isinstance(result, Result), result
    decoded = torch.from_numpy(unpack(packed))
    assert (decoded - act).abs().max().item() <= packed.scale / 2 * (1 + 1e-5)
    offline = run_stages(model, decoded, split, model.num_stages, ExitRule(None))
    assert offline.answer is not None
    assert result.classes == tuple(c for c, _ in offline.answer.topk(3))
