"""DeviceCore driven by a fake clock and scripted events: no sockets, threads or model.

Each test plays what the asyncio adapter would feed in (``now`` and the events) and
checks the actions that come back, as h11's and aioquic's own tests drive their cores.
That the core imports no event loop, socket, thread, clock or torch is
tests/runtime/test_pure_cores.py's to check.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import (
    Auth,
    Bye,
    Cancel,
    Challenge,
    Error,
    ErrorCode,
    Infer,
    Ping,
    Pong,
    RemoteProtocolError,
    Result,
)
from protocol.auth import device_proof, server_proof
from protocol.description import Description
from protocol.messages import MAX_STRING
from protocol.packing import DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, pack
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, FixedPolicy, Policy
from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.runtime.config import SERVER_BUDGET_SHARE, DeviceConfig
from spinn.runtime.device_core import (
    Action,
    CancelCompute,
    CloseLink,
    ComputeCall,
    DeviceCore,
    DeviceError,
    Fatal,
    FrameDone,
    LocalExit,
    Log,
    ModelShape,
    Publish,
    Reconnect,
    RunHead,
    RunStages,
    Send,
    SendInfer,
    SendProbeTrain,
    StartFrames,
    recode_target,
)
from spinn.runtime.server_description import CheckpointFacts
from spinn.runtime.tracker import FramePhase

PROFILE = Profile.load(Path(DEFAULT_CHECKPOINT).with_name("profile.json"))
MODEL = ModelShape(
    num_stages=PROFILE.num_stages,
    exit_stages=tuple(PROFILE.exit_stages),
    num_classes=10,
    class_names=tuple(f"c{i}" for i in range(10)),
)
LAST_EXIT = len(MODEL.exit_stages) - 1
PACKED = pack(np.ones((1, 4, 7, 7), dtype=np.float32), "sparse_int8")


def make_core(
    split: int = 2, thr: float | None = None, policy: Policy | None = None, **config: Any
) -> DeviceCore:
    cfg = DeviceConfig.from_fields(**{"status_interval_s": 0, **config})
    return DeviceCore(cfg, profile=PROFILE, policy=policy or FixedPolicy(split, thr), model=MODEL)


def call(now: float, *, queued: bool = False, waited_s: float = 0.0) -> ComputeCall:
    return ComputeCall(
        worker=1, started=now - 0.001, ended=now, link_busy_ms=0.0, queued=queued, waited_s=waited_s
    )


def head(
    core: DeviceCore,
    now: float,
    fid: int,
    *,
    c: ComputeCall | None = None,
    answer: LocalExit | None = None,
    activation: Any = None,
    packed: Any = PACKED,
    stages_ms: float = 1.0,
    reached: int = 2,
    pack_ms: float = 0.0,
    link_up: bool = True,
) -> list[Action]:
    """The head of frame ``fid`` ran (``DeviceCore.head_done``)."""
    return core.head_done(
        now,
        fid,
        c or call(now),
        answer=answer,
        activation=activation,
        packed=packed,
        stages_ms=stages_ms,
        reached=reached,
        pack_ms=pack_ms,
        link_up=link_up,
    )


def step(
    core: DeviceCore,
    now: float,
    fid: int,
    *,
    answer: LocalExit | None = None,
    activation: Any = None,
    stop: int = 3,
) -> list[Action]:
    """A stage of the race ran for frame ``fid`` (``DeviceCore.stages_done``)."""
    return core.stages_done(
        now, fid, call(now), answer=answer, activation=activation, stop=stop, stages_ms=1.0
    )


def only(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def records(actions: list[Action]) -> list[dict[str, Any]]:
    return [a.record for a in only(actions, Publish)]


def connected(core: DeviceCore, now: float = 0.0) -> list[Action]:
    return core.link_up(now, server_name="test")


def offload(core: DeviceCore, fid: int, now: float, nbytes: int = 500) -> tuple[int, list[Action]]:
    """Frame ``fid`` arrives and its head runs to the split: returns its request id and
    the actions after the INFER was written."""
    arrived = core.frame_arrived(now, fid, link_up=True)
    assert only(arrived, RunHead) and only(arrived, RunHead)[0].pack
    acts = head(core, now + 0.001, fid, activation=f"act{fid}", pack_ms=0.1)
    (infer,) = only(acts, SendInfer)
    assert infer.frame_id == fid and isinstance(infer.message, Infer)
    rid = infer.message.request_id
    return rid, core.infer_written(now + 0.002, fid, rid, nbytes, 0.0)


def result(rid: int, exit_index: int = LAST_EXIT, cls: int = 3) -> Result:
    return Result(rid, exit_index, (cls,), (0.9,), compute_ms=1.0, held_ms=1.5)


# -- frames answered on the device -------------------------------------------------------


def test_a_confident_head_answers_on_the_device() -> None:
    core = make_core(split=3, thr=0.5, server=None)
    (run,) = core.frame_arrived(0.0, 0, label=4)
    assert isinstance(run, RunHead) and run.plan.split == 3 and not run.pack
    acts = head(
        core,
        0.01,
        0,
        answer=LocalExit(0, (4, 1), (0.8, 0.1)),
        packed=None,
        stages_ms=5.0,
        reached=1,
        link_up=False,
    )
    (rec,) = records(acts)
    assert rec["where"] == "device" and rec["class"] == 4 and rec["class_name"] == "c4"
    assert rec["label"] == 4 and rec["bytes_sent"] == 0 and rec["latency_ms"] == 10.0
    assert acts[-1] == FrameDone(0)
    assert core.profiler.device.samples == 1 and core.profiler.overhead.samples == 1


def test_device_only_frames_run_their_stages_one_by_one_to_the_end() -> None:
    core = make_core(split=2, server=None)
    core.frame_arrived(0.0, 0)
    acts = head(core, 0.01, 0, activation="a2", packed=None, link_up=False)
    (run,) = only(acts, RunStages)
    assert (run.start, run.stop, run.priority, run.activation) == (2, 3, 0, "a2")
    acts = step(core, 0.02, 0, activation="a3")
    (run,) = only(acts, RunStages)
    assert (run.start, run.activation) == (3, "a3")


# -- the race ----------------------------------------------------------------------------


def test_server_wins_the_race_and_the_local_stage_is_cancelled() -> None:
    core = make_core()
    connected(core)
    rid, acts = offload(core, 0, 1.0)
    (run,) = only(acts, RunStages)
    assert run.priority == 1 and run.start == 2  # a race continuation yields to new heads
    acts = core.receive(1.01, result(rid))
    (rec,) = records(acts)
    assert rec["where"] == "server" and rec["bytes_sent"] == 500 and rec["split"] == 2
    assert CancelCompute(0) in acts and not only(acts, FrameDone)
    # The stage was queued: the adapter skips it, and the frame is done.
    assert core.compute_skipped(1.02, 0) == [FrameDone(0)]
    assert core.tracker.cancels == 0


def test_device_wins_the_race_and_cancels_the_request() -> None:
    core = make_core()
    connected(core)
    rid, _ = offload(core, 0, 1.0)
    acts = step(core, 1.01, 0, answer=LocalExit(LAST_EXIT, (7,), (0.99,)))
    assert records(acts)[0]["where"] == "device"
    assert Send(Cancel(rid)) in acts and acts[-1] == FrameDone(0)
    assert core.tracker.cancels == 1
    # A RESULT that crossed the CANCEL answers nothing, but still times the link.
    assert not records(core.receive(1.02, result(rid)))
    assert core.profiler.server.samples == 1


def test_without_continue_locally_the_frame_waits_for_the_server() -> None:
    core = make_core(continue_locally=False)
    connected(core)
    rid, acts = offload(core, 0, 1.0)
    assert not only(acts, RunStages)
    acts = core.receive(1.01, result(rid))
    assert records(acts)[0]["where"] == "server" and acts[-1] == FrameDone(0)
    assert not only(acts, CancelCompute)


def test_the_deadline_expires_and_the_frame_finishes_locally_as_fallback() -> None:
    core = make_core(continue_locally=False)
    connected(core)
    rid, _ = offload(core, 0, 1.0)
    deadline = core.tracker.next_deadline()
    assert deadline is not None and deadline > 1.0
    assert core.next_timer(1.0) is not None and core.next_timer(1.0) <= deadline
    assert not only(core.timer(deadline - 1e-6), RunStages)
    acts = core.timer(deadline)
    assert Send(Cancel(rid)) in acts
    assert any("missed its deadline" in a.msg for a in only(acts, Log))
    (run,) = only(acts, RunStages)
    assert run.priority == 0  # the server will not answer: urgent
    acts = step(core, deadline + 0.01, 0, answer=LocalExit(LAST_EXIT, (2,), (0.5,)))
    assert records(acts)[0]["where"] == "fallback" and acts[-1] == FrameDone(0)
    assert not only(acts, Send)  # expired: cancelled already
    assert core.tracker.expired == 1
    # The late RESULT is stale.
    assert not records(core.receive(deadline + 0.02, result(rid)))


def test_the_server_budget_is_a_share_of_the_deadline() -> None:
    core = make_core()
    connected(core)
    core.frame_arrived(1.0, 0, link_up=True)
    acts = head(core, 1.0, 0)
    infer = only(acts, SendInfer)[0].message
    core.infer_written(1.0, 0, infer.request_id, 300, 0.0)
    deadline = core.tracker.next_deadline()
    assert deadline is not None
    assert infer.deadline_ms == pytest.approx(1e3 * (deadline - 1.0) * SERVER_BUDGET_SHARE)
    assert infer.early_exits is False and infer.thr_conf == 1.0  # no early exit, on the wire


def test_link_loss_hands_offloaded_frames_to_the_device() -> None:
    core = make_core(continue_locally=False)
    connected(core)
    rid0, _ = offload(core, 0, 1.0)
    rid1, _ = offload(core, 1, 1.1)
    acts = core.link_down(1.2, "connection lost: reset")
    assert sorted(r.frame_id for r in only(acts, RunStages)) == [0, 1]
    assert any("server link down" in a.msg for a in only(acts, Log))
    (reconnect,) = only(acts, Reconnect)
    assert reconnect.delay_s > 0  # up 0.2 s, nothing answered: backed off
    assert core.tracker.lost == 2 and not core.profiler.server_up
    # A frame decided while the link is down is fallback from the start.
    assert only(core.frame_arrived(1.3, 2, link_up=False), RunHead)
    assert core.tracker.phase(2) is FramePhase.ABANDONED
    acts = head(core, 1.31, 2, link_up=False)
    assert not only(acts, SendInfer) and only(acts, RunStages)[0].priority == 0
    acts = step(core, 1.32, 2, answer=LocalExit(LAST_EXIT, (1,), (0.6,)))
    assert records(acts)[0]["where"] == "fallback"


def test_a_write_on_a_dead_link_is_fallback_not_offloaded() -> None:
    core = make_core(continue_locally=False)
    connected(core)
    rid, acts = offload(core, 0, 1.0, nbytes=0)
    assert core.tracker.phase(0) is FramePhase.ABANDONED
    assert only(acts, RunStages)[0].priority == 0
    assert core.tracker.next_deadline() is None


def test_request_errors_and_implausible_results_finish_the_frame_locally(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = make_core(continue_locally=False)
    connected(core)
    rid, _ = offload(core, 0, 1.0)
    acts = core.receive(1.01, Error(ErrorCode.BUSY, "full", request_id=rid))
    assert only(acts, RunStages) and only(acts, Log)[0].level == logging.DEBUG
    rid, _ = offload(core, 1, 1.1)
    # Exit 0 lies before split 2: no such RESULT can come from the model served.
    acts = core.receive(1.11, result(rid, exit_index=0))
    (warn,) = only(acts, Log)
    assert warn.level == logging.WARNING and "before the split 2" in warn.msg % warn.args
    assert only(acts, RunStages) and not records(acts)
    assert core.implausible(Result(9, 0, (10,), (0.5,))) == (
        "classes [10], but the model has classes 0..9"
    )
    assert "model has exits" in (core.implausible(Result(9, 99, (1,), (0.5,))) or "")


def test_a_compute_failure_is_one_error_record_and_cancels_the_request() -> None:
    core = make_core()
    connected(core)
    rid, _ = offload(core, 0, 1.0)
    acts = core.frame_failed(1.01, 0, "ValueError: bad")
    (rec,) = records(acts)
    assert rec == {"frame": 0, "where": "error", "error": "ValueError: bad"}
    assert Send(Cancel(rid)) in acts and acts[-1] == FrameDone(0) and core.errors == 1
    acts = core.frame_arrived(2.0, 1, label=3, origin="x.png", error="cannot decode")
    assert records(acts) == [
        {
            "frame": 1,
            "where": "error",
            "error": "SourceError: cannot decode",
            "label": 3,
            "origin": "x.png",
        }
    ]
    summary = core.summary(2.0)
    assert summary["errors"] == 2 and summary["unanswered"] == 0 and summary["frames_read"] == 2


# -- the policy call -----------------------------------------------------------------------


class _Script:
    """Decides from a script: one decision per call."""

    def __init__(self, decisions: list[Decision]) -> None:
        self.decisions = decisions
        self.seen: list[float] = []

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.seen.append(now)
        return self.decisions[min(len(self.seen) - 1, len(self.decisions) - 1)]


def test_a_decision_is_logged_when_it_changes_not_per_frame() -> None:
    a, b = Decision(2, 0.8, "spinn"), Decision(4, 0.8, "spinn")
    policy = _Script([a, a, a, b, b, a])
    core = make_core(policy=policy, server=None)
    logged = []
    for fid in range(5):
        logged += [x.msg % x.args for x in only(core.frame_arrived(fid, fid), Log)]
    assert logged == ["decision: split 4 thr 0.80 (spinn)", "decision: split 2 thr 0.80 (spinn)"]
    assert policy.seen == [0.0, 0, 1, 2, 3, 4]  # the constructor's, then one per frame
    assert core.summary(5.0)["split"] == 2


def test_plans_say_no_early_exit_and_truncation_on_the_wire() -> None:
    core = make_core(server=None)
    plan = core.plan(Decision(1, None))
    assert (plan.wire_thr, plan.rule.thr_conf, plan.wire_early_exits) == (1.0, None, False)
    plan = core.plan(Decision(1, 0.7))
    assert (plan.wire_thr, plan.wire_early_exits, plan.last) == (0.7, True, MODEL.num_stages)
    # Truncated after exit 1, whose stage the server runs first: threshold 0 answers there.
    plan = core.plan(Decision(MODEL.exit_stages[0] + 1, 0.7, final_exit=1))
    assert plan.last == MODEL.exit_stages[1] + 1 and plan.forced_exit == 1
    assert (plan.wire_thr, plan.wire_early_exits) == (0.0, True)
    with pytest.raises(DeviceError, match="exit 99"):
        core.plan(Decision(1, 0.5, final_exit=99))


# -- the link: PINGs, probes, dead links, reconnects -----------------------------------------


def _pong(ping: Ping, at: float, received_bytes: int | None = None) -> Pong:
    return Pong.reply_to(ping, at, received_bytes)


def test_pings_time_the_latency_and_a_silent_link_is_closed() -> None:
    core = make_core(probe_bytes=0, ping_timeout_s=1.5, ping_interval_s=0.5)
    (first,) = [a.message for a in only(connected(core, 10.0), Send)]
    assert isinstance(first, Ping) and first.padding == b""
    core.heard(10.02)
    core.receive(10.02, _pong(first, 10.01))
    assert core.profiler.latency.samples == 1
    # The first few PINGs come 0.1 s apart.
    assert core.next_timer(10.02) == pytest.approx(10.1)
    (second,) = [a.message for a in only(core.timer(10.1), Send)]
    # Unanswered, but the server was heard from recently: alive.
    core.heard(11.5)
    assert not only(core.timer(11.65), CloseLink)
    acts = core.timer(13.1)
    (close,) = only(acts, CloseLink)
    assert "no PONG" in close.reason and core.next_timer(13.2) is None  # pings stop
    acts = core.link_down(13.2, close.reason)
    assert only(acts, Reconnect)[0].delay_s == 0.0  # the link lasted over 2 s: at once


def test_probe_trains_go_once_latency_is_known_and_measure_the_bandwidth() -> None:
    core = make_core(probe_bytes=4096)
    (ping,) = [a.message for a in only(connected(core, 0.0), Send)]
    assert not only(core.timer(0.0), SendProbeTrain)  # no L yet
    core.receive(0.001, _pong(ping, 0.0005))
    acts = core.timer(0.002)
    (train,) = only(acts, SendProbeTrain)
    assert len(train.pings) >= 3 and all(len(p.padding) > 0 for p in train.pings)
    sizes = [len(p.padding) + 40 for p in train.pings]
    core.train_written(sizes)
    assert core.probe_bytes_sent == sum(sizes)
    before = core.profiler.bandwidth.train_samples
    # The server read them 20 ms apart: far slower than the prior B, a timed sample.
    total = 0
    for i, (p, size) in enumerate(zip(train.pings, sizes, strict=True)):
        total += size
        core.receive(0.1 + i * 0.02, _pong(p, 5.0 + i * 0.02, total))
    assert core.profiler.bandwidth.train_samples == before + 1
    assert core.summary(0.1)["estimates"]["probe_bytes"] == sum(sizes)


def _fast_link(now: float, probe_bytes: int = 4096) -> DeviceCore:
    """A core connected at ``now`` over a link whose trains read 3 Gbit/s, L 1 ms (the
    trains it would send itself are never answered)."""
    core = make_core(probe_bytes=probe_bytes, ping_timeout_s=1.5, ping_interval_s=0.5)
    (ping,) = [a.message for a in only(connected(core, now), Send)]
    core.receive(now + 0.001, _pong(ping, now + 0.0005))
    core.profiler.bandwidth.observe_train(now, [(100_000, 0.0), (2_000_000, 0.006)], 2_100_000)
    return core


def test_a_ping_silent_behind_uploads_bounds_the_bandwidth() -> None:
    """Loopback cut to 200 kbit/s: uploads sent at the old rate fill the link and no answer
    comes. The PINGs written behind them are silent for 0.5 s: B drops to the rate that
    silence allows at most, long before the link would be given up as dead. (Which PINGs
    count, and how long a slow server makes the wait, is OnlineEstimates' to say:
    tests/decisions/test_online_estimates.py.)"""
    core = _fast_link(0.0)
    # 12 uploads of 5 kB at 30 a second, and a PING behind them; nothing answers.
    now = 1.0
    for fid in range(12):
        offload(core, fid, now, nbytes=5_000)
        now += 1 / 30
    pings = [a.message for a in only(core.timer(now), Send) if isinstance(a.message, Ping)]
    assert len(pings) == 1  # behind 60 kB
    assert core.next_timer(now) <= now + 0.001 + 0.5 + 1e-9
    acts = core.timer(now + 0.6)
    assert not only(acts, CloseLink)
    assert core.profiler.bandwidth_bps() == pytest.approx(8 * 60_000 / 0.599, rel=1e-3)
    assert any("slower than" in str(a.msg) for a in only(acts, Log))

    # Without probe trains (--probe-bytes 0) B comes from uploads alone, and nothing
    # would lift a silence's bound again: silence bounds nothing there.
    core = _fast_link(0.0, probe_bytes=0)
    fast = core.profiler.bandwidth_bps()
    now = 1.0
    for fid in range(12):
        offload(core, fid, now, nbytes=5_000)
        now += 1 / 30
    core.timer(now)
    core.timer(now + 0.6)
    assert core.profiler.bandwidth_bps() == fast


def test_a_train_cut_short_by_the_link_is_void() -> None:
    core = make_core(probe_bytes=4096)
    (ping,) = [a.message for a in only(connected(core, 0.0), Send)]
    core.receive(0.001, _pong(ping, 0.0005))
    (train,) = only(core.timer(0.002), SendProbeTrain)
    core.train_written([100, 0])
    assert core.probe_bytes_sent == 0


def test_reconnects_back_off_and_a_repeated_misconfiguration_is_fatal() -> None:
    core = make_core(misconfig_tries=3, extra_servers=(("10.0.0.2", 7878),))
    assert core.server_address == ("127.0.0.1", 7878)
    acts = core.connect_failed(0.0, "refused")
    assert only(acts, Reconnect) == [Reconnect(0.0)]  # the next server, at once
    assert core.server_address == ("10.0.0.2", 7878)
    acts = core.connect_failed(0.1, "refused")
    assert only(acts, Reconnect)[0].delay_s > 0  # a whole round failed: backoff
    hint = "closes connections during the handshake: is the server using TLS?"
    warnings = []
    for i in range(3):
        acts = core.connect_failed(1.0 + i, "closed", closed_in_handshake=True)
        warnings += [a for a in only(acts, Log) if a.level == logging.WARNING]
    assert len(warnings) == 1 and hint in warnings[0].args[2]  # said once
    (fatal,) = only(acts, Fatal)
    assert hint in fatal.message and "3 times in a row" in fatal.message
    assert not only(acts, Reconnect) and core.fatal == fatal.message


def test_the_core_names_the_misconfiguration_a_failed_handshake_points_at() -> None:
    def hint(*, not_tls: bool = False, closed: bool = False, **config: Any) -> str | None:
        core = make_core(misconfig_tries=1, **config)
        core.connect_failed(0.0, "x", not_tls=not_tls, closed_in_handshake=closed)
        return None if core.fatal is None else core.fatal.split(" (the handshake")[0]

    assert hint() is None and hint(tls=True) is None  # a plain failure: retried
    assert "does not answer in TLS" in (hint(not_tls=True, tls=True) or "")
    # Closed before WELCOME: a plain device at a TLS server, or a TLS device without the
    # client certificate the server requires; with one, nothing points at a flag.
    assert "start the device with --tls or --tls-ca" in (hint(closed=True) or "")
    assert "give this device one with --tls-cert" in (hint(closed=True, tls=True) or "")
    assert hint(closed=True, tls=True, tls_cert="c.pem", tls_key="k.pem") is None
    # The same hint again counts; a different failure in between starts the count anew.
    core = make_core(misconfig_tries=2)
    core.connect_failed(0.0, "x", closed_in_handshake=True)
    core.connect_failed(0.1, "y")
    assert not only(core.connect_failed(0.2, "x", closed_in_handshake=True), Fatal)
    assert only(core.connect_failed(0.3, "x", closed_in_handshake=True), Fatal)
    assert core.fatal is not None


def test_a_head_packed_for_another_server_is_recoded_to_what_this_one_takes() -> None:
    core = DeviceCore(
        DeviceConfig.from_fields(status_interval_s=0),
        profile=PROFILE,
        policy=FixedPolicy(0, None),
        model=MODEL,
        codecs=(LOSSY_CODEC, "sparse_int8"),
    )
    core.link_up(0.0, accepted=(LOSSY_CODEC, "sparse_int8", IMAGE_CODEC))
    assert core.recode_to(LOSSY_CODEC) is None and core.recode_to(IMAGE_CODEC) is None
    core.link_down(1.0, "gone")
    core.link_up(2.0, accepted=("sparse_int8",))  # a server with neither
    assert core.recode_to(LOSSY_CODEC) == "sparse_int8"
    assert core.recode_to(IMAGE_CODEC) == "sparse_int8"  # the float input, never uintb
    assert core.recode_to("sparse_int8") is None
    assert recode_target(DICT_CODEC, "sparse_int8", ("sparse_int8",)) == "sparse_int8"
    assert recode_target(DICT_CODEC, DICT_CODEC, (DICT_CODEC,)) is None
    assert recode_target(IMAGE_CODEC, "float32", ("float32",)) == "float32"


def test_a_raised_compute_is_logged_with_its_traceback_and_answered_once() -> None:
    core = make_core(server=None, split=5)
    core.frame_arrived(0.0, 0, label=4)
    boom = ValueError("bad image")
    acts = core.frame_failed(0.1, 0, boom)
    (line,) = [a for a in only(acts, Log) if a.level == logging.ERROR]
    assert line.exc_info is boom and line.args == (0,)
    assert records(acts) == [
        {"frame": 0, "where": "error", "error": "ValueError: bad image", "label": 4}
    ]
    assert acts[-1] == FrameDone(0) and core.frames_read == 1


def test_a_server_error_or_bye_closes_the_link() -> None:
    core = make_core()
    connected(core)
    acts = core.receive(0.1, Error(ErrorCode.MODEL_MISMATCH, "other model"))
    assert only(acts, Fatal) and only(acts, CloseLink)
    connected(core, 1.0)
    acts = core.receive(1.1, Bye("restart"))
    assert only(acts, CloseLink) == [CloseLink("server said bye (restart)")]
    acts = core.receive(1.2, Ping(7, 1.0))
    (pong,) = [a.message for a in only(acts, Send)]
    assert isinstance(pong, Pong) and pong.seq == 7


def test_a_compute_busy_time_counts_the_workers_gap_less_link_work() -> None:
    core = make_core(server=None)
    for fid, now in enumerate((1.0, 1.01)):
        core.frame_arrived(now, fid)
        c = ComputeCall(
            worker=5,
            started=now + 0.002,
            ended=now + 0.005,
            link_busy_ms=fid * 1.0,
            queued=True,
            waited_s=0.0,
        )
        head(
            core,
            now + 0.005,
            fid,
            c=c,
            answer=LocalExit(0, (1,), (0.9,)),
            packed=None,
            stages_ms=3.0,
            reached=1,
            link_up=False,
        )
    # Overheads beyond the 3 ms of stages: none in the first call; in the second, the 7 ms
    # gap after the first less 1 ms of link work in it. Their mean:
    assert core.profiler.busy.head_overhead_ms == pytest.approx(3.0)


def test_status_and_summary_come_from_the_core() -> None:
    core = make_core(server=None)
    core.frame_arrived(0.0, 0)
    head(core, 0.01, 0, answer=LocalExit(0, (1,), (0.9,)), packed=None, reached=1, link_up=False)
    summary = core.summary(1.0)
    assert summary["frames"] == 1 and summary["frames_read"] == 1
    assert summary["server_connects"] == 0 and summary["split"] == 2
    assert "split" in core.status_line(1.0, None)


def test_config_is_only_read(tmp_path: Path) -> None:
    cfg = DeviceConfig.from_fields(server=None)
    core = DeviceCore(cfg, profile=PROFILE, policy=FixedPolicy(1, 0.5), model=MODEL)
    assert core.config is cfg and replace(cfg) == cfg


def test_a_ping_behind_queued_uploads_does_not_time_the_latency() -> None:
    """A bare PING that goes out behind uploads still on the uplink (at B) measures the
    uplink's queue, not L: it is left out, and the next one, once they are answered,
    counts."""
    core = make_core(probe_bytes=0, ping_interval_s=0.5)
    (first,) = [a.message for a in only(connected(core, 0.0), Send)]
    core.receive(0.011, _pong(first, 0.005))
    assert core.profiler.latency.samples == 1
    # 200 kB at the prior B (10 Mbit/s) hold the uplink for 160 ms.
    rid, _ = offload(core, 0, 0.05, nbytes=200_000)
    (behind,) = [a.message for a in only(core.timer(0.1), Send)]
    assert isinstance(behind, Ping)
    core.receive(0.16, _pong(behind, 0.15))
    assert core.profiler.latency.samples == 1
    core.receive(0.17, result(rid))
    (clear,) = [a.message for a in only(core.timer(0.2), Send)]
    core.receive(0.211, _pong(clear, 0.205))
    assert core.profiler.latency.samples == 2


def test_frames_are_packed_with_the_first_codec_the_server_took() -> None:
    cfg = DeviceConfig.from_fields(status_interval_s=0)
    core = DeviceCore(
        cfg,
        profile=PROFILE,
        policy=FixedPolicy(0, None),
        model=MODEL,
        codecs=("sparse_int8_zdict", "sparse_int8"),
    )

    def packing(fid: int, now: float) -> tuple[str, bool]:
        (run,) = only(core.frame_arrived(now, fid, link_up=core.accepted != ()), RunHead)
        return run.codec, run.pixels

    assert packing(0, 0.0) == ("sparse_int8", False)  # not connected: what every server takes
    core.link_up(1.0, accepted=("sparse_int8", "sparse_int8_zdict", "uint8_image"))
    assert packing(1, 1.0) == ("sparse_int8_zdict", True) and core.pack_codec == "sparse_int8_zdict"
    core.link_down(2.0, "reset")
    core.link_up(3.0, accepted=("sparse_int8",))  # another server, without the dictionaries
    assert packing(2, 3.0) == ("sparse_int8", False)
    core.link_down(4.0, "reset")
    assert core.accepted == () and packing(3, 4.0) == ("sparse_int8", False)


def test_uploads_after_an_unanswered_ping_do_not_keep_a_black_hole_alive() -> None:
    """Uploads sent after the oldest unanswered PING queue behind it, so they do not
    lengthen the wait allowed for its PONG: a device streaming into a black hole at a
    low estimate of B still declares the link dead."""
    core = make_core(probe_bytes=0, ping_timeout_s=1.5, ping_interval_s=0.5)
    (first,) = [a.message for a in only(connected(core, 0.0), Send)]
    core.heard(0.01)
    core.receive(0.01, _pong(first, 0.005))
    (lost,) = [a.message for a in only(core.timer(0.1), Send)]
    assert isinstance(lost, Ping)
    closed: list[CloseLink] = []
    fid, now = 0, 0.15
    while now < 6.0 and not closed:
        # 20 frames/s of 50 kB each: 8 Mbit/s against the prior B of 10 Mbit/s; nothing
        # comes back from the black hole.
        _, acts = offload(core, fid, now, nbytes=50_000)
        closed += only(acts, CloseLink) + only(core.timer(now + 0.01), CloseLink)
        fid, now = fid + 1, now + 0.05
    assert closed, "the link was never declared dead"
    assert "no PONG" in closed[0].reason
    assert now < 0.1 + 1.5 + 1.0  # the timeout, plus slack for the timer's cadence


FACTS = CheckpointFacts(
    input_shape=(1, 28, 28),
    input_mean=(0.5,),
    input_std=(0.25,),
    classes=MODEL.class_names,
    split_shapes=tuple((4, 28, 28) for _ in range(MODEL.num_stages)),
)


def _description(facts: CheckpointFacts) -> Description:
    return Description(
        **{f.name: getattr(facts, f.name) for f in fields(facts)},
        max_batch=1, max_frame_bytes=1 << 20, max_tensor_elements=1 << 20, max_in_flight=8,
        max_outstanding=64, handshake_timeout_s=10.0, idle_timeout_s=60.0,
    )  # fmt: skip


def test_a_server_describing_another_model_is_refused_naming_the_difference() -> None:
    cfg = DeviceConfig.from_fields(status_interval_s=0)
    core = DeviceCore(
        cfg, profile=PROFILE, policy=FixedPolicy(2, None), model=replace(MODEL, facts=FACTS)
    )
    core.start(0.0)
    shapes = list(FACTS.split_shapes)
    shapes[1] = (9, 9, 9)
    acts = core.link_up(0.1, description=_description(replace(FACTS, split_shapes=tuple(shapes))))
    (send,) = only(acts, Send)
    assert send.message.code is ErrorCode.MODEL_MISMATCH
    (fatal,) = only(acts, Fatal)
    assert "split 1 server [9, 9, 9], checkpoint [4, 28, 28]" in fatal.message
    assert core.connects == 0 and not only(acts, StartFrames)  # the stop releases the frames
    # The same description, agreeing, is a connection like any other.
    core = DeviceCore(
        cfg, profile=PROFILE, policy=FixedPolicy(2, None), model=replace(MODEL, facts=FACTS)
    )
    acts = core.link_up(0.1, description=_description(FACTS))
    assert not only(acts, Fatal) and core.connects == 1


def test_the_core_classifies_a_failed_handshake() -> None:
    core = make_core(misconfig_tries=3)
    for code in (ErrorCode.MODEL_MISMATCH, ErrorCode.VERSION, ErrorCode.UNAUTHENTICATED):
        acts = make_core().connect_failed(0.0, "x", refused=Error(code, "not you"))
        assert only(acts, Fatal) == [Fatal("server refused this device: not you")]
        assert not only(acts, Reconnect)
    busy = Error(ErrorCode.BUSY, "full")
    acts = core.connect_failed(0.0, "server error BUSY: full", refused=busy)
    assert not only(acts, Fatal) and only(acts, Reconnect)  # transient: retried
    acts = make_core().connect_failed(0.0, "bad proof", token_mismatch=True)
    (fatal,) = only(acts, Fatal)
    assert fatal.message.startswith("token authentication failed: bad proof")
    acts = make_core().connect_failed(0.0, "self-signed", untrusted=True)
    assert only(acts, Fatal) == [Fatal("TLS: server 127.0.0.1:7878 not trusted: self-signed")]


def test_frames_wait_for_the_first_connection_up_to_the_connect_timeout() -> None:
    assert make_core(server=None).start(0.0) == [StartFrames()]
    core = make_core(connect_timeout_s=2.0)
    assert not only(core.start(10.0), StartFrames)
    assert core.next_timer(10.0) == 12.0
    assert not only(core.timer(11.0), StartFrames)
    acts = connected(core, 11.5)  # connected in time: frames start now
    assert only(acts, StartFrames) == [StartFrames()]
    assert not only(core.timer(12.0), StartFrames)
    # Not connected within the timeout: frames start locally, said once.
    core = make_core(connect_timeout_s=2.0)
    core.start(0.0)
    acts = core.timer(2.0)
    assert only(acts, StartFrames) == [StartFrames()]
    assert [a.msg for a in only(acts, Log) if a.level == logging.WARNING] == [
        "server not reachable yet: starting locally, offload resumes later"
    ]
    assert core.next_timer(2.0) is None
    assert not only(connected(core, 3.0), StartFrames)


# -- the handshake and bad data from the server ------------------------------------------------

TOKEN = b"a-shared-token-of-32-bytes-long!"
NONCE = bytes(range(32))


def test_a_challenge_is_answered_with_the_proof_of_the_token() -> None:
    core = make_core()
    server_nonce = bytes(range(100, 132))
    challenge = Challenge(server_nonce, server_proof(TOKEN, NONCE, server_nonce))
    acts = core.handshake(0.0, challenge, token=TOKEN, nonce=NONCE)
    assert acts == [Send(Auth(device_proof(TOKEN, NONCE, server_nonce)))]
    assert core.fatal is None


def test_a_token_the_server_does_not_prove_ends_the_run_after_an_error() -> None:
    core = make_core()
    error = RemoteProtocolError(
        "CHALLENGE proof does not match the shared token", ErrorCode.UNAUTHENTICATED
    )
    acts = core.handshake(0.0, error, token=TOKEN, nonce=NONCE)
    (send,) = only(acts, Send)
    assert send.message == Error(ErrorCode.UNAUTHENTICATED, str(error))
    (fatal,) = only(acts, Fatal)
    assert fatal.message.startswith("token authentication failed: CHALLENGE proof does not")
    assert "tokens differ" in fatal.message
    # The ERROR goes before the connection is dropped.
    assert acts.index(send) < acts.index(only(acts, CloseLink)[0])


def test_a_refusal_or_a_stray_message_in_the_handshake_fails_the_connect() -> None:
    core = make_core()
    acts = core.handshake(0.0, Error(ErrorCode.BUSY, "full"))
    assert only(acts, CloseLink) == [CloseLink("server error BUSY: full")]
    assert only(acts, Reconnect) and core.fatal is None  # transient: retried
    acts = make_core().handshake(0.0, Error(ErrorCode.VERSION, "speaks 3"))
    assert only(acts, Fatal) == [Fatal("server refused this device: speaks 3")]
    acts = core.handshake(1.0, Pong(1, 0.0, 0.0))
    assert only(acts, CloseLink) == [CloseLink("unexpected Pong during the handshake")]
    # Another protocol error is a failed connect like any other, with no ERROR sent.
    acts = core.handshake(2.0, RemoteProtocolError("frame of 9 bytes is not valid msgpack"))
    assert not only(acts, Send) and only(acts, Reconnect) and only(acts, CloseLink)


def test_a_connect_that_timed_out_says_how_long_it_waited() -> None:
    core = make_core(connect_timeout_s=2.5)
    acts = core.connect_failed(0.0, "TimeoutError", timed_out=True)
    (line,) = [a for a in only(acts, Log) if "unreachable" in a.msg]
    assert line.args[2] == "no answer within 2.5 s (connect and handshake)"


def test_bad_data_from_the_server_is_answered_with_an_error_and_closes_the_link() -> None:
    core = make_core()
    connected(core)
    error = RemoteProtocolError("x" * 5000, ErrorCode.TOO_LARGE)
    acts = core.bad_data(0.1, error)
    (send,) = only(acts, Send)
    assert send.message.code is ErrorCode.TOO_LARGE and send.message.request_id is None
    assert len(send.message.message) == MAX_STRING  # cut to what the protocol carries
    assert only(acts, CloseLink) == [CloseLink(f"bad data from server: {error}")]
    assert core.next_timer(0.2) is None  # no more PINGs on it


def test_the_timer_delay_is_the_time_to_the_next_timer() -> None:
    core = make_core(probe_bytes=0, ping_interval_s=0.5)
    assert core.timer_delay(0.0) is None  # nothing to time before a connection
    connected(core, 10.0)
    assert core.timer_delay(10.02) == pytest.approx(0.08)  # the quick PINGs, 0.1 s apart
    assert core.timer_delay(11.0) == 0.0  # overdue: at once
