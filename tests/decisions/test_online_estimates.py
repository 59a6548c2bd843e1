"""Tests for spinn.decisions.online_estimates: convergence, step tracking and outlier rejection on
synthetic measurement streams (time injected, no sleeping)."""

from __future__ import annotations

import random

import pytest

from spinn.decisions.offline_profile import synthetic_profile
from spinn.decisions.online_estimates import (
    EWMA,
    SILENCE_MIN_S,
    BandwidthEstimator,
    DeviceBusyEstimator,
    DeviceScaleEstimator,
    Estimates,
    LatencyEstimator,
    MedianOf3,
    OnlineEstimates,
    OnlineEstimatesConfig,
    OverheadEstimator,
    ServerTimeEstimator,
    train_dispersion,
)


def test_ewma_and_median() -> None:
    e = EWMA(0.5)
    assert e.update(10.0) == 10.0
    assert e.update(20.0) == 15.0
    with pytest.raises(ValueError, match="alpha"):
        EWMA(0.0)
    m = MedianOf3()
    assert [m.update(x) for x in (5.0, 100.0, 6.0, 7.0, 0.0)] == [5.0, 5.0, 6.0, 7.0, 6.0]


def _noisy(rng: random.Random, level: float, n: int, noise: float = 0.05) -> list[float]:
    return [level * rng.uniform(1 - noise, 1 + noise) for _ in range(n)]


def test_bandwidth_converges_tracks_step_ignores_outlier() -> None:
    rng = random.Random(1)
    est = BandwidthEstimator(window=8)
    now = 0.0
    nbytes = 100_000
    for bps in _noisy(rng, 40e6, 30):
        now += 0.1
        est.observe_transfer(now, nbytes, 8 * nbytes / bps)
    assert est.bandwidth_bps == pytest.approx(40e6, rel=0.05)
    # One transfer stalled by a retransmission (0.4 Mbit/s): the median filter hands the
    # EWMA a normal neighbour, so the estimate stays within the noise band (a bare EWMA
    # would drop by 30%).
    now += 0.1
    est.observe_transfer(now, nbytes, 8 * nbytes / 0.4e6)
    assert est.bandwidth_bps == pytest.approx(40e6, rel=0.05)
    # A real step 40 -> 6 Mbit/s is followed once the window has turned over.
    for bps in _noisy(rng, 6e6, 10):
        now += 0.1
        est.observe_transfer(now, nbytes, 8 * nbytes / bps)
    assert est.bandwidth_bps == pytest.approx(6e6, rel=0.06)
    # Delays the measurement could not subtract only ever lengthen a transfer: one sample
    # in three stretched by 3x leaves the estimate at the link rate.
    for i, bps in enumerate(_noisy(rng, 6e6, 30, noise=0.01)):
        now += 0.1
        stretch = 3.0 if i % 3 == 0 else 1.0
        est.observe_transfer(now, nbytes, stretch * 8 * nbytes / bps)
    assert est.bandwidth_bps == pytest.approx(6e6, rel=0.02)
    with pytest.raises(ValueError, match="window"):
        BandwidthEstimator(window=0)
    # Tiny transfers say nothing about the link rate.
    assert est.observe_transfer(now, 100, 1e-6) is None
    with pytest.raises(ValueError, match="transfer seconds"):
        est.observe_transfer(now, nbytes, -1.0)


def test_bandwidth_from_padded_pings() -> None:
    est = BandwidthEstimator()
    # 125 kB of padding adds 0.1 s over a bare 20 ms ping: 10 Mbit/s.
    for i in range(5):
        assert est.observe_probe(float(i), 125_000, 0.12, 0.02) == pytest.approx(10e6)
    assert est.bandwidth_bps == pytest.approx(10e6)
    assert est.observe_probe(6.0, 125_000, 0.02, 0.02) is None  # unresolvable
    # 16 KB through a shaper's burst at once: 0.26 ms more is jitter, not 500 Mbit/s.
    assert est.observe_probe(6.5, 16_384, 0.04026, 0.04) is None
    assert est.samples == 5
    assert est.bandwidth_bps == pytest.approx(10e6), "a timed sample outranks a floor"


def test_unresolved_probes_bound_bandwidth_from_below() -> None:
    # Loopback: no probe adds 2 ms, so none is timed, yet each says B >= 8n / 2 ms.
    est = BandwidthEstimator()
    assert est.bandwidth_bps is None
    assert est.observe_probe(0.0, 16_384, 0.0003, 0.0002) is None
    assert est.bandwidth_bps == pytest.approx(8 * 16_384 / 0.002)
    assert est.observe_probe(1.0, 4_096, 0.0003, 0.0002) is None
    assert est.bandwidth_bps == pytest.approx(8 * 16_384 / 0.002), "the largest floor holds"
    assert est.samples == 0
    prof = synthetic_profile(random.Random(7), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    op.observe_ping(0.0, 0.0002)
    op.observe_ping(0.5, 0.0003, probe_bytes=16_384)
    assert op.snapshot(1.0).bandwidth_bps == pytest.approx(8 * 16_384 / 0.002)


def test_latency_and_propagation() -> None:
    rng = random.Random(2)
    est = LatencyEstimator()
    assert est.latency_s is None
    for i, rtt in enumerate(_noisy(rng, 0.04, 25)):
        est.observe_rtt(float(i), rtt)
    assert est.latency_s == pytest.approx(0.04, rel=0.05)
    est.observe_rtt(30.0, 2.0)  # one lost-and-retransmitted ping
    assert est.latency_s == pytest.approx(0.04, rel=0.05)
    for i, rtt in enumerate(_noisy(rng, 0.001, 25)):
        est.observe_rtt(40.0 + i, rtt)
    assert est.latency_s == pytest.approx(0.001, rel=0.15)
    assert est.propagation_s is not None and est.propagation_s < 0.0011
    with pytest.raises(ValueError, match="rtt"):
        est.observe_rtt(1.0, float("nan"))


def test_propagation_is_the_minimum_recent_rtt() -> None:
    est = LatencyEstimator(window=4)
    assert est.propagation_s is None
    for i, rtt in enumerate((0.010, 0.030, 0.050, 0.020)):
        est.observe_rtt(float(i), rtt)
    assert est.propagation_s == 0.010
    est.observe_rtt(4.0, 0.040)  # 0.010 leaves the window
    assert est.propagation_s == 0.020
    with pytest.raises(ValueError, match="window"):
        LatencyEstimator(window=0)


def test_inferred_server_time_uses_propagation_not_the_noisy_average() -> None:
    """RTTs inflated by queueing in front of the PINGs push the EWMA of L above the
    propagation delay; the response time itself did not wait that long, so the inferred
    server time subtracts the minimum recent RTT and stays at the true compute time."""
    prof = synthetic_profile(random.Random(7), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    rng = random.Random(8)
    for i in range(16):
        op.observe_ping(float(i), 0.002 + rng.uniform(0.0, 0.02))
    assert op.snapshot(16.0).latency_s > 0.004
    assert op.propagation_s() == pytest.approx(0.002, abs=0.002)
    split, exit_index = 2, prof.num_exits - 1
    offline = prof.server_time_ms(split, prof.exit_stages[exit_index] + 1)
    bw = op.snapshot(16.0).bandwidth_bps
    for i in range(10):
        elapsed = op.propagation_s() + 2.0 * offline / 1e3 + 8.0 * (10_000 + 100) / bw
        op.observe_result(
            20.0 + i,
            split,
            exit_index,
            elapsed_s=elapsed,
            request_bytes=10_000,
            response_bytes=100,
        )
    assert op.server.scale == pytest.approx(2.0, rel=1e-6)


def test_device_scale() -> None:
    est = DeviceScaleEstimator()
    assert est.scale == 1.0
    rng = random.Random(3)
    for i, r in enumerate(_noisy(rng, 2.0, 20)):
        est.observe(float(i), 10.0 * r, 10.0)
    assert est.scale == pytest.approx(2.0, rel=0.05)
    est.observe(21.0, 500.0, 10.0)
    assert est.scale == pytest.approx(2.0, rel=0.05)
    assert est.observe(22.0, 5.0, 0.0) is None  # split 0 runs nothing on the device
    est.observe(23.0, 0.0, 10.0)
    assert est.scale > 0


def test_server_time_reported_and_inferred_agree() -> None:
    rng = random.Random(4)
    reported = ServerTimeEstimator()
    inferred = ServerTimeEstimator()
    lat, bw, req, resp = 0.03, 20e6, 50_000, 200
    for i in range(20):
        compute_ms = 6.0 * rng.uniform(0.95, 1.05)  # 3x the offline 2 ms
        elapsed = 8 * req / bw + lat + compute_ms / 1000 + 8 * resp / bw
        reported.observe_reported(float(i), compute_ms, 2.0)
        inferred.observe_inferred(float(i), elapsed, req, resp, 2.0, lat, bw)
    assert reported.scale == pytest.approx(3.0, rel=0.05)
    assert inferred.scale == pytest.approx(reported.scale, rel=1e-6)
    assert ServerTimeEstimator.infer_compute_ms(0.001, req, resp, lat, bw) == 0.0
    with pytest.raises(ValueError, match="bandwidth"):
        ServerTimeEstimator.infer_compute_ms(0.1, req, resp, lat, 0.0)


def test_online_profiler_snapshot() -> None:
    prof = synthetic_profile(random.Random(5), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof, OnlineEstimatesConfig(initial_bandwidth_bps=1e6))
    snap = op.snapshot(0.0)
    assert snap == Estimates(1e6, 0.02, 1.0, 1.0, 0.0, True, 0.0)
    for i in range(10):
        op.observe_ping(float(i), 0.01)
        op.observe_ping(float(i), 0.01 + 8 * 50_000 / 5e6, probe_bytes=50_000)
        op.observe_upload(float(i), 100_000, 8 * 100_000 / 5e6)
        op.observe_device(float(i), 3, 1.5 * prof.device_time_ms(3))
        op.observe_result(float(i), 2, prof.num_exits - 1, compute_ms=2 * prof.server_time_ms(2))
        # Answered on the device at exit 1: 2 ms more than the scaled compute.
        stages = prof.exit_stages[1] + 1
        op.observe_answer(float(i), 1, 1.5 * prof.device_time_ms(stages) + 2.0)
    op.observe_queue(10.0, 3)
    snap = op.snapshot(10.0)
    assert snap.bandwidth_bps == pytest.approx(5e6, rel=1e-6)
    assert snap.latency_s == pytest.approx(0.01)
    assert snap.device_scale == pytest.approx(1.5)
    assert snap.server_scale == pytest.approx(2.0)
    assert snap.server_queue == 3
    assert snap.frame_overhead_ms == pytest.approx(2.0)
    # Stages after the split (the local race) keep SF measured at split 0.
    for i in range(10):
        op.observe_device(11.0 + i, 5, 3.0 * (prof.device_time_ms(5) - prof.device_time_ms(2)), 2)
    assert op.snapshot(21.0).device_scale == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match="stage range"):
        op.observe_device(22.0, 2, 1.0, start=3)
    op.mark_server(11.0, False)
    assert not op.snapshot(11.0).server_up
    with pytest.raises(ValueError, match="before split"):
        op.observe_result(12.0, 5, 0, compute_ms=1.0)
    with pytest.raises(ValueError, match="compute_ms or elapsed_s"):
        op.observe_result(12.0, 0, 0)
    with pytest.raises(ValueError, match="exit index 9"):
        op.observe_answer(12.0, 9, 5.0)


def test_estimates_validation() -> None:
    with pytest.raises(ValueError, match="bandwidth_bps"):
        Estimates(bandwidth_bps=float("nan"), latency_s=0.01)
    with pytest.raises(ValueError, match="server_queue"):
        Estimates(bandwidth_bps=1e6, latency_s=0.01, server_queue=-1)


def test_overhead_from_uploads_stands_in_until_the_device_answers() -> None:
    """A stream the server answers alone has no local answers to measure O from: the
    time from arrival to upload beyond the stages before the split stands in, until the
    device answers an input itself."""
    prof = synthetic_profile(random.Random(5), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    for i in range(10):
        op.observe_offload(float(i), 2, prof.device_time_ms(2) + 1.5)  # SF = 1
    assert op.snapshot(10.0).frame_overhead_ms == pytest.approx(1.5)
    stages = prof.exit_stages[0] + 1
    op.observe_answer(11.0, 0, prof.device_time_ms(stages) + 0.4)
    assert op.snapshot(11.0).frame_overhead_ms == pytest.approx(0.4)
    with pytest.raises(ValueError, match="split 9"):
        op.observe_offload(12.0, 9, 1.0)


def test_overhead_estimator() -> None:
    est = OverheadEstimator()
    assert est.overhead_ms == 0.0
    rng = random.Random(6)
    for i in range(20):
        est.observe(float(i), 10.0 + rng.uniform(2.8, 3.2), 10.0)
    assert est.overhead_ms == pytest.approx(3.0, rel=0.05)
    est.observe(21.0, 200.0, 10.0)  # one frame stuck behind a GC pause
    assert est.overhead_ms == pytest.approx(3.0, rel=0.05)
    assert est.observe(22.0, 5.0, 10.0) == 0.0  # faster than profiled: no negative overhead


def test_device_busy_is_a_mean_over_recent_calls() -> None:
    """Throughput follows the mean busy time, so a slow call counts in full (unlike SF's
    median filter) and old calls leave the window."""
    est = DeviceBusyEstimator(window=4)
    assert est.scale is None and est.head_overhead_ms is None
    assert est.step_overhead_ms == 0.0 and est.upload_busy_ms == 0.0
    # Head calls: 2 ms offline run in 3 ms, busy 4 ms in all with 0.25 ms of packing.
    for i in range(4):
        est.observe_call(float(i), head=True, call_ms=4.0, stages_ms=3.0, offline_ms=2.0,
                         pack_ms=0.25)  # fmt: skip
    assert est.scale == pytest.approx(1.5)
    assert est.head_overhead_ms == pytest.approx(0.75)
    # One call slowed 5x by contention moves the mean by its share, not by nothing.
    est.observe_call(4.0, head=True, call_ms=16.0, stages_ms=15.0, offline_ms=2.0)
    assert est.scale == pytest.approx((3 * 3.0 + 15.0) / (4 * 2.0))
    assert est.head_overhead_ms == pytest.approx((3 * 0.75 + 1.0) / 4)
    # Steps are kept apart from heads; a call faster than its stages has no overhead.
    est.observe_call(5.0, head=False, call_ms=0.5, stages_ms=0.6, offline_ms=0.5)
    assert est.step_overhead_ms == 0.0
    est.observe_call(6.0, head=False, call_ms=0.9, stages_ms=0.6, offline_ms=0.5)
    assert est.step_overhead_ms == pytest.approx(0.15)
    assert est.head_overhead_ms == pytest.approx((3 * 0.75 + 1.0) / 4)
    est.observe_upload_work(7.0, 0.2)
    est.observe_upload_work(8.0, 0.4)
    assert est.upload_busy_ms == pytest.approx(0.3)
    # An empty stage range (split 0's head) has no offline time: no scale sample.
    before = est.scale
    est.observe_call(9.0, head=True, call_ms=1.0, stages_ms=0.01, offline_ms=0.0)
    assert est.scale == before
    with pytest.raises(ValueError, match="device call ms"):
        est.observe_call(10.0, head=True, call_ms=-1.0, stages_ms=0.0, offline_ms=1.0)
    with pytest.raises(ValueError, match="upload busy ms"):
        est.observe_upload_work(10.0, float("inf"))
    with pytest.raises(ValueError, match="window"):
        DeviceBusyEstimator(window=0)


def test_online_profiler_device_busy() -> None:
    prof = synthetic_profile(random.Random(7), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    snap = op.snapshot(0.0)
    assert snap.busy_scale is None and snap.head_overhead_ms is None
    for i in range(10):
        real = 2.0 * prof.device_time_ms(3)
        op.observe_call(float(i), head=True, call_ms=real + 0.5, stages_ms=real, stages=3)
        step = 2.0 * (prof.device_time_ms(5) - prof.device_time_ms(4))
        op.observe_call(float(i), head=False, call_ms=step + 0.1, stages_ms=step, stages=5,
                        start=4)  # fmt: skip
        op.observe_upload_work(float(i), 0.3)
    snap = op.snapshot(10.0)
    assert snap.busy_scale == pytest.approx(2.0)
    assert snap.head_overhead_ms == pytest.approx(0.5)
    assert snap.step_overhead_ms == pytest.approx(0.1)
    assert snap.upload_busy_ms == pytest.approx(0.3)
    assert snap.device_scale == 1.0  # SF is fed by observe_device only
    with pytest.raises(ValueError, match="stage range"):
        op.observe_call(11.0, head=False, call_ms=1.0, stages_ms=1.0, stages=2, start=3)
    with pytest.raises(ValueError, match="stage range"):
        op.observe_call(11.0, head=True, call_ms=1.0, stages_ms=1.0, stages=7)
    with pytest.raises(ValueError, match="busy_scale"):
        Estimates(bandwidth_bps=1e6, latency_s=0.01, busy_scale=0.0)
    with pytest.raises(ValueError, match="head_overhead_ms"):
        Estimates(bandwidth_bps=1e6, latency_s=0.01, head_overhead_ms=float("nan"))
    with pytest.raises(ValueError, match="upload_busy_ms"):
        Estimates(bandwidth_bps=1e6, latency_s=0.01, upload_busy_ms=-1.0)


def test_latency_is_the_lower_quartile_of_five() -> None:
    """Round trips err upwards only (event loops, bytes queued ahead): three delayed ones
    in five leave L at the path's round trip; a drop of the path's delay shows after two
    round trips, a rise after four."""
    est = LatencyEstimator()
    est.observe_rtt(0.0, 0.060)  # a connection's slow first PING
    est.observe_rtt(0.1, 0.020)
    assert est.latency_s == pytest.approx(0.020)
    for i, rtt in enumerate((0.145, 0.021, 0.090, 0.150, 0.020)):
        est.observe_rtt(1.0 + i, rtt)  # queued behind uploads three times in five
    assert est.latency_s == pytest.approx(0.0205, abs=0.0006)
    for i in range(5):
        est.observe_rtt(5.0 + i, 0.021)
    for i in range(3):
        est.observe_rtt(10.0 + i, 0.040)
    assert est.latency_s == pytest.approx(0.021, abs=0.001), "not after three"
    est.observe_rtt(13.0, 0.040)
    assert est.latency_s == pytest.approx(0.040)
    est.observe_rtt(14.0, 0.001)  # a round trip read too fast (a clock step) is ignored
    assert est.latency_s == pytest.approx(0.040)


def _train(
    rate_bps: float,
    nbytes: int,
    *,
    burst: int,
    chunk: int,
    t0: float = 0.0,
    late: dict[int, float] | None = None,
) -> list[tuple[int, float]]:
    """Arrivals of a train of ``nbytes`` through a token bucket of ``rate_bps`` that lets
    ``burst`` bytes through at once and releases ``chunk`` bytes at a time; one point per
    read, the server reading read ``i`` ``late[i]`` s late."""
    out, off, t = [], min(burst, nbytes), t0
    out.append((off, t + (late or {}).get(0, 0.0)))
    while off < nbytes:
        n = min(chunk, nbytes - off)
        off += n
        t += 8 * n / rate_bps
        out.append((off, t + (late or {}).get(len(out), 0.0)))
    return out  # fmt: skip


def test_train_dispersion_times_the_train_after_its_burst() -> None:
    # 24 Mbit/s with netshape's 5 ms burst: 15 kB at once, then 15 kB chunks at the rate.
    arrivals = _train(24e6, 90_000, burst=15_000, chunk=15_000)
    nbytes, seconds = train_dispersion(arrivals, 90_000)
    assert nbytes == 60_000
    assert 8 * nbytes / seconds == pytest.approx(24e6, rel=1e-6)
    # Timed from the first read, the burst's bytes would read 20% fast.
    first = 8 * (90_000 - arrivals[0][0]) / (arrivals[-1][1] - arrivals[0][1])
    assert first == pytest.approx(24e6)  # here the burst is one chunk: no harm
    big_burst = _train(24e6, 90_000, burst=30_000, chunk=15_000)
    first = 8 * (90_000 - 15_000) / (big_burst[-1][1] - big_burst[0][1])
    assert first > 1.2 * 24e6
    assert 8 * (r := train_dispersion(big_burst, 90_000))[0] / r[1] == pytest.approx(24e6)
    # Offsets in any origin: the server's count of bytes read since the connection began.
    shifted = [(off + 1_234_567, t + 50.0) for off, t in arrivals]
    assert train_dispersion(shifted, 90_000) == (nbytes, pytest.approx(seconds))


def test_train_dispersion_fits_a_slope_through_a_late_read() -> None:
    # The server read the cut's chunk 4 ms late (a loaded host): the end points alone
    # would read the rate 2x fast; the fitted slope stays within 30%.
    arrivals = _train(24e6, 150_000, burst=15_000, chunk=15_000, late={3: 0.004})
    nbytes, seconds = train_dispersion(arrivals, 150_000)
    cut = next(p for p in arrivals if 3 * (150_000 - p[0]) <= 2 * 150_000)
    ends = 8 * (150_000 - cut[0]) / (arrivals[-1][1] - cut[1])
    assert 8 * nbytes / seconds == pytest.approx(24e6, rel=0.3)
    assert abs(8 * nbytes / seconds - 24e6) < abs(ends - 24e6)


def test_train_dispersion_edge_cases() -> None:
    # All in one read: faster than the train can tell, (bytes, 0).
    assert train_dispersion([(5_000, 1.0), (10_000, 1.0)], 10_000) == (5_000, 0.0)
    assert train_dispersion([(10_000, 1.0)] * 4, 10_000) == (6_666, 0.0)
    assert train_dispersion([], 10_000) is None
    # A clock that stepped back mid-train: no spread, never a negative one.
    assert train_dispersion([(2_000, 1.0), (6_000, 1.0), (10_000, 0.5)], 10_000)[1] == 0.0
    with pytest.raises(ValueError, match="decrease"):
        train_dispersion([(6_000, 1.0), (5_000, 1.1)], 10_000)
    with pytest.raises(ValueError, match="train arrival time"):
        train_dispersion([(6_000, float("nan"))], 10_000)
    assert BandwidthEstimator.train_sample([(5_000, 1.0), (10_000, 1.0)], 10_000) == (
        pytest.approx(8 * 5_000 / 0.002),
        False,
    )
    rate, timed = BandwidthEstimator.train_sample(
        _train(1e6, 12_000, burst=1500, chunk=1500), 12_000
    )
    assert timed and rate == pytest.approx(1e6)


def test_bandwidth_from_trains_median_steps_and_bounds() -> None:
    est = BandwidthEstimator()
    t = 0.0

    def feed(rate: float, nbytes: int, **kw: object) -> float | None:
        nonlocal t
        t += 1.0
        burst = max(1500, int(rate * 0.005 / 8))
        return est.observe_train(t, _train(rate, nbytes, burst=burst, chunk=burst, **kw), nbytes)

    # From the prior (10 Mbit/s: a 37.5 kB train) on a 500 Mbit/s link: the train passes
    # within the shaper's burst, a bound (7.5 MB/s) that grows the next train.
    assert feed(500e6, 37_500) == pytest.approx(8 * 25_000 / 0.002)
    assert est.needs_confirmation and est.train_samples == 1
    feed(500e6, 300_000)  # still a bound, larger
    assert est.bandwidth_bps == pytest.approx(0.5 * (100e6 + 8 * 200_000 / 0.002))
    feed(500e6, 1_900_000)  # timed: the bounds below it go
    assert est.bandwidth_bps == pytest.approx(500e6, rel=1e-6)
    for _ in range(4):
        feed(500e6, 1_900_000)
    assert not est.needs_confirmation
    # One outlier (a server read late: 40% slow) is outvoted by the median.
    feed(300e6, 1_900_000)
    assert est.needs_confirmation
    assert est.bandwidth_bps == pytest.approx(500e6, rel=1e-6)
    # A fourth is not believed at once…
    feed(120e6, 1_900_000)
    assert est.bandwidth_bps == pytest.approx(500e6, rel=1e-6)
    feed(500e6, 1_900_000)
    # …a collapse (a tenth) is: a link taken for faster than it is fills with uploads.
    # Had it been a stall, the next two trains restore B.
    feed(50e6, 1_900_000)
    assert est.bandwidth_bps == pytest.approx(50e6, rel=1e-6) and est.needs_confirmation
    feed(500e6, 1_900_000)
    feed(500e6, 1_900_000)
    assert est.bandwidth_bps == pytest.approx(500e6, rel=1e-6)
    # A step: the second train that agrees with it replaces the older ones.
    feed(500e6, 1_900_000)
    feed(200e6, 750_000)
    assert est.bandwidth_bps == pytest.approx(500e6, rel=1e-6)
    feed(220e6, 750_000)
    assert est.bandwidth_bps == pytest.approx(210e6, rel=0.01)
    # Trains outrank uploads: a 3 Mbit/s upload sample does not move B.
    est.observe_transfer(t, 100_000, 8 * 100_000 / 3e6)
    assert est.bandwidth_bps == pytest.approx(210e6, rel=0.01)
    with pytest.raises(ValueError, match="train window"):
        BandwidthEstimator(train_window=0)


def test_online_profiler_feeds_trains() -> None:
    prof = synthetic_profile(random.Random(7), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    assert op.snapshot(0.0).bandwidth_bps == OnlineEstimatesConfig().initial_bandwidth_bps
    op.bandwidth.observe_train(1.0, _train(5e6, 20_000, burst=3_125, chunk=3_125), 20_000)
    assert op.snapshot(1.0).bandwidth_bps == pytest.approx(5e6)


def test_long_slow_uploads_suspect_a_collapse() -> None:
    """After loopback dropped to 200 kbit/s, uploads sent at the old rate flood the link:
    three uploads in a row that took long and read an eighth of B or less suspect a
    collapse (a train should look at once), and B waits for it. Short ones, which read the
    per-request cost on any fast link (10-65 Mbit/s on loopback), never do."""
    est = BandwidthEstimator()
    est.observe_train(0.0, [(100_000, 0.0), (2_000_000, 0.004)], 2_100_000)
    fast = est.bandwidth_bps
    assert fast is not None and fast > 1e9
    for i in range(10):
        est.observe_transfer(1.0 + i, 4_200, 0.0008)  # 42 Mbit/s: a per-request cost
    assert est.bandwidth_bps == fast
    for i in range(3):
        est.observe_transfer(10.0 + i, 4_200, 0.025)  # answers read late: too short to tell
        est.observe_transfer(11.0 + i, 4_200, 0.12, uploads=8)  # eight answers' delays
    assert est.bandwidth_bps == fast
    assert est.take_suspicion() is None
    est.observe_transfer(20.0, 4_200, 0.17)  # long ones: not yet
    est.observe_transfer(20.1, 4_200, 1.7)
    assert est.take_suspicion() is None
    est.observe_transfer(20.2, 4_200, 0.168)  # three: the fastest of them is suspected
    assert est.take_suspicion() == pytest.approx(8 * 4_200 / 0.168)
    assert est.take_suspicion() is None  # once
    assert est.bandwidth_bps == fast


def test_a_silent_ping_behind_bytes_bounds_a_collapsed_link() -> None:
    """A PING still unanswered 0.5 s after it was written behind 60 kB: the link delivered
    less than that, so it is under 0.96 Mbit/s. Far below B (3 Gbit/s), the bound replaces
    it and asks the trains to confirm; near B, or with too few bytes ahead to tell a slow
    link from a slow answer, it changes nothing."""
    est = BandwidthEstimator()
    assert est.observe_silence(0.0, 60_000, 0.5) is None  # nothing to bound yet
    est.observe_train(0.0, [(100_000, 0.0), (2_000_000, 0.006)], 2_100_000)
    fast = est.bandwidth_bps
    assert fast is not None and fast > 2e9
    est.needs_confirmation = False
    assert est.observe_silence(1.0, 2_000, 5.0) is None  # a bare PING answered late
    assert est.observe_silence(1.0, 60_000_000, 0.5) is None  # within 8× of B
    assert est.bandwidth_bps == fast and not est.needs_confirmation
    assert est.observe_silence(1.0, 60_000, 0.5) == pytest.approx(0.96e6)
    assert est.bandwidth_bps == pytest.approx(0.96e6) and est.needs_confirmation
    # A longer silence says nothing more until a train has spoken…
    assert est.observe_silence(9.0, 60_000, 5.0) is None
    est.observe_train(10.0, [(0, 0.0), (2_000, 0.016), (4_000, 0.032), (6_000, 0.048)], 6_000)
    assert est.bandwidth_bps == pytest.approx(1e6, rel=0.05)
    # …and then bounds it lower only where it is 8× lower again.
    assert est.observe_silence(11.0, 60_000, 1.0) is None
    assert est.observe_silence(19.0, 60_000, 5.0) == pytest.approx(96e3)


def test_silence_counts_after_the_round_trip_and_the_slowest_recent_ping() -> None:
    """``OnlineEstimates.observe_silence`` waits ``SILENCE_MIN_S`` past the propagation
    delay, or four times the slowest recent bare round trip when the server answers late
    anyway (a loaded server's event loop is not a slow link)."""
    prof = synthetic_profile(random.Random(7), num_stages=6, num_exits=3, num_thresholds=5)
    op = OnlineEstimates(prof)
    op.bandwidth.observe_train(0.0, [(100_000, 0.0), (2_000_000, 0.006)], 2_100_000)
    fast = op.bandwidth_bps()
    op.observe_ping(0.0, 0.1)
    assert op.silence_floor_s() == SILENCE_MIN_S
    assert op.observe_silence(1.0, [(60_000, 0.1 + SILENCE_MIN_S - 0.01)]) is None
    assert op.bandwidth_bps() == fast
    op.observe_ping(1.0, 0.2)  # the slowest recent PING: 0.2 s, the floor 0.8 s
    assert op.silence_floor_s() == pytest.approx(0.8)
    assert op.observe_silence(1.0, [(60_000, 0.1 + 0.7)]) is None
    # Of several PINGs past the floor, the lowest bound counts: the oldest had 2 kB ahead
    # (too few to tell), the next 60 kB, the youngest is not silent long enough.
    waits = [(2_000, 1.5), (60_000, 0.1 + 0.9), (90_000, 0.5)]
    assert op.observe_silence(1.0, waits) == pytest.approx(8 * 60_000 / 0.9)
    assert op.bandwidth_bps() == pytest.approx(8 * 60_000 / 0.9)


def test_fast_uploads_suspect_a_rise_the_rare_trains_would_see_late() -> None:
    """After a drop to 0.2 Mbit/s the trains are small and rare (a share of the link at
    B); when the link rises to 50 Mbit/s, the uploads that keep going out read far above
    B: three in a row suspect a rise to the slowest of them (an upload errs slow), for a
    train to look at once; B waits for it. Fewer, or a streak broken by a slow one,
    suspect nothing."""
    est = BandwidthEstimator()
    est.observe_train(0.0, [(0, 0.0), (2_000, 0.05), (4_000, 0.1), (6_000, 0.15)], 6_000)
    low = est.bandwidth_bps
    assert low == pytest.approx(8 * 4_000 / 0.1)  # 0.32 Mbit/s, timed
    est.needs_confirmation = False
    est.observe_transfer(1.0, 4_200, 8 * 4_200 / 3e6)  # 3 Mbit/s: ×9
    est.observe_transfer(1.1, 4_200, 8 * 4_200 / 4e6)
    est.observe_transfer(1.2, 4_200, 8 * 4_200 / 0.5e6)  # the streak is broken
    est.observe_transfer(1.3, 4_200, 8 * 4_200 / 5e6)
    est.observe_transfer(1.4, 4_200, 8 * 4_200 / 6e6)
    assert est.take_suspicion() is None
    est.observe_transfer(1.5, 4_200, 8 * 4_200 / 2e6)  # three in a row: the slowest, 2
    assert est.take_suspicion() == pytest.approx(2e6)
    assert est.bandwidth_bps == low and not est.needs_confirmation
    # Uploads near B (their per-request cost reads a little slow) suspect nothing.
    for i in range(10):
        est.observe_transfer(2.0 + i, 4_200, 8 * 4_200 / 0.25e6)
    assert est.take_suspicion() is None
