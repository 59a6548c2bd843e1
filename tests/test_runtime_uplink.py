"""Upload samples from answer times: idle, backlogged and long links, small requests,
answers whose server time is unknown."""

from __future__ import annotations

import pytest

from spinn.runtime.uplink import UploadTimer

RATE = 200e3 / 8  # 200 kbit/s in bytes per second
L = 0.02
HELD = 0.005


def test_idle_link_recovers_the_rate() -> None:
    timer = UploadTimer()
    now = 0.0
    samples = []
    for _ in range(5):
        sent = now
        answer = sent + 8000 / RATE + L + HELD
        got = timer.answered(sent_at=sent, now=answer, nbytes=8000, server_s=HELD, latency_s=L)
        samples.append(got)
        now = answer + 1.0
    for got in samples:
        assert got is not None
        assert got[0] / got[1] == pytest.approx(RATE, rel=1e-9)


def test_backlogged_link_recovers_the_rate_not_the_queueing() -> None:
    """30 requests sent at once behind a 200 kbit/s uplink: answers come one upload apart."""
    timer = UploadTimer()
    size = 5000
    answers = [L + HELD + (i + 1) * size / RATE for i in range(30)]
    rates = []
    for t in answers:
        got = timer.answered(sent_at=0.0, now=t, nbytes=size, server_s=HELD, latency_s=L)
        if got is not None:
            rates.append(got[0] / got[1])
    assert len(rates) == 30
    # The first is timed from its send; the others from when the one before was through.
    assert rates == pytest.approx([RATE] * 30, rel=1e-9)


def test_a_long_path_is_not_a_backlog() -> None:
    """A stream paced at 10 ms over a 40 ms round trip: every request leaves before the
    previous answer is back, yet each crosses an idle 24 Mbit/s uplink in 1.3 ms. Timing
    from the previous answer would read the pacing (about 0.4 Mbit/s)."""
    timer = UploadTimer(min_bytes=1)
    rate, rtt, size = 24e6 / 8, 0.04, 4000
    rates = []
    for i in range(20):
        sent = 0.01 * i
        got = timer.answered(
            sent_at=sent, now=sent + size / rate + rtt + HELD, nbytes=size, server_s=HELD,
            latency_s=rtt,
        )  # fmt: skip
        assert got is not None
        rates.append(got[0] / got[1])
    assert rates == pytest.approx([rate] * 20, rel=1e-9)


def test_server_queueing_is_not_upload_time() -> None:
    """Ten requests sent at once over loopback to a server computing 5 ms each: the answers
    are 5 ms apart because of the server's queue, which held_ms covers: no sample."""
    timer = UploadTimer()
    for i in range(10):
        t = (i + 1) * HELD
        assert timer.answered(sent_at=0.0, now=t, nbytes=5000, server_s=t, latency_s=0.0) is None


def test_small_requests_are_summed() -> None:
    timer = UploadTimer(min_bytes=4096)
    got = timer.answered(sent_at=0.0, now=0.05, nbytes=1000, server_s=0.0, latency_s=0.01)
    assert got is None
    got = timer.answered(sent_at=1.0, now=1.05, nbytes=3500, server_s=0.0, latency_s=0.01)
    assert got == (4500, pytest.approx(0.08))


def test_a_refusal_clocks_the_uplink() -> None:
    """BUSY is answered on arrival (held 0 s): its answer times the upload like a RESULT."""
    timer = UploadTimer()
    upload = 8000 / RATE
    got = timer.answered(sent_at=0.0, now=upload + L, nbytes=8000, server_s=0.0, latency_s=L)
    assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)


def test_unknown_server_time_gives_no_sample_and_shadows_what_was_sent_before() -> None:
    """A cancelled or expired request's answer bounds when its bytes were through but does
    not time them: a request sent before that bound may have queued behind it for an unknown
    time, so it gives no sample either; one sent after it is timed as usual."""
    timer = UploadTimer()
    upload = 8000 / RATE
    assert timer.answered(sent_at=0.0, now=0.5, nbytes=8000, server_s=None, latency_s=L) is None
    shadowed = timer.answered(
        sent_at=0.1, now=0.5 + upload + L + HELD, nbytes=8000, server_s=HELD, latency_s=L
    )
    assert shadowed is None
    sent = 2.0
    got = timer.answered(
        sent_at=sent, now=sent + upload + L + HELD, nbytes=8000, server_s=HELD, latency_s=L
    )
    assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)


def test_reset_forgets_the_previous_connection() -> None:
    timer = UploadTimer()
    timer.answered(sent_at=0.0, now=5.0, nbytes=8000, server_s=None, latency_s=L)
    timer.answered(sent_at=0.0, now=5.0, nbytes=8000, server_s=HELD, latency_s=L)
    timer.reset()
    upload = 8000 / RATE
    got = timer.answered(sent_at=1.0, now=1.0 + upload + L, nbytes=8000, server_s=0.0, latency_s=L)
    assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)
