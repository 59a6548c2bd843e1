"""The asyncio device against a real in-process server on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop

from protocol.packing import CODECS, pack
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, FixedPolicy
from spinn.model.checkpoint import load_checkpoint
from spinn.runtime.config import DeviceConfig, ServerConfig
from spinn.runtime.device import DeviceError, SpinnDevice
from spinn.runtime.device_core import ComputeCall
from spinn.runtime.processes import free_port
from spinn.runtime.server import SpinnServer
from tests.support.runtime import (
    PATIENT,
    by_frame,
    make_small_checkpoint,
    noise_frames,
    run_in_process,
)

pytestmark = pytest.mark.timeout(90)


def test_device_only_answers_every_frame_locally(checkpoint: Path) -> None:
    run = run_in_process(
        checkpoint, noise_frames(30), serve=False, connect=False, split=3, thr_conf=0.5
    )
    records, summary = run.records, run.summary
    by_frame(records, 30)
    assert {r["where"] for r in records} == {"device"}
    assert summary["offloaded"] == 0 and summary["bytes_sent"] == 0
    assert summary["accuracy"] == pytest.approx(
        np.mean([r["class"] == r["label"] for r in records]), abs=1e-4
    )


def test_offloaded_frames_are_answered_once_by_server_or_device(checkpoint: Path) -> None:
    run = run_in_process(checkpoint, noise_frames(60), split=2, thr_conf=1.0, max_in_flight=4)
    records, summary, server = run.records, run.summary, run.server
    by_frame(records, 60)
    assert server is not None
    wheres = [r["where"] for r in records]
    assert set(wheres) <= {"server", "device", "fallback"} and "server" in wheres
    # A fallback here can only be a RESULT later than its deadline (a busy machine).
    assert wheres.count("fallback") == summary["deadline_expired"]
    assert summary["offloaded"] == 60
    assert all(r["bytes_sent"] > 0 for r in records)
    # Every INFER got one answer on the server: computed, cancelled or expired unrun.
    st = server.stats
    assert st.requests == 60
    assert st.computed + st.cancelled_queued + st.cancelled_running + st.expired_unrun == 60
    # One CANCEL per frame the device answered first, one per missed deadline.
    assert summary["cancels"] == wheres.count("device") + wheres.count("fallback")


def test_without_continuation_the_server_answers_everything(checkpoint: Path) -> None:
    run = run_in_process(
        checkpoint, noise_frames(40), split=4, thr_conf=1.0, continue_locally=False, **PATIENT
    )
    records, summary, server = run.records, run.summary, run.server
    by_frame(records, 40)
    assert {r["where"] for r in records} == {"server"}
    assert server is not None and server.stats.computed == 40
    assert summary["server_time_ms"]["samples"] > 0


def test_no_server_means_fallback_for_offloaded_frames(checkpoint: Path) -> None:
    run = run_in_process(
        checkpoint, noise_frames(20), serve=False, split=3, thr_conf=1.0, connect_timeout_s=0.2
    )
    records, summary = run.records, run.summary
    by_frame(records, 20)
    assert {r["where"] for r in records} == {"fallback"}
    assert summary["server_connects"] == 0


def test_model_mismatch_stops_the_device_with_a_clear_error(
    checkpoint: Path, tmp_path: Path
) -> None:
    other = make_small_checkpoint(tmp_path, seed=1)

    async def main() -> None:
        port = free_port()
        server = SpinnServer(
            ServerConfig.from_fields(checkpoint=checkpoint, port=port, stats_interval_s=0)
        )
        await server.start()
        try:
            device = SpinnDevice(
                DeviceConfig.from_fields(checkpoint=other, server=("127.0.0.1", port))
            )
            await device.run(noise_frames(5))
        finally:
            await server.close()

    with pytest.raises(DeviceError, match="model mismatch"):
        uvloop.run(main())


def test_bad_split_is_refused_at_construction(checkpoint: Path) -> None:
    with pytest.raises(DeviceError, match="policy.split must be in 0..11"):
        SpinnDevice(DeviceConfig.from_fields(checkpoint=checkpoint, split=12, server=None))


def test_server_killed_mid_stream_falls_back_then_reconnects(checkpoint: Path) -> None:
    """In-process version of integration test (2): stop, serve again on the same port."""
    records: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        port = free_port()
        cfg = ServerConfig.from_fields(checkpoint=checkpoint, port=port, stats_interval_s=0)
        server = SpinnServer(cfg)
        await server.start()
        device = SpinnDevice(
            DeviceConfig.from_fields(
                checkpoint=checkpoint,
                server=("127.0.0.1", port),
                split=2,
                thr_conf=1.0,
                rate_fps=100.0,
                status_interval_s=0,
                reconnect_base_s=0.05,
                reconnect_cap_s=0.2,
                continue_locally=False,
            )
        )
        run = asyncio.create_task(device.run(noise_frames(150), records.append))
        while len(records) < 30:
            await asyncio.sleep(0.01)
        await server.close()
        while sum(r["where"] == "fallback" for r in records) < 10:
            await asyncio.sleep(0.01)
        server2 = SpinnServer(cfg)
        await server2.start()
        try:
            return await run
        finally:
            await server2.close()

    summary = uvloop.run(main())
    by_frame(records, 150)
    wheres = [r["where"] for r in sorted(records, key=lambda r: r["frame"])]
    first_fallback = wheres.index("fallback")
    assert "server" in wheres[:first_fallback]
    assert "server" in wheres[first_fallback:], "offload resumed after the restart"
    assert summary["server_connects"] == 2


class _Truncated:
    """Edgent-style decision: the network ends at ``exit``, no early exits before it."""

    def __init__(self, split: int, exit: int) -> None:
        self.decision = Decision(split, None, "truncated", final_exit=exit)

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self.decision


def test_truncated_network_answers_at_its_exit_locally_and_remotely(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    exit_index = 2
    stage = model.exit_stages[exit_index]
    first_after = min(k for k in model.exit_stages if k > model.exit_stages[1])
    assert first_after == stage  # splitting just after exit 1 makes exit 2 the server's first

    # A device that never continues locally: each side answers alone.
    local = run_in_process(
        checkpoint,
        noise_frames(12),
        serve=False,
        connect=False,
        custom_policy=_Truncated(model.num_stages, exit_index),
        continue_locally=False,
    ).records
    remote = run_in_process(
        checkpoint,
        noise_frames(12),
        custom_policy=_Truncated(model.exit_stages[1] + 1, exit_index),
        continue_locally=False,
    ).records
    for records, where in ((local, "device"), (remote, "server")):
        by_frame(records, 12)
        assert {r["exit"] for r in records} == {exit_index}
        assert {r["where"] for r in records} == {where}
    assert [r["class"] for r in sorted(local, key=lambda r: r["frame"])] == [
        r["class"] for r in sorted(remote, key=lambda r: r["frame"])
    ]


def test_no_early_exit_asks_the_server_for_its_final_exit(checkpoint: Path) -> None:
    # "No early exit" travels as the flag, with thr_conf 1, which a saturated softmax
    # reaches: the flag keeps the server's early exits silent (PROTOCOL.md §5.3; the plan
    # itself: tests/runtime/test_device_core.py).
    model, _ = load_checkpoint(checkpoint)
    records = run_in_process(
        checkpoint,
        noise_frames(12),
        custom_policy=FixedPolicy(1, None),
        continue_locally=False,
    ).records
    by_frame(records, 12)
    assert {(r["where"], r["exit"]) for r in records} == {("server", model.num_exits - 1)}


def test_scheduler_baseline_policies_plug_in_by_name(checkpoint: Path) -> None:
    run = run_in_process(checkpoint, noise_frames(10), policy="device-only")
    records, summary = run.records, run.summary
    by_frame(records, 10)
    assert {r["where"] for r in records} == {"device"} and summary["offloaded"] == 0
    run = run_in_process(checkpoint, noise_frames(10), policy="server-only")
    records, summary = run.records, run.summary
    assert {r["split"] for r in records} == {0} and summary["offloaded"] == 10
    with pytest.raises(DeviceError, match="edgent"):
        SpinnDevice(DeviceConfig.from_fields(checkpoint=checkpoint, server=None, policy="edgent"))


def test_local_answers_feed_overhead_and_race_stages_feed_device_scale(checkpoint: Path) -> None:
    """Split 0 runs nothing before the split: SF comes from the stages run after it, and
    every answer given on the device measures the per-input overhead."""
    records: list[dict[str, Any]] = []

    async def main() -> SpinnDevice:
        config = DeviceConfig.from_fields(
            checkpoint=checkpoint, server=None, status_interval_s=0, split=0, thr_conf=0.5
        )
        device = SpinnDevice(config)
        await device.run(noise_frames(12), records.append)
        return device

    device = uvloop.run(main())
    by_frame(records, 12)
    prof = device.core.profiler
    assert prof.device.samples >= 12  # at least one stage per frame
    assert prof.device.scale != 1.0  # measured, not the prior
    assert prof.overhead.samples == 12
    snap = prof.snapshot(0.0)
    # The overhead is what the answer's latency has beyond the scaled stage times.
    latencies = sorted(r["latency_ms"] for r in records)
    assert 0.0 <= snap.frame_overhead_ms <= latencies[-1]


def test_scheduler_policy_predicts_with_the_device_codec(checkpoint: Path) -> None:
    from spinn.decisions.scheduler import Scheduler

    device = SpinnDevice(
        DeviceConfig.from_fields(
            checkpoint=checkpoint, server=None, policy="spinn", codec="float32"
        )
    )
    assert "float32" in device.profile.codecs
    assert (
        isinstance(device.core.policy, Scheduler) and device.core.policy.config.codec == "float32"
    )
    # A codec the profile did not measure falls back to the smallest profiled size.
    missing = next(c for c in CODECS if c not in device.profile.codecs)
    device = SpinnDevice(
        DeviceConfig.from_fields(checkpoint=checkpoint, server=None, policy="spinn", codec=missing)
    )
    assert isinstance(device.core.policy, Scheduler) and device.core.policy.config.codec is None


class _MixedSource:
    """Frames from noise, one of them not an image the model can take (float pixels)."""

    name = "mixed"

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __iter__(self) -> Any:
        from spinn.runtime.sources import Frame

        rng = np.random.default_rng(0)
        for i in range(self.n):
            image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            yield Frame(i, image.astype(np.float32) if i == self.bad else image, label=1)

    def close(self) -> None:
        pass


def test_a_frame_whose_processing_raises_gets_one_error_record(checkpoint: Path) -> None:
    source = _MixedSource(12, bad=5)
    run = run_in_process(checkpoint, source, split=2, thr_conf=1.0)
    records, summary = run.records, run.summary
    by_frame(records, 12)
    errors = [r for r in records if r["where"] == "error"]
    assert [r["frame"] for r in errors] == [5]
    assert "uint8" in errors[0]["error"] and errors[0]["label"] == 1
    assert summary["frames_read"] == 12 and summary["errors"] == 1
    assert summary["frames"] == 11 and summary["unanswered"] == 0


class _BadExitAt:
    """Chooses an exit the model lacks for one frame: ``_plan`` raises DeviceError."""

    def __init__(self, bad_call: int) -> None:
        self.calls = 0
        self.bad_call = bad_call

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.calls += 1
        exit_ = 99 if self.calls == self.bad_call else None
        return Decision(3, 0.5, "test", final_exit=exit_)


def test_a_failing_plan_is_reported_not_dropped(checkpoint: Path) -> None:
    # The constructor's own decide() is call 1; frame 2 is call 4.
    run = run_in_process(
        checkpoint, noise_frames(6), serve=False, connect=False, custom_policy=_BadExitAt(4)
    )
    records, summary = run.records, run.summary
    by_frame(records, 6)
    bad = [r for r in records if r["where"] == "error"]
    assert [r["frame"] for r in bad] == [2] and "exit 99" in bad[0]["error"]
    assert summary["errors"] == 1 and summary["unanswered"] == 0


class _AbortLinkAt:
    """Resets the connection at one decision, as a middlebox reset would, then offloads:
    the frame meets a transport that is closing while the reader has not seen it yet."""

    def __init__(self, frame_call: int) -> None:
        self.calls = 0
        self.frame_call = frame_call
        self.device: SpinnDevice | None = None

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.calls += 1
        if self.calls == self.frame_call and self.device is not None:
            link = self.device._link
            assert link is not None and link.writer is not None
            link.writer.transport.abort()
        return Decision(2, None, "test")


def test_a_reset_link_finishes_the_frame_as_fallback_and_reconnects(checkpoint: Path) -> None:
    records: list[dict[str, Any]] = []

    async def main() -> dict[str, Any]:
        port = free_port()
        server = SpinnServer(
            ServerConfig.from_fields(checkpoint=checkpoint, port=port, stats_interval_s=0)
        )
        await server.start()
        policy = _AbortLinkAt(6)
        device = SpinnDevice(
            DeviceConfig.from_fields(
                checkpoint=checkpoint,
                server=("127.0.0.1", port),
                status_interval_s=0,
                reconnect_base_s=0.02,
                reconnect_cap_s=0.05,
                max_in_flight=1,
                continue_locally=False,
                rate_fps=50.0,
            ),
            policy=policy,
        )
        policy.device = device
        try:
            return await device.run(noise_frames(20), records.append)
        finally:
            await server.close()

    summary = uvloop.run(main())
    where = [r["where"] for r in by_frame(records, 20)]
    # Call 1 is the constructor's: call 6 decides frame 4, which must not be lost.
    assert where[4] == "fallback"
    assert "server" in where[5:20], "offload resumed"
    assert summary["server_connects"] == 2 and summary["unanswered"] == 0


def test_offload_on_a_dead_link_hands_the_frame_to_the_device(checkpoint: Path) -> None:
    from spinn.runtime.tracker import FramePhase

    async def main() -> FramePhase | None:
        # A server is configured but never connected: every write reports 0 bytes.
        config = DeviceConfig.from_fields(checkpoint=checkpoint, server=("127.0.0.1", free_port()))
        device = SpinnDevice(config, policy=FixedPolicy(2, None))
        core = device.core
        device.act(core.frame_arrived(0.0, 0, link_up=True))
        packed = pack(np.ones((1, 4, 7, 7), dtype=np.float32), "sparse_int8")
        call = ComputeCall(1, 0.0, 0.001, 0.0, queued=False, waited_s=0.0)
        actions = core.head_done(
            0.001,
            0,
            call,
            answer=None,
            activation=None,
            packed=packed,
            stages_ms=1.0,
            reached=2,
            pack_ms=0.0,
            link_up=True,
        )  # the core offloads: the link went down since the adapter looked
        assert [type(a).__name__ for a in actions] == ["SendInfer"]
        device.act(actions)
        return device.core.tracker.phase(0)

    assert uvloop.run(main()) is FramePhase.ABANDONED
