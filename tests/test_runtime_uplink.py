"""Upload samples from answer times: idle and backlogged links, small requests."""

from __future__ import annotations

import pytest

from spinn.runtime.uplink import UploadTimer

RATE = 200e3 / 8  # 200 kbit/s in bytes per second
L = 0.02
COMPUTE = 0.005


def test_idle_link_recovers_the_rate() -> None:
    timer = UploadTimer()
    now = 0.0
    samples = []
    for _ in range(5):
        sent = now
        answer = sent + 8000 / RATE + L + COMPUTE
        got = timer.answered(sent_at=sent, now=answer, nbytes=8000, compute_s=COMPUTE, latency_s=L)
        samples.append(got)
        now = answer + 1.0
    for got in samples:
        assert got is not None
        assert got[0] / got[1] == pytest.approx(RATE, rel=1e-9)


def test_backlogged_link_recovers_the_rate_not_the_queueing() -> None:
    """30 requests sent at once behind a 200 kbit/s uplink: answers come one upload apart."""
    timer = UploadTimer()
    size = 5000
    answers = [L + COMPUTE + (i + 1) * size / RATE for i in range(30)]
    rates = []
    for t in answers:
        got = timer.answered(sent_at=0.0, now=t, nbytes=size, compute_s=COMPUTE, latency_s=L)
        if got is not None:
            rates.append(got[0] / got[1])
    assert len(rates) == 30
    # The first is timed from its send; the others from the previous answer.
    assert rates[0] == pytest.approx(RATE, rel=1e-9)
    for r in rates[1:]:
        assert r == pytest.approx(RATE * (size / RATE) / (size / RATE - COMPUTE), rel=1e-9)
        assert r == pytest.approx(RATE, rel=0.05)


def test_small_requests_are_summed_and_compute_bound_gives_nothing() -> None:
    timer = UploadTimer(min_bytes=4096)
    got = timer.answered(sent_at=0.0, now=0.05, nbytes=1000, compute_s=0.0, latency_s=0.01)
    assert got is None
    got = timer.answered(sent_at=1.0, now=1.05, nbytes=3500, compute_s=0.0, latency_s=0.01)
    assert got == (4500, pytest.approx(0.08))
    # Loopback with a busy server: answers are compute apart, so nothing is sampled.
    timer.reset()
    t = 0.0
    for _ in range(10):
        t += COMPUTE
        assert (
            timer.answered(sent_at=0.0, now=t, nbytes=5000, compute_s=COMPUTE, latency_s=0.0)
            is None
        )


def test_unknown_server_time_gives_no_sample_but_marks_the_link_busy() -> None:
    """An ERROR with no known server time (BUSY, expired) is no sample, yet the next
    request sent before it is timed from it, as on a backlogged link."""
    timer = UploadTimer()
    assert timer.answered(sent_at=0.0, now=0.5, nbytes=8000, compute_s=None, latency_s=L) is None
    assert timer.last_answer_at == 0.5
    upload = 8000 / RATE
    got = timer.answered(
        sent_at=0.1, now=0.5 + upload + COMPUTE, nbytes=8000, compute_s=COMPUTE, latency_s=L
    )
    assert got is not None
    assert got[0] / got[1] == pytest.approx(RATE, rel=1e-9)
