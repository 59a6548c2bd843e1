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
    timer = UploadTimer(min_bytes=1, min_span_s=0.0)
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


def test_a_stall_that_bunches_answers_does_not_read_fast() -> None:
    """The server's event loop stalls 40 ms and then reads three 25 KB requests at once:
    their held times start together, so the first upload reads long and the next two near
    0. Those join the following upload in one sample, which B's median filter drops: the
    estimate never rises above the link rate (summed per request it read 4000 Mbit/s)."""
    from spinn.estimators import BandwidthEstimator

    rate, rtt, size, compute = 24e6 / 8, 0.04, 25_000, 0.002
    upload = size / rate
    timer, est = UploadTimer(), BandwidthEstimator()
    stall_until = 0.05
    for i in range(30):
        sent = 0.0 if i < 3 else 0.05 + (i - 3) * 0.02  # a burst of three, then paced
        through = max(sent, i * upload if i < 3 else sent) + upload
        # Read together when the stall ends, microseconds apart.
        decoded = max(through, stall_until + 1e-5 * i) if i < 3 else through
        answer = decoded + compute + rtt  # the one-way delays add up to the RTT
        got = timer.answered(sent_at=sent, now=answer, nbytes=size, server_s=compute,
                             latency_s=rtt)  # fmt: skip
        if got is not None:
            est.observe_transfer(answer, *got)
        assert est.bandwidth_bps is None or est.bandwidth_bps <= 1.05 * 8 * rate


def test_without_held_ms_only_requests_after_the_previous_answer_are_timed() -> None:
    """A server that reports compute time but not held_ms: ten requests sent at once to a
    server computing 5 ms each come back 5 ms apart; subtracting compute alone would read
    its queue as 8 Mbit/s of link. Only a request sent after the last answer is timed."""
    timer = UploadTimer(min_bytes=1)
    upload = 5000 / RATE
    for i in range(10):
        got = timer.answered(sent_at=0.0, now=upload + (i + 1) * HELD, nbytes=5000,
                             server_s=HELD, latency_s=0.0, queue_known=False)  # fmt: skip
        if i == 0:  # the first found no answer outstanding: it is timed
            assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)
        else:
            assert got is None
    got = timer.answered(sent_at=1.0, now=1.0 + 2 * upload + L + HELD, nbytes=10_000,
                         server_s=HELD, latency_s=L, queue_known=False)  # fmt: skip
    assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)


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


def test_a_cancelled_request_bounds_its_upload_and_moves_nothing_on() -> None:
    """A cancelled request is answered when its CANCEL (or a worker) reaches it: its
    sample is an upper bound on its upload (a low rate), and it does not move the time
    the uplink was free on, so the next request is timed from the one before and counts
    the cancelled one's bytes too: low (here half), never high. An unknown server time
    gives no sample at all."""
    timer = UploadTimer(min_bytes=1)
    upload = 8000 / RATE
    first = timer.answered(sent_at=0.0, now=upload + L + HELD, nbytes=8000, server_s=HELD,
                           latency_s=L)  # fmt: skip
    assert first is not None
    # Two more sent at once behind it; the second is cancelled, answered at its CANCEL.
    cancelled = timer.answered(sent_at=0.0, now=9.0, nbytes=8000, server_s=0.0,
                               latency_s=L, bound=True)  # fmt: skip
    assert cancelled is not None and cancelled[0] / cancelled[1] < RATE / 10
    third = timer.answered(
        sent_at=0.0, now=3 * upload + L + HELD, nbytes=8000, server_s=HELD, latency_s=L
    )
    assert third is not None and third[0] / third[1] == pytest.approx(RATE / 2, rel=1e-9)
    assert timer.answered(sent_at=10.0, now=11.0, nbytes=8000, server_s=None, latency_s=L) is None


def test_reset_forgets_the_previous_connection() -> None:
    timer = UploadTimer()
    timer.answered(sent_at=0.0, now=5.0, nbytes=8000, server_s=HELD, latency_s=L)
    timer.reset()
    upload = 8000 / RATE
    got = timer.answered(sent_at=1.0, now=1.0 + upload + L, nbytes=8000, server_s=0.0, latency_s=L)
    assert got is not None and got[0] / got[1] == pytest.approx(RATE, rel=1e-9)
