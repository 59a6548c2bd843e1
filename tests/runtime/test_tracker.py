"""Pure request bookkeeping: one answer per frame, the race, cancels, deadlines."""

from __future__ import annotations

import random

import pytest

from spinn.runtime.backoff import Backoff
from spinn.runtime.tracker import (
    FramePhase,
    RequestTracker,
    TrackerError,
    Where,
    request_deadline,
)

TOP = ((3, 1), (0.9, 0.05))


def _offload(t: RequestTracker, frame: int, now: float, deadline: float = 10.0) -> int:
    t.begin(frame, now, split=2, thr_conf=0.8)
    rid = t.new_request_id()
    t.offloaded(frame, rid, now, deadline, bytes_sent=100)
    return rid


def test_local_exit_before_split_answers_on_device_without_cancel() -> None:
    t = RequestTracker()
    t.begin(0, 1.0, split=3, thr_conf=0.7)
    answer, cancel = t.local_answer(0, 1.25, 1, *TOP)
    assert answer is not None and cancel is None
    assert answer.where is Where.DEVICE
    assert answer.latency_s == pytest.approx(0.25)
    assert answer.bytes_sent == 0 and answer.request_id is None
    assert t.is_answered(0) and t.in_flight == 0


def test_server_first_then_local_is_ignored() -> None:
    t = RequestTracker()
    rid = _offload(t, 0, 0.0)
    answer = t.server_result(rid, 0.1, 6, *TOP)
    assert answer is not None and answer.where is Where.SERVER
    assert answer.bytes_sent == 100 and answer.request_id == rid
    assert t.is_answered(0)
    late, cancel = t.local_answer(0, 0.2, 6, *TOP)
    assert late is None and cancel is None
    assert t.answered == 1 and t.cancels == 0


def test_local_first_cancels_and_late_result_is_stale() -> None:
    t = RequestTracker()
    rid = _offload(t, 0, 0.0)
    answer, cancel = t.local_answer(0, 0.05, 4, *TOP)
    assert answer is not None and answer.where is Where.DEVICE
    assert cancel == rid and t.cancels == 1
    assert t.server_result(rid, 0.06, 6, *TOP) is None
    assert t.answered == 1


def test_deadline_abandons_then_local_answer_is_fallback() -> None:
    t = RequestTracker()
    r0 = _offload(t, 0, 0.0, deadline=0.5)
    r1 = _offload(t, 1, 0.1, deadline=0.9)
    assert t.next_deadline() == 0.5
    assert t.expire(0.49) == []
    expired = t.expire(0.5)
    assert [(e.frame_id, e.request_id) for e in expired] == [(0, r0)]
    assert t.phase(0) is FramePhase.ABANDONED and t.next_deadline() == 0.9
    # The abandoned request's RESULT is stale; the device answers as fallback.
    assert t.server_result(r0, 0.6, 6, *TOP) is None
    answer, cancel = t.local_answer(0, 0.7, 6, *TOP)
    assert answer is not None and answer.where is Where.FALLBACK and cancel is None
    assert t.server_result(r1, 0.8, 6, *TOP) is not None
    assert t.expired == 1 and t.cancels == 1


def test_connection_lost_makes_all_offloaded_fallback() -> None:
    t = RequestTracker()
    rids = [_offload(t, i, 0.0) for i in range(3)]
    t.begin(3, 0.0, split=2, thr_conf=0.8)  # still local: unaffected
    assert sorted(t.server_lost()) == [0, 1, 2]
    assert t.awaiting_server == 0 and t.lost == 3
    for rid in rids:
        assert t.server_result(rid, 1.0, 6, *TOP) is None
    wheres = [t.local_answer(i, 1.0, 6, *TOP)[0] for i in range(4)]
    assert [a.where for a in wheres if a] == [Where.FALLBACK] * 3 + [Where.DEVICE]


def test_request_error_abandons_to_fallback() -> None:
    t = RequestTracker()
    rid = _offload(t, 0, 0.0)
    assert t.abandon(rid) == 0
    assert t.abandon(rid) is None
    assert t.server_result(rid, 0.1, 6, *TOP) is None
    answer, cancel = t.local_answer(0, 0.2, 6, *TOP)
    assert answer is not None and answer.where is Where.FALLBACK and cancel is None


def test_server_down_at_decision_is_fallback() -> None:
    t = RequestTracker()
    t.begin(0, 0.0, split=2, thr_conf=0.8)
    t.server_unavailable(0)
    answer, cancel = t.local_answer(0, 0.1, 6, *TOP)
    assert answer is not None and answer.where is Where.FALLBACK and cancel is None


def test_misuse_is_reported() -> None:
    t = RequestTracker()
    t.begin(5, 0.0, split=1, thr_conf=0.5)
    with pytest.raises(TrackerError, match="began after"):
        t.begin(5, 0.0, split=1, thr_conf=0.5)
    with pytest.raises(TrackerError, match="never begun"):
        t.local_answer(9, 0.0, 0, *TOP)
    t.offloaded(5, 1, 0.0, 1.0, 10)
    with pytest.raises(TrackerError, match="offloaded twice"):
        t.offloaded(5, 2, 0.0, 1.0, 10)
    with pytest.raises(TrackerError, match="not in flight"):
        t.offloaded(7, 3, 0.0, 1.0, 10)
    assert t.server_result(999, 0.0, 0, *TOP) is None


def test_random_races_answer_every_frame_exactly_once() -> None:
    """Any interleaving of results, local answers, deadlines and losses: one answer each."""
    for seed in range(30):
        rng = random.Random(seed)
        t = RequestTracker()
        answers: dict[int, Where] = {}
        rids: dict[int, int] = {}
        now = 0.0
        n = 40
        for frame in range(n):
            now += rng.random() * 0.01
            t.begin(frame, now, split=2, thr_conf=0.8)
            if rng.random() < 0.7:
                rids[frame] = t.new_request_id()
                t.offloaded(frame, rids[frame], now, now + rng.random() * 0.05, 50)
            events = [("local", frame)] + ([("server", frame)] if frame in rids else [])
            rng.shuffle(events)
            for kind, f in events:
                now += rng.random() * 0.02
                if rng.random() < 0.2:
                    t.expire(now)
                if rng.random() < 0.05:
                    t.server_lost()
                if kind == "server":
                    got = t.server_result(rids[f], now, 6, *TOP)
                else:
                    got, _ = t.local_answer(f, now, 6, *TOP)
                if got is not None:
                    assert got.frame_id not in answers, "answered twice"
                    answers[got.frame_id] = got.where
        assert sorted(answers) == list(range(n))
        assert t.in_flight == 0 and t.answered == n


def test_deadline_grows_with_estimates_and_margin() -> None:
    base = request_deadline(
        10.0,
        upload_bytes=10_000,
        download_bytes=100,
        bandwidth_bps=8e6,
        latency_s=0.01,
        server_time_s=0.005,
    )
    # expected = 2·0.01 + 8·10100/8e6 + 0.005 = 0.0351 s; ×2 + 0.05
    assert base == pytest.approx(10.0 + 2 * 0.0351 + 0.05)
    slow = request_deadline(
        10.0,
        upload_bytes=10_000,
        download_bytes=100,
        bandwidth_bps=8e4,
        latency_s=0.01,
        server_time_s=0.005,
    )
    assert slow == pytest.approx(10.0 + 2 * (0.02 + 8 * 10_100 / 8e4 + 0.005) + 0.05)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        request_deadline(
            0.0,
            upload_bytes=1,
            download_bytes=1,
            bandwidth_bps=0.0,
            latency_s=0.0,
            server_time_s=0.0,
        )


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [min(1.0, 0.1 * 2**i) for i in range(8)]
    for d, c in zip(delays, ceilings, strict=True):
        assert c / 2 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered
    assert max(delays) <= 1.0
    b.reset()
    assert b.next_delay() <= 0.1
    again = Backoff(base_s=0.1, cap_s=1.0, rng=random.Random(1))
    assert [again.next_delay() for _ in range(8)] == delays
    with pytest.raises(ValueError, match="cap_s"):
        Backoff(base_s=1.0, cap_s=0.5)


def test_a_failed_offloaded_frame_leaves_and_its_request_is_cancelled() -> None:
    t = RequestTracker()
    rid = _offload(t, 0, 0.0)
    assert t.fail(0) == rid
    assert t.is_answered(0) and t.in_flight == 0 and t.awaiting_server == 0
    assert t.failed == 1 and t.cancels == 1
    # Its RESULT, arriving later, is stale: no second record for the frame.
    assert t.server_result(rid, 1.0, 0, *TOP) is None
    with pytest.raises(TrackerError, match="already answered"):
        t.fail(0)


def test_a_frame_failing_before_it_began_still_orders_later_frames() -> None:
    t = RequestTracker()
    t.begin(0, 0.0, split=2, thr_conf=0.8)
    assert t.fail(1) is None and t.failed == 1
    assert t.phase(0) is FramePhase.LOCAL
    with pytest.raises(TrackerError, match="began after"):
        t.begin(1, 0.0, split=2, thr_conf=0.8)
    t.begin(2, 0.0, split=2, thr_conf=0.8)
    assert t.fail(2) is None and t.in_flight == 1
