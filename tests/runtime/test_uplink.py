"""Upload samples from answer times: idle, backlogged and long links, small requests,
answers whose server time is unknown."""

from __future__ import annotations

from typing import Any

import pytest

from spinn.decisions.online_estimates import BandwidthEstimator
from spinn.runtime.uplink import ProbeTrains, UploadTimer

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
    assert not timer.sample_idle  # the last was sent before the one ahead was through


def test_answers_read_late_together_cannot_show_a_rise() -> None:
    """A 0.2 Mbit/s link kept busy by 1 kB uploads, 40 ms each. The loaded device reads
    19 answers in 20 late and together: each is timed from the previous one's end, and
    five of them read 5 kB in 8.5 ms, 4.7 Mbit/s, three samples in a row. Such backlogged
    samples never raise B; the same readings from uploads that found the link idle do."""
    from spinn.decisions.online_estimates import BandwidthEstimator

    est = BandwidthEstimator()
    est.observe_train(0.0, [(0, 0.0), (2_000, 0.08), (4_000, 0.16), (6_000, 0.24)], 6_000)
    low = est.bandwidth_bps
    assert low == pytest.approx(0.2e6)
    timer, fast = UploadTimer(), []
    for i in range(40):
        answer = 0.04 * (i + 1) + HELD + L
        if i % 20:  # read when the stall ends, 1.7 ms apart
            answer = 0.04 * (i - i % 20 + 20) + HELD + L + 0.0017 * (i % 20)
        got = timer.answered(sent_at=0.04 * i, now=answer, nbytes=1_000, server_s=HELD,
                             latency_s=L)  # fmt: skip
        if got is not None:
            est.observe_transfer(answer, *got, idle=timer.sample_idle)
            if got[0] / got[1] > 4 * low / 8:
                fast.append(timer.sample_idle)
    assert fast[:3] == [False] * 3  # three in a row that would have suspected a rise
    assert est.take_suspicion() is None
    for i in range(3):
        est.observe_transfer(2.0 + i, 5_000, 0.0085)
    assert est.take_suspicion() == pytest.approx(8 * 5_000 / 0.0085)


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
    from spinn.decisions.online_estimates import BandwidthEstimator

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


# -- probe trains (ProbeTrains) -----------------------------------------------------------


def _arrivals(rate_bps: float, nbytes: int, t0: float) -> list[tuple[int, float]]:
    """A train through a shaper with netshape's burst (5 ms of the rate, >= 1500 B),
    released in burst-sized chunks at the rate; one point per chunk (server read)."""
    burst = max(1500, int(rate_bps * 0.005 / 8))
    off, t = min(burst, nbytes), t0
    out = [(off, t)]
    while off < nbytes:
        n = min(burst, nbytes - off)
        off, t = off + n, t + 8 * n / rate_bps
        out.append((off, t))
    return out


def _simulate(
    trains: ProbeTrains, est: BandwidthEstimator, rate_at: Any, until: float, t: float = 0.0
) -> tuple[list[tuple[float, float]], int]:
    """Run the probing loop on an injected clock over a link whose rate is ``rate_at(t)``
    and a 20 ms round trip: returns (time, estimate) after each train and the bytes sent."""
    trace, sent = [], 0
    # The server's PING limit (50 a second, bursts of 100), less the device's bare PINGs.
    tokens, tokens_at = 98.0, t
    while t < until:
        t = max(t, trains.due_at(t, est.bandwidth_bps or 10e6))
        if t >= until:
            break
        assert trains.due(t, est.bandwidth_bps or 10e6)
        frames = trains.frames(est.bandwidth_bps or 10e6)
        nbytes = sum(frames) + 20 * len(frames)
        trains.sent(t, nbytes, len(frames))
        sent += nbytes
        tokens = min(98.0, tokens + 48.0 * (t - tokens_at)) - len(frames)
        tokens_at = t
        assert tokens >= 0.0, "the server would refuse these PINGs"
        assert not trains.due(t, 1e6) and trains.due_at(t, 1e6) == float("inf")
        arrivals = _arrivals(rate_at(t), nbytes, t + 0.01)
        t = arrivals[-1][1] + 0.01
        trains.train_answered(t, est, arrivals, nbytes, 10e6)
        trace.append((t, est.bandwidth_bps or 10e6))
    return trace, sent


def test_probe_trains_size_and_scout() -> None:
    trains = ProbeTrains()
    # At 500 Mbit/s a full train is 30 ms of the link (1.9 MB); its scout is 16x smaller,
    # but no more than 32 kB (at 24 Mbit/s, 5.6 kB would be: 6 kB, the smallest train).
    assert sum(trains.frames(500e6)) == pytest.approx(32_768, abs=3)
    assert sum(ProbeTrains().frames(24e6)) == 6_144
    trains.scouting = False
    full = trains.frames(500e6)
    assert sum(full) == pytest.approx(500e6 * 0.03 / 8, abs=64)
    assert max(full) <= trains.max_frame_padding and len(full) == 31
    # At 1 Mbit/s 30 ms is below the smallest train: no scout, four frames of 1.5 kB.
    trains = ProbeTrains()
    assert trains.frames(1e6) == [1536] * 4 and not trains.scouting
    trains = ProbeTrains(scouting=False)
    assert trains.frames(1e12) == [59_919] * 35  # capped at 2 MiB
    with pytest.raises(ValueError, match="share"):
        ProbeTrains(share=0.0)


@pytest.mark.parametrize("rate", [0.5e6, 24e6, 500e6])
def test_probe_trains_converge_within_budget(rate: float) -> None:
    trains, est = ProbeTrains(), BandwidthEstimator()
    trace, _ = _simulate(trains, est, lambda t: rate, 3.0)
    # From the prior (10 Mbit/s), within 30% in about a second.
    settled = next(t for t, b in trace if abs(b / rate - 1) <= 0.3)
    assert settled < (1.0 if rate > 1e6 else 2.0), trace
    assert est.bandwidth_bps == pytest.approx(rate, rel=0.05)
    # Steady state: the trains take at most the share (3%) of the link.
    t0 = trace[-1][0]
    _, sent = _simulate(trains, est, lambda t: rate, t0 + 60.0, t0)
    assert 0.01 < 8 * sent / (rate * 60.0) <= trains.share * 1.05


@pytest.mark.parametrize(("before", "after"), [(250e6, 24e6), (24e6, 250e6), (100e6, 0.5e6)])
def test_probe_trains_follow_a_step(before: float, after: float) -> None:
    trains, est = ProbeTrains(), BandwidthEstimator()
    trace, _ = _simulate(trains, est, lambda t: before, 5.0)
    assert est.bandwidth_bps == pytest.approx(before, rel=0.05)
    step = trace[-1][0] + 0.37
    trace, _ = _simulate(
        trains, est, lambda t: before if t < step else after, step + 5, step - 0.37
    )
    back = next(t for t, b in trace if t > step and abs(b / after - 1) <= 0.3)
    # A drop is seen by the next scout (every 0.3 s) and confirmed 0.1 s later; a rise
    # only by the next full train, which the budget spaces by about a second, and then
    # the larger trains it calls for.
    assert back - step < (1.0 if after < before else 2.5), trace
    assert est.bandwidth_bps == pytest.approx(after, rel=0.05)


def test_probe_trains_budget_and_reset() -> None:
    trains = ProbeTrains()
    est = BandwidthEstimator()
    assert trains.due(0.0, 10e6)
    trains.frames(10e6)
    trains.sent(0.0, 6_300, 4)
    trains.reset(0.5)
    assert not trains.in_flight and trains.scouting and trains.due(0.5, 10e6)
    # A train whose answers time nothing new leaves the plan consistent.
    trains.sent(0.5, 6_300, 4)
    rate, timed = trains.train_answered(0.6, est, [(6_300, 1.0)], 6_300, 10e6)
    assert not timed and rate > 10e6


def test_probe_trains_pause_full_trains_on_a_link_too_fast_to_time() -> None:
    # Loopback: every train passes at once. B climbs as a bound up to what the largest
    # train can tell, then only scouts go out (every 0.3 s) until the hold is over.
    trains, est = ProbeTrains(), BandwidthEstimator()
    trace, _ = _simulate(trains, est, lambda t: 1e12, 3.0)
    assert est.bandwidth_bps is not None and est.bandwidth_bps > 5e9
    t0 = trace[-1][0]
    trace, sent = _simulate(trains, est, lambda t: 1e12, t0 + 5.0, t0)
    assert len(trace) >= 14 and sent <= len(trace) * 34_000
    # …and a drop to 200 kbit/s shows within a few seconds, the scout being capped.
    step = trace[-1][0]
    trace, _ = _simulate(trains, est, lambda t: 0.2e6, step + 4.0, step)
    assert est.bandwidth_bps == pytest.approx(0.2e6, rel=0.05)
    assert next(t for t, b in trace if b < 0.26e6) - step < 2.5


def test_samples_say_how_many_uploads_they_hold() -> None:
    timer = UploadTimer()
    for i in range(4):
        sent = i * 1.0
        answer = sent + 1500 / RATE + L + HELD
        timer.answered(sent_at=sent, now=answer, nbytes=1500, server_s=HELD, latency_s=L)
    assert timer.sample_uploads == 3  # 4500 B: three uploads of 1500


def test_a_rise_the_uploads_suspect_is_looked_at_at_once() -> None:
    # After a drop to 0.2 Mbit/s and its confirmations, the budget is in debt for many
    # seconds at the low rate. The uploads then suspect the link rose (2 Mbit/s): a train
    # sized for that goes at once, whatever the debt, and finds the real rate (50 Mbit/s).
    trains, est = ProbeTrains(), BandwidthEstimator()
    trace, _ = _simulate(trains, est, lambda t: 0.2e6, 6.0)
    assert est.bandwidth_bps == pytest.approx(0.2e6, rel=0.05)
    t = trace[-1][0]
    trains.credit_s = -0.5  # the confirmations' debt: 16 s of budget at 3%
    assert trains.due_at(t, 0.2e6) > t + 10.0
    for i in range(3):
        est.observe_transfer(t, 4_200, 8 * 4_200 / (2e6 + i * 1e5))
    suspected = est.take_suspicion()
    assert suspected == pytest.approx(2e6)
    assert trains.look_now(t, suspected)
    assert trains.due(t, est.bandwidth_bps or 0.0)
    assert sum(trains.frames(est.bandwidth_bps or 0.0)) == 7_500  # 30 ms at 2 Mbit/s
    trace, _ = _simulate(trains, est, lambda t: 50e6, t + 3.0, t)
    assert est.bandwidth_bps == pytest.approx(50e6, rel=0.3)
    assert trace[0][0] < t + 0.2
    # A second suspicion within the gap waits for the budget like any train.
    assert not trains.look_now(t + 3.0, 0.1e6)
    # A rise that a train showed shrinks the debt too: 0.2 → 26 Mbit/s (the step trace's
    # rise to 50, half seen), 1.5 s of debt at 0.2 Mbit/s → 12 ms.
    shown = ProbeTrains()
    shown.due_at(0.0, 0.2e6)
    shown.credit_s = -1.5
    shown.answered(0.0, 26e6, timed=True, confirm=True)
    assert shown.credit_s == pytest.approx(-1.5 * 0.2 / 26, abs=0.001)
    # A B that did not rise beyond its jitter leaves the plan as it was.
    quiet = ProbeTrains()
    quiet.due_at(0.0, 1e6)
    quiet.next_at, quiet.credit_s = 5.0, -0.1
    assert quiet.due_at(0.1, 1.2e6) >= 5.0 and quiet.confirming == 0
    assert quiet.credit_s == pytest.approx(-0.1 + quiet.share * 0.1)  # repaid, not forgiven


def test_uplink_wait_is_a_fifo_draining_at_b() -> None:
    from spinn.runtime.uplink import uplink_wait_s

    # 10 kB at 1 Mbit/s: 80 ms each. Two written at 0 and 0.01: the link is free at 0.16.
    sent = [(0.01, 10_000), (0.0, 10_000)]
    assert uplink_wait_s(0.05, sent, 1e6) == pytest.approx(0.11)
    assert uplink_wait_s(0.2, sent, 1e6) == 0.0
    # A gap: the later upload starts when written.
    assert uplink_wait_s(1.0, [(0.0, 10_000), (0.95, 10_000)], 1e6) == pytest.approx(0.03)
    assert uplink_wait_s(1.0, [], 1e6) == 0.0
    assert uplink_wait_s(1.0, [(0.0, 10)], 0.0) == float("inf")


def test_a_confirming_round_after_a_drop_is_sized_for_the_new_rate() -> None:
    """Loopback at 100 Mbit/s drops to 0.2: the PINGs' silence already brought B down
    (0.24 Mbit/s) when the scout sent at the old rate comes back timed at 0.2. Its
    confirming round is sized for 0.2 Mbit/s (the smallest train), not for the rate an
    earlier round confirmed (100 Mbit/s: a 23 kB scout, a second of the link)."""
    trains, est = ProbeTrains(), BandwidthEstimator()
    est.observe_train(0.0, _arrivals(100e6, 375_000, 0.0), 375_000)
    trains.confirm_bps = 106e6  # left from a round at the old rate
    trains.due_at(0.0, 100e6)
    scout = sum(trains.frames(100e6))
    trains.sent(0.0, scout, 3)
    assert est.observe_silence(0.6, 14_771, 0.5) == pytest.approx(0.236e6, rel=0.01)
    rate, timed = trains.train_answered(1.2, est, _arrivals(0.2e6, scout, 0.1), scout, 10e6)
    assert timed and rate == pytest.approx(0.2e6, rel=0.1)
    assert trains.confirming == 1
    assert sum(trains.frames(est.bandwidth_bps or 0.0)) == trains.min_bytes
