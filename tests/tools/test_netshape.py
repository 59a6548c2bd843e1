"""Pure parts of netshape: parsing, configuration, link model, outages, traces, CLI parsing.

No sockets and no sleeps: time is passed in as ``now`` and randomness is a seeded Random.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.netshape import gentrace
from tools.netshape.__main__ import build_parser, config_from_args
from tools.netshape.config import (
    DirectionConfig,
    OutageSpec,
    ShapeConfig,
    coerce_direction_fields,
    parse_outage_spec,
)
from tools.netshape.model import (
    LinkSchedule,
    OutagePlan,
    OutageSchedule,
    RateMeter,
    TokenBucket,
    slice_sizes,
)
from tools.netshape.trace import Trace, TracePoint, format_trace, load_trace
from tools.netshape.units import (
    format_duration,
    format_rate,
    parse_address,
    parse_duration,
    parse_probability,
    parse_rate,
    parse_size,
)

TRACES = Path(__file__).resolve().parents[2] / "tools" / "netshape" / "traces"

# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("5mbit", 5e6),
        ("500kbit", 5e5),
        ("1gbit", 1e9),
        ("100kbps", 8e5),  # tc: kbps is kilobytes per second
        ("2.5Mbit", 2.5e6),
        ("1200", 1200.0),
        ("64bit", 64.0),
        ("1mbps", 8e6),
    ],
)
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text", ["unlimited", "none", "inf", "0", "0mbit", None])
def test_parse_rate_unlimited(text: str | None) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [("5 parsecs", "unknown unit 'parsecs'"), ("fast", "bad rate 'fast'"), ("-3mbit", "bad rate")],
)
def test_parse_rate_errors_name_the_value(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("40ms", 0.04), ("5s", 5.0), ("100us", 1e-4), ("2m", 120.0), ("1.5", 1.5), (0.25, 0.25)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5 fortnights", "soon", "-1s", float("nan")])
def test_parse_duration_errors(text: str | float) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_parse_size_probability_address() -> None:
    assert parse_size("64kib") == 65536
    assert parse_size("1mb") == 1_000_000
    assert parse_size("1500") == 1500
    with pytest.raises(ValueError, match="whole number"):
        parse_size("1.5")
    with pytest.raises(ValueError, match="unknown unit 'furlongs'"):
        parse_size("3furlongs")
    assert parse_probability("5%") == pytest.approx(0.05)
    assert parse_probability("0.2") == 0.2
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        parse_probability("1.5")
    assert parse_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("localhost", "host:http", "h:70000", ":80", "[::1:80", "::1:80", "[]:80"):
        with pytest.raises(ValueError, match="bad address"):
            parse_address(bad)


@given(st.floats(min_value=1.0, max_value=1e11, allow_nan=False))
def test_format_rate_round_trips(bps: float) -> None:
    assert parse_rate(format_rate(bps)) == pytest.approx(bps, rel=1e-5)


@given(st.floats(min_value=0.0, max_value=1e5, allow_nan=False))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-5, abs=1e-12)


# -- configuration -------------------------------------------------------------------------


def test_direction_config_errors_name_the_field() -> None:
    for kwargs, field in [
        ({"rate_bps": -1.0}, "rate_bps"),
        ({"delay_s": -0.1}, "delay_s"),
        ({"loss": 1.5}, "loss"),
        ({"slice_bytes": 10, "slice_variation": 10}, "slice_variation"),
        ({"ge_p": 0.1, "ge_r": 0.0}, "ge_r"),
        ({"limit_bytes": -1}, "limit_bytes"),
    ]:
        with pytest.raises(ValueError, match=field):
            DirectionConfig(**kwargs)  # type: ignore[arg-type]


def test_every_direction_field_can_be_set_from_text() -> None:
    names = {f.name for f in dataclasses.fields(DirectionConfig)}
    samples = {
        "rate_bps": "5mbit",
        "burst_bytes": "16kib",
        "delay_s": "40ms",
        "jitter_s": "5ms",
        "loss": "1%",
        "ge_p": "0.01",
        "ge_r": "0.5",
        "ge_loss_bad": "0.5",
        "mss_bytes": "1460",
        "rto_min_s": "100ms",
        "stall_s": "300ms",
        "slice_bytes": "100",
        "slice_variation": "10",
        "slice_delay_s": "1ms",
        "limit_bytes": "1mb",
        "slow_close_s": "1s",
    }
    assert set(samples) == names
    cfg = DirectionConfig(**coerce_direction_fields(samples))
    assert cfg.rate_bps == 5e6 and cfg.delay_s == pytest.approx(0.04)
    assert cfg.limit_bytes == 1_000_000 and cfg.loss == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown direction setting 'bandwidth'"):
        coerce_direction_fields({"bandwidth": "5mbit"})
    with pytest.raises(ValueError, match="rate_bps: bad rate"):
        coerce_direction_fields({"rate_bps": "lots"})


def test_stall_follows_the_rto_rule() -> None:
    assert DirectionConfig().effective_stall == pytest.approx(0.2)
    assert DirectionConfig(delay_s=0.15, jitter_s=0.01).effective_stall == pytest.approx(0.34)
    assert DirectionConfig(delay_s=0.5, stall_s=0.05).effective_stall == pytest.approx(0.05)


def test_burst_scales_with_rate_and_has_a_floor() -> None:
    assert DirectionConfig(rate_bps=100e3).effective_burst == 1500
    assert DirectionConfig(rate_bps=200e6).effective_burst == 125_000
    assert DirectionConfig(rate_bps=1e6, burst_bytes=4000).effective_burst == 4000


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("5s@20s", OutageSpec("blackhole", 5.0, 20.0)),
        ("reset:2s@10s/30s", OutageSpec("reset", 2.0, 10.0, 30.0)),
        ("refuse:3s@0s/10s,p=0.2", OutageSpec("refuse", 3.0, 0.0, 10.0, 0.2)),
        ("BLACKHOLE:500ms@1s", OutageSpec("blackhole", 0.5, 1.0)),
    ],
)
def test_parse_outage_spec(text: str, spec: OutageSpec) -> None:
    assert parse_outage_spec(text) == spec


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("5s", "expected"),
        ("flood:5s@1s", "unknown mode 'flood'"),
        ("5s@1s/2s", "period_s"),
        ("5s@1s/20s,p=2", "must lie in"),
        ("5x@1s", "bad duration"),
    ],
)
def test_parse_outage_spec_errors(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_outage_spec(text)


# -- token bucket --------------------------------------------------------------------------


def test_token_bucket_long_run_rate_survives_late_wakeups() -> None:
    """Sleeps that end late (as timers do on a busy machine) must not lower the long-run rate."""
    rate, chunk = 125_000.0, 1500  # 1 Mbit/s; the 1500-byte burst is 12 ms of rate
    bucket = TokenBucket(rate, burst_bytes=chunk, now=0.0)
    rng = random.Random(1)
    now, sent = 0.0, 0
    while now < 20.0:
        bucket.take(chunk, now, backlogged=sent > 0)
        sent += chunk
        ready = bucket.ready_at(now)
        if ready > now:  # a sleep, which ends up to 30 ms late
            now = ready + rng.uniform(0.0, 0.03)
    # Bytes paid for by time now: the initial burst plus rate * now, less at most one wake's
    # lateness still owed at the end.
    assert rate * now - 0.03 * rate <= sent - chunk <= rate * now + chunk


def test_token_bucket_idle_credit_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(1000.0, burst_bytes=100, now=0.0, catchup_s=0.5)
    bucket.take(100, 0.0)
    assert bucket.tokens(10.0) == pytest.approx(100.0)
    ticket = bucket.take(400, 10.0)  # idle: only the burst is free
    assert bucket.ready_at(10.0, ticket) == pytest.approx(10.3)
    ticket = bucket.take(400, 11.0, backlogged=True)  # busy: up to 0.5 s of catch-up credit
    assert bucket.ready_at(11.0, ticket) == pytest.approx(11.0)
    assert bucket.tokens(11.0) == pytest.approx(100.0)  # 500 of catch-up - 400 taken


def test_token_bucket_tickets_serve_sharers_in_order() -> None:
    bucket = TokenBucket(1000.0, burst_bytes=100, now=0.0)
    first = bucket.take(100, 0.0)  # paid by the burst
    second = bucket.take(500, 0.0)
    third = bucket.take(500, 0.0)  # another connection, after the second
    assert bucket.ready_at(0.0, first) == 0.0
    assert bucket.ready_at(0.0, second) == pytest.approx(0.5)  # not held for the third
    assert bucket.ready_at(0.0, third) == pytest.approx(1.0)
    assert bucket.ready_at(0.0) == pytest.approx(1.0)
    bucket.configure(2000.0, 100, now=0.25)  # 250 of 1000 owed bytes paid; 750 at 2000 B/s
    assert bucket.ready_at(0.25, second) == pytest.approx(0.375)
    assert bucket.ready_at(0.25, third) == pytest.approx(0.625)


def test_token_bucket_debt_burst_and_live_change() -> None:
    bucket = TokenBucket(1000.0, burst_bytes=500, now=0.0)
    assert bucket.ready_at(0.0) == 0.0
    bucket.take(1500, 0.0)  # 1000 bytes of debt
    assert bucket.ready_at(0.0) == pytest.approx(1.0)
    assert bucket.tokens(0.5) == pytest.approx(-500.0)
    bucket.configure(5000.0, 500, now=0.5)  # debt is kept, paid at the new rate
    assert bucket.ready_at(0.5) == pytest.approx(0.6)
    assert bucket.tokens(100.0) == pytest.approx(500.0)  # idle: capped at the burst
    with pytest.raises(ValueError):
        TokenBucket(0.0, 10, 0.0)


# -- delay, jitter, loss -------------------------------------------------------------------


def test_delay_counts_from_each_chunk_arrival() -> None:
    link = LinkSchedule(random.Random(0))
    cfg = DirectionConfig(delay_s=0.05)
    dues = [link.fate(100, k * 0.001, cfg).due for k in range(100)]
    # 100 chunks 1 ms apart leave 1 ms apart, 50 ms after each arrival: no pile-up.
    assert dues == pytest.approx([k * 0.001 + 0.05 for k in range(100)])


def test_jitter_is_seeded_bounded_and_never_reorders() -> None:
    cfg = DirectionConfig(delay_s=0.02, jitter_s=0.01)

    def pattern(seed: int) -> list[float]:
        link = LinkSchedule(random.Random(seed))
        return [link.fate(100, k * 0.005, cfg).due - k * 0.005 for k in range(400)]

    a, b, c = pattern(7), pattern(7), pattern(8)
    assert a == b and a != c
    dues = [d + k * 0.005 for k, d in enumerate(a)]
    assert dues == sorted(dues)
    # Raw draws lie in [10, 30] ms; keeping order can only hold a chunk longer.
    assert min(a) >= 0.01 - 1e-12 and max(a) <= 0.03 + 1e-12
    assert statistics.pstdev(a) > 0.004  # the jitter is really applied


def test_loss_rate_matches_the_segment_model_and_stalls_by_the_rto() -> None:
    cfg = DirectionConfig(loss=0.01, delay_s=0.01)
    link = LinkSchedule(random.Random(3))
    n, chunk = 20_000, 4 * 1448
    fates = [link.fate(chunk, k * 1.0, cfg) for k in range(n)]  # far apart: no HOL coupling
    share = sum(f.lost for f in fates) / n
    expected = 1 - 0.99**4
    assert share == pytest.approx(expected, rel=0.1)
    for k, f in enumerate(fates[:200]):
        assert f.due - k == pytest.approx(0.01 + (0.2 if f.lost else 0.0))
        assert f.resume_at - k == pytest.approx(0.2 if f.lost else 0.0)


def test_a_stall_holds_the_chunks_behind_it() -> None:
    cfg = DirectionConfig(loss=1.0, stall_s=0.3)
    link = LinkSchedule(random.Random(0))
    first = link.fate(10, 0.0, cfg)
    second = link.fate(10, 0.01, dataclasses.replace(cfg, loss=0.0))
    assert first.lost and first.due == pytest.approx(0.3)
    assert not second.lost and second.due == pytest.approx(0.3)


def test_gilbert_elliott_losses_come_in_bursts() -> None:
    cfg = DirectionConfig(loss=0.0, ge_p=0.01, ge_r=0.2, ge_loss_bad=0.8, mss_bytes=100)
    link = LinkSchedule(random.Random(11))
    lost = [link.fate(100, k * 1.0, cfg).lost for k in range(50_000)]
    p_loss = sum(lost) / len(lost)
    after_loss = [b for a, b in zip(lost, lost[1:], strict=False) if a]
    p_loss_after_loss = sum(after_loss) / len(after_loss)
    # Stationary share of the bad state is p/(p+r) = 1/21, so the loss rate is about 0.038;
    # a loss predicts another one strongly (~0.64), which Bernoulli loss would not.
    assert p_loss == pytest.approx(0.8 / 21, rel=0.15)
    assert p_loss_after_loss > 10 * p_loss


def test_slice_sizes_cover_the_chunk() -> None:
    rng = random.Random(5)
    cfg = DirectionConfig(slice_bytes=100, slice_variation=30)
    sizes = slice_sizes(10_000, cfg, rng)
    assert sum(sizes) == 10_000
    assert all(70 <= s <= 130 for s in sizes[:-1]) and 1 <= sizes[-1] <= 130
    assert len(set(sizes)) > 5
    assert slice_sizes(10_000, DirectionConfig(), rng) == [10_000]
    assert slice_sizes(0, cfg, rng) == []


# -- outages -------------------------------------------------------------------------------


def test_outage_schedule_once_and_repeating() -> None:
    sched = OutageSchedule(
        (OutageSpec("blackhole", 5.0, 20.0), OutageSpec("reset", 1.0, 2.0, 10.0)), seed=0
    )
    assert sched.active(19.9) is None
    assert sched.active(20.0) == (("schedule", 0, 0), "blackhole", 25.0)
    assert sched.active(24.99) is not None and sched.active(25.0) is None
    assert sched.active(2.5) == (("schedule", 1, 0), "reset", 3.0)
    assert sched.active(12.5) == (("schedule", 1, 1), "reset", 13.0)
    assert sched.active(13.5) is None


def test_outage_probability_is_seeded_and_about_right() -> None:
    spec = (OutageSpec("refuse", 1.0, 0.0, 10.0, probability=0.3),)
    a = [OutageSchedule(spec, 4).active(k * 10.0 + 0.5) is not None for k in range(2000)]
    b = [OutageSchedule(spec, 4).active(k * 10.0 + 0.5) is not None for k in range(2000)]
    c = [OutageSchedule(spec, 5).active(k * 10.0 + 0.5) is not None for k in range(2000)]
    assert a == b and a != c
    assert sum(a) / len(a) == pytest.approx(0.3, abs=0.04)


def test_outage_plan_manual_duration_and_restore() -> None:
    plan = OutagePlan()
    window = (("schedule", 0, 3), "blackhole")
    assert plan.desired(0.0, None) is None
    assert plan.desired(0.0, window) == "blackhole"
    plan.trigger("reset", now=1.0, duration_s=2.0)
    assert plan.desired(1.5, window) == "reset"  # manual wins
    assert plan.desired(3.0, None) is None  # expired
    plan.restore(window)  # skips the rest of this window...
    assert plan.desired(3.5, window) is None
    assert plan.desired(13.5, (("schedule", 0, 4), "blackhole")) == "blackhole"  # ...not the next
    plan.trigger("refuse", now=20.0, duration_s=None)
    assert plan.desired(1e9, None) == "refuse"


def test_rate_meter() -> None:
    meter = RateMeter(window_s=1.0)
    for k in range(100):
        meter.add(1250, k * 0.01)  # 125 kB/s
    assert meter.bits_per_s(0.995) == pytest.approx(1e6)
    assert meter.bits_per_s(5.0) == 0.0


# -- traces --------------------------------------------------------------------------------


def _trace(**kwargs: object) -> Trace:
    points = (
        TracePoint(0.0, 1e6, 2e6, 0.01, 0.0, None),
        TracePoint(10.0, 3e6, None, 0.03, 0.02, "blackhole"),
        TracePoint(20.0, 1e6, 2e6, 0.01, 0.0, None),
    )
    return Trace(points, **kwargs)  # type: ignore[arg-type]


def test_trace_step_linear_and_loop() -> None:
    step = _trace()
    assert step.at(5.0).up_rate_bps == 1e6
    assert step.at(10.0).outage == (("trace", 1, 0), "blackhole")
    assert step.at(25.0).up_rate_bps == 1e6 and step.at(1e6).outage is None  # holds the end
    linear = _trace(interpolation="linear")
    mid = linear.at(5.0)
    assert mid.up_rate_bps == pytest.approx(2e6)
    assert mid.delay_s == pytest.approx(0.02)
    assert mid.down_rate_bps == 2e6  # unlimited end point: held, not interpolated
    assert linear.at(15.0).loss == pytest.approx(0.01)
    looped = _trace(loop=True)
    assert looped.at(45.0).outage is None and looped.at(35.0).outage == (
        ("trace", 1, 1),
        "blackhole",
    )
    assert looped.at(35.0).up_rate_bps == 3e6


def test_trace_csv_round_trip_and_errors(tmp_path: Path) -> None:
    text = format_trace(_trace().points, comment="test")
    assert load_trace(text.splitlines()).points == _trace().points
    good = "time,up_rate,down_rate,delay,loss,outage\n0,5mbit,,40ms,1%,\n"
    assert load_trace(good.splitlines()).points[0] == TracePoint(0.0, 5e6, None, 0.04, 0.01, None)
    bad_cases = [
        ("time,up_rate,down_rate,delay\n", "lacks column\\(s\\) loss, outage"),
        (good + "1,lots,1mbit,0,0,\n", "line 3, column up_rate: bad rate 'lots'"),
        (good + "1,1mbit,1mbit,0,0,flood\n", "line 3, column outage: 'flood'"),
        (good + "1,1mbit,1mbit,0,0,2\n", "line 3, column outage: '2' is not one of"),
        (good + "0,1mbit,1mbit,0,0,\n", "times must increase"),
        (good + "1,1mbit\n", "line 3: 2 cells"),
    ]
    for content, needle in bad_cases:
        path = tmp_path / "t.csv"
        path.write_text(content)
        with pytest.raises(ValueError, match=needle):
            load_trace(path)


def test_trace_numeric_outage_column() -> None:
    # Measured traces flag outages as 0/1; 1 is a black hole (docs/NETSHAPE.md).
    text = "time,up_rate,down_rate,delay,loss,outage\n0,5mbit,,0,0,0\n1,5mbit,,0,0,1\n2,,,0,0,0.0\n"
    trace = load_trace(text.splitlines())
    assert [p.outage for p in trace.points] == [None, "blackhole", None]
    assert trace.at(1.5).outage == (("trace", 1, 0), "blackhole")
    assert trace.at(2.5).outage is None


def test_shipped_traces_are_what_the_generator_makes(tmp_path: Path) -> None:
    assert gentrace.main(["--all", str(tmp_path)]) == 0
    for kind in gentrace.KINDS:
        shipped = (TRACES / f"{kind}.csv").read_text()
        assert shipped == (tmp_path / f"{kind}.csv").read_text(), kind
        trace = load_trace(TRACES / f"{kind}.csv", loop=True)
        assert trace.duration_s >= 60
    four_g = load_trace(TRACES / "4g.csv").at(30.0)
    assert (four_g.up_rate_bps, four_g.delay_s) == (24e6, 0.02)
    outages = load_trace(TRACES / "outages.csv")
    modes = {outages.at(t).outage[1] for t in (11.0, 25.5, 41.0)}  # type: ignore[index]
    assert modes == {"blackhole", "reset", "refuse"}
    rates = [p.up_rate_bps or 0.0 for p in load_trace(TRACES / "fluctuating.csv").points]
    assert all(1e6 <= r <= 100e6 for r in rates)
    assert max(rates) / min(rates) > 3


# -- CLI parsing ---------------------------------------------------------------------------


def test_cli_builds_per_direction_config() -> None:
    args = build_parser().parse_args(
        [
            "--upstream",
            "127.0.0.1:9",
            "--rate",
            "10mbit",
            "--down-rate",
            "50mbit",
            "--delay",
            "20ms",
            "--up-loss",
            "1%",
            "--outage",
            "reset:2s@10s/30s",
            "--seed",
            "3",
        ]
    )
    config, trace = config_from_args(args)
    assert trace is None
    assert config.up.rate_bps == 10e6 and config.down.rate_bps == 50e6
    assert config.up.delay_s == config.down.delay_s == pytest.approx(0.02)
    assert config.up.loss == pytest.approx(0.01) and config.down.loss == 0.0
    assert config.outages == (OutageSpec("reset", 2.0, 10.0, 30.0),)
    assert config.seed == 3 and isinstance(config, ShapeConfig)


def test_cli_rejects_bad_values_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--upstream", "127.0.0.1:9", "--rate", "5 furlongs"])
    err = capsys.readouterr().err
    assert "--rate" in err and "unknown unit 'furlongs'" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--upstream", "nowhere"])
    assert "bad address 'nowhere'" in capsys.readouterr().err
