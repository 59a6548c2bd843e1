"""Status line, summary and server stats line from synthetic answers."""

from __future__ import annotations

import json
import math

import pytest

from spinn.runtime.run_summary import COMPUTE_WINDOW, DeviceStats, ServerStats, percentile
from spinn.runtime.tracker import Answer, Where


def _answer(frame: int, where: Where, latency_s: float, cls: int, rid: int | None) -> Answer:
    return Answer(frame, where, 2, (cls,), (0.9,), latency_s, 100 if rid else 0, 2, 0.8, rid)


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(range(101)), 95) == pytest.approx(95.0)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summary_counts_accuracy_and_rates() -> None:
    s = DeviceStats(window_s=1.0)
    now = 0.0
    wheres = [Where.DEVICE, Where.SERVER, Where.SERVER, Where.FALLBACK]
    for i in range(20):
        now += 0.1
        where = wheres[i % 4]
        rid = i + 1 if where is not Where.DEVICE else None
        s.record(_answer(i, where, 0.01 * (i + 1), cls=i % 3, rid=rid), now, label=0)
    s.cancels = 3
    summary = s.summary(now)
    json.dumps(summary)
    assert summary["frames"] == 20
    assert summary["answered_by"] == {"device": 5, "server": 10, "fallback": 5}
    assert summary["accuracy"] == pytest.approx(7 / 20)
    assert summary["offload_rate"] == pytest.approx(15 / 20)
    assert summary["bytes_sent"] == 1500
    assert summary["latency_ms"]["p50"] == pytest.approx(105.0)  # type: ignore[index]
    # 10 answers in the last 1 s window.
    assert s.live_fps(now) == pytest.approx(10.0 / 1.0, rel=0.11)
    line = s.status_line(
        now, split=2, thr_conf=0.8, bandwidth_bps=24e6, latency_s=0.04, server_up=True
    )
    assert "split 2" in line and "24.0 Mbit/s" in line and "L 40.0 ms" in line
    assert "offload  75.0%" in line and "server up" in line
    common = {"split": 2, "thr_conf": 0.8, "bandwidth_bps": 24e6, "latency_s": 0.04}
    assert "server DOWN" in s.status_line(now, server_up=False, **common)  # type: ignore[arg-type]
    # A device-only run has no server to be down.
    assert "no server" in s.status_line(now, server_up=None, **common)  # type: ignore[arg-type]


def test_summary_without_labels_has_no_accuracy() -> None:
    s = DeviceStats()
    s.record(_answer(0, Where.DEVICE, 0.01, 1, None), 1.0, label=None)
    assert "accuracy" not in s.summary(1.0)


def test_no_answers_give_valid_json_and_dashes() -> None:
    s = DeviceStats()
    summary = json.loads(json.dumps(s.summary(1.0), allow_nan=False))
    assert summary["latency_ms"] == {"p50": None, "p95": None, "mean": None}
    line = s.status_line(
        1.0, split=2, thr_conf=0.8, bandwidth_bps=24e6, latency_s=0.04, server_up=True
    )
    assert "nan" not in line
    assert "p50      - ms p95      - ms" in line


def test_server_stats_line_rate() -> None:
    st = ServerStats()
    st.line(0.0, 0)
    st.requests = 50
    st.computed = 40
    st.compute_ms_total = 80.0
    line = st.line(2.0, 3)
    assert "req/s=25.0" in line and "queue=3" in line and "mean_compute_ms=2.00" in line
    assert json.loads(json.dumps(st.as_dict()))["computed"] == 40


def test_server_compute_times_stay_bounded_and_give_the_recent_median() -> None:
    st = ServerStats()
    # An old slow phase (100 ms) followed by a full window of 2..4 ms requests, each
    # held 1 ms longer than it computed.
    for _ in range(3 * COMPUTE_WINDOW):
        st.compute_ms.append(100.0)
        st.held_ms.append(101.0)
    for i in range(COMPUTE_WINDOW):
        st.compute_ms.append(2.0 + 2.0 * i / (COMPUTE_WINDOW - 1))
        st.held_ms.append(3.0 + 2.0 * i / (COMPUTE_WINDOW - 1))
    assert len(st.compute_ms) == len(st.held_ms) == COMPUTE_WINDOW
    assert st.as_dict()["compute_ms_median"] == pytest.approx(3.0, abs=1e-3)
    assert st.as_dict()["held_ms_median"] == pytest.approx(4.0, abs=1e-3)
    assert ServerStats().as_dict()["compute_ms_median"] is None
    assert ServerStats().as_dict()["held_ms_median"] is None
