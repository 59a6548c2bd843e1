"""The simulator (bench.sim, bench._simcore): deterministic, conserving, links at their rate."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench import sim
from bench._simcore import (
    DeviceModel,
    EventLoop,
    Link,
    LinkSpec,
    ServerModel,
    SimDevice,
    SimServer,
    exit_for,
)
from spinn.decisions.baselines import EdgentPolicy, make_policy
from spinn.decisions.offline_profile import Profile
from spinn.decisions.policy import FixedPolicy
from tools.netshape.trace import load_trace

ROOT = Path(__file__).resolve().parents[2]
PROFILE = Profile.load(ROOT / "models" / "default" / "profile.json")
# A device 20× slower than the profiled one: the server wins races over a 20 ms RTT.
SLOW = PROFILE.on_slower_device(20)


def _row(seed: int) -> dict[str, Any]:
    return sim.simulate_row(PROFILE, "spinn", 24, 0.02, device=DeviceModel(), server=ServerModel(),
                            device_slowdown=5.0, run_s=0.6, warmup_s=0.2, seed=seed)  # fmt: skip


def test_same_seed_same_history() -> None:
    a, b = _row(3), _row(3)
    assert a == b
    assert a["answered"] > 0
    # The seed matters: compute noise and exit draws change with it.
    assert _row(4)["latency_ms_mean"] != a["latency_ms_mean"]


def test_fleet_same_seed_same_figures() -> None:
    plan = sim.FleetPlan(devices=12, fps=10.0, seconds=1.0, warmup_s=0.2)
    a = sim.run_fleet(PROFILE, plan, 2, DeviceModel(), 30.0, seed=1)
    b = sim.run_fleet(PROFILE, plan, 2, DeviceModel(), 30.0, seed=1)
    assert a == b
    assert a["lost"] == 0 and a["answered"] > 0


def test_link_moves_bytes_at_its_rate() -> None:
    loop = EventLoop()
    link = Link(loop, LinkSpec(8e6, 0.01), random.Random(0), up=True)
    arrivals: list[float] = []
    finish = 0.0
    for _ in range(100):
        finish = link.send(10_000, lambda: arrivals.append(loop.now))
    loop.run(10.0)
    # 100 × 10 kB = 8 Mbit at 8 Mbit/s: one second on the wire, then the one-way delay.
    assert finish == pytest.approx(1.0)
    assert arrivals[-1] == pytest.approx(1.01)
    assert arrivals == sorted(arrivals) and len(arrivals) == 100


def test_trace_rate_and_outage_are_followed() -> None:
    trace = load_trace(["time,up_rate,down_rate,delay,loss,outage",
                        "0,1000000,1000000,0.005,0,", "1,1000000,1000000,0.005,0,blackhole",
                        "2,1000000,1000000,0.005,0,"])  # fmt: skip
    loop = EventLoop()
    link = Link(loop, LinkSpec(None, 0.0, trace=trace), random.Random(0), up=True)
    got: list[float] = []
    assert link.send(12_500, lambda: got.append(loop.now)) == pytest.approx(0.1)
    loop.run(1.5)
    link.send(100, lambda: got.append(loop.now))  # sent inside the black hole: lost
    loop.run(5.0)
    assert got == [pytest.approx(0.105)]
    assert link.dropped == 1


def test_every_frame_answered_once_through_outages() -> None:
    trace = load_trace(["time,up_rate,down_rate,delay,loss,outage",
                        "0,20000000,20000000,0.01,0.01,", "0.5,20000000,20000000,0.01,0,blackhole",
                        "3.5,20000000,20000000,0.01,0,", "5,20000000,20000000,0.01,0,"],
                       loop=True)  # fmt: skip
    loop = EventLoop()
    server = SimServer(loop, PROFILE, ServerModel(batch_max=4), seed=0)
    devices = [
        SimDevice(
            i,
            loop,
            SLOW,
            make_policy(policy, SLOW),
            DeviceModel(),
            LinkSpec(None, 0.0, trace=trace, trace_offset_s=0.1 * i),
            server,
            seed=i,
            rate_fps=rate,
            stop_s=4.5,
        )  # fmt: skip
        for i, (policy, rate) in enumerate(
            [("server-only", None), ("spinn", 40.0), ("server-only", 20.0), ("device-only", None)]
        )
    ]
    loop.drain(60.0)
    for d in devices:
        counts = Counter(a.frame for a in d.answers)
        assert d.frames_begun > 0
        assert set(counts) == set(range(d.frames_begun))
        assert max(counts.values()) == 1
        assert not d.errors
    where = Counter(a.where for d in devices for a in d.answers)
    assert where["server"] > 0 and where["fallback"] > 0
    # The devices' own cores declared the link dead in the black hole and reconnected.
    assert max(d.core.connects for d in devices) >= 2


def test_lower_threshold_never_exits_later() -> None:
    rng = random.Random(0)
    grid = list(PROFILE.thr_grid)
    for _ in range(200):
        u = rng.random()
        exits = [exit_for(PROFILE, u, t, None) for t in grid]
        assert exits == sorted(exits)
        assert exit_for(PROFILE, u, None, None) == PROFILE.num_exits - 1
        assert exit_for(PROFILE, u, None, 1) == 1


def test_cli_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--fleet-devices", "8", "--fleet-seconds", "0.8", "--fleet-fps", "10",
            "--run-s", "0.3", "--max-servers", "4", "--seed", "5"]  # fmt: skip
    assert sim.main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The same seed prints the same figures (all but the timings of this machine).
    assert sim.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    timings = {"sim_speedup", "sim_speedup_cpu", "fleet_sim_speedup", "fleet_wall_s", "fleet_cpu_s"}
    assert {k: v for k, v in again.items() if k not in timings} == {
        k: v for k, v in last.items() if k not in timings
    }
    assert last["fleet_devices"] == 8
    assert last["sim_vs_real_throughput_error_median"] is None
    assert last["sim_speedup"] > 0
    assert last["frames_lost"] == 0
    assert 1 <= last["fleet_servers_needed"] <= 4


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sim.main(["--fleet-devices", "0"])
    assert "--fleet-devices must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--real"):
        sim.main(["--real", "/nonexistent/real.json"])


def test_real_figures_from_bench_paper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = {
        "plan": "quick",
        "device_slowdown": 5.0,
        "exp1": {"rows": [{"network": "4G", "mbit": 24, "rtt_ms": 40.0,
                           "fps": {"device-only": 60.0, "server-only": 80.0}}]},
    }  # fmt: skip
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    argv = ["--real", str(path), "--fleet-devices", "4", "--fleet-seconds", "0.5",
            "--run-s", "0.2", "--max-servers", "2"]  # fmt: skip
    assert sim.main(argv) == 0
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    # bench.paper keeps throughputs only: a throughput error, no latency error.
    assert last["sim_vs_real_throughput_error_median"] is not None
    assert last["sim_vs_real_latency_error_median"] is None
    assert "4G" in out and "server-only" in out


def test_device_exit_draws_match_exit_for() -> None:
    loop = EventLoop()
    dev = SimDevice(0, loop, PROFILE, make_policy("device-only", PROFILE), DeviceModel(), None,
                    None, seed=0, stop_s=0.0)  # fmt: skip
    rng = random.Random(1)
    for _ in range(500):
        u, thr = rng.random(), rng.choice([*PROFILE.thr_grid, None])
        fe = rng.choice([None, 2])
        assert dev._exit_for(u, thr, fe) == exit_for(PROFILE, u, thr, fe)


def test_real_run_without_answers_is_left_out(tmp_path: Path) -> None:
    rows = [
        {"network": "4G", "mbit": 24, "delay_s": 0.02, "policy": "server-only", "fps": 80.0,
         "latency_ms_mean": 50.0},
        {"network": "4G", "mbit": 24, "delay_s": 0.02, "policy": "device-only", "fps": 0.0,
         "latency_ms_mean": 25.0},
    ]  # fmt: skip
    real = {"format": sim.REAL_FORMAT, "device_slowdown": 5.0, "run_s": 0.6, "warmup_s": 0.2,
            "calibration": None, "rows": rows}  # fmt: skip
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real), encoding="utf-8")
    slow = PROFILE.on_slower_device(5)
    out = sim.compare(sim.load_real(path), slow, DeviceModel(), ServerModel(), seed=0)
    stalled = out["rows"][1]
    assert stalled["throughput_error"] is None and stalled["latency_error"] is None
    assert out["throughput_error_median"] == out["rows"][0]["throughput_error"]


def test_split_zero_uploads_the_input_codec() -> None:
    # The runtime sends the frame's pixels at split 0 (PROTOCOL.md §6.8): the simulated
    # device uploads that entry's size there, and the codec's at the other splits.
    camera = Profile.load(ROOT / "models" / "camera" / "profile.json")

    def uploaded(split: int, model: DeviceModel) -> float:
        loop = EventLoop()
        srv = SimServer(loop, camera, ServerModel(), 0)
        dev = SimDevice(0, loop, camera, FixedPolicy(split, None), model,
                        LinkSpec(100e6, 0.001), srv, 0, stop_s=0.3)  # fmt: skip
        loop.run(0.3)
        loop.drain(5.0)
        assert dev.uploads > 0
        return dev.infer_bytes / dev.uploads

    model = DeviceModel(codec=sim._codec(camera), input_codec=sim._input_codec(camera),
                        ping_interval_s=10.0)  # fmt: skip
    pixels = camera.splits[0].bytes["uint8_image+zstd"]
    assert sim._input_codec(camera) == "uint8_image+zstd"
    per_upload = uploaded(0, model)
    without = uploaded(0, dataclasses.replace(model, input_codec=None))
    zdict = camera.splits[0].bytes["sparse_int8_zdict"]
    assert pixels != zdict
    # Each INFER is the profiled payload in its frame (its msgpack fields around it).
    assert 0 < per_upload - pixels < 256
    # Around it the same fields but the codec's name (the frame names the codec).
    frame = per_upload - pixels - len("uint8_image")
    assert frame == pytest.approx(without - zdict - len("sparse_int8_zdict"), abs=2)


def test_step_trace_conditions_held_per_row_match_the_trace() -> None:
    # The link looks a step trace's row up once and holds it until the next row.
    for name in sim.FLEET_TRACES:
        trace = load_trace(sim.TRACES_DIR / f"{name}.csv", loop=True)
        rng = random.Random(name)
        offset = rng.uniform(0, trace.duration_s)
        loop = EventLoop()
        link = Link(loop, LinkSpec(None, 0.0, trace=trace, trace_offset_s=offset,
                                   rate_scale=1.5), random.Random(0), up=True)  # fmt: skip
        times = sorted(rng.uniform(0, 3 * trace.duration_s) for _ in range(400))
        times += [p.time_s - offset + trace.duration_s for p in trace.points]  # row edges
        for t in sorted(times):
            st = trace.at(t + offset)
            want = (1.5 * st.up_rate_bps if st.up_rate_bps else st.up_rate_bps, st.delay_s,
                    st.loss, st.outage is not None)  # fmt: skip
            assert link.conditions(t) == want, (name, t)


def test_server_search_is_the_same_in_processes() -> None:
    # Fleet runs side by side in forked processes give the figures one process gives.
    plan = sim.FleetPlan(devices=8, fps=10.0, seconds=0.8, warmup_s=0.2)
    args = (PROFILE, plan, DeviceModel(), math.inf, 30.0, 1, 4)
    one = sim.servers_needed(*args, max_utilisation=0.02, jobs=1)
    two = sim.servers_needed(*args, max_utilisation=0.02, jobs=2)
    assert one[0] == two[0]
    by_n = {f["servers"]: f for f in two[1]}
    assert all(by_n[f["servers"]] == f for f in one[1])


def test_an_overloaded_server_core_answers_busy_and_nothing_is_lost() -> None:
    # The simulated server is the runtime's ServerCore: a server far slower than the
    # devices refuses work it cannot finish by the deadline (BUSY), and every frame is
    # still answered exactly once, by the devices themselves.
    loop = EventLoop()
    server = SimServer(loop, PROFILE, ServerModel(scale=6.0), seed=0)
    devices = [
        SimDevice(
            i,
            loop,
            SLOW,
            make_policy("server-only", SLOW),
            DeviceModel(),
            LinkSpec(100e6, 0.002),
            server,
            seed=i,
            stop_s=2.0,
        )  # fmt: skip
        for i in range(8)
    ]
    loop.drain(60.0)
    assert server.core.stats.busy_sent > 0 and server.core.stats.computed > 0
    where = Counter(a.where for d in devices for a in d.answers)
    assert where["server"] > 0 and where["fallback"] > 0
    for d in devices:
        counts = Counter(a.frame for a in d.answers)
        assert set(counts) == set(range(d.frames_begun)) and max(counts.values()) == 1
        assert not d.errors


def test_server_search_finds_the_fewest_in_few_runs() -> None:
    # A fleet whose server-seconds per second fall as fewer servers batch more: the
    # search's answer is a linear scan's, each count run once, a handful of runs in all.
    for busy, gain, jobs in [(3.5, 0.5, 1), (3.5, 0.5, 2), (12.9, 0.2, 1), (40.0, 0.0, 2),
                             (0.3, 0.4, 1), (500.0, 0.0, 1)]:  # fmt: skip
        asked: list[int] = []

        def fleet(n: int, busy: float = busy, gain: float = gain) -> dict[str, Any]:
            return {"servers": n, "server_utilisation": busy * (n / 100) ** gain / n}

        def run(ns: Any, asked: list[int] = asked) -> list[dict[str, Any]]:
            asked.extend(ns)
            return [fleet(n) for n in ns]

        def meets(f: dict[str, Any]) -> bool:
            return bool(f["server_utilisation"] <= 0.8)

        runs = sim.search_servers(run, meets, 256, 0.8, jobs=jobs, known=[fleet(100)])
        want = next((n for n in range(1, 257) if meets(fleet(n))), None)
        got = min((n for n, f in runs.items() if meets(f)), default=None)
        assert got == want, (busy, gain, jobs)
        assert len(asked) == len(set(asked))
        if want is not None:
            assert want == 1 or (want - 1 in runs and not meets(runs[want - 1]))
        assert len(asked) <= 2 * max(1, (want or 256).bit_length()) + 2, (busy, asked)


def test_the_device_core_bounds_the_frame_rate() -> None:
    # One core per device for its event loop and its worker's CPU: frames, RESULTs and
    # the worker's calls take it in turn, so an offloading device answers at most one
    # frame per (loop_ms + loop_result_ms + head_ms + upload_ms).
    def row(model: DeviceModel) -> dict[str, Any]:
        return sim.simulate_row(PROFILE, "server-only", 250, 0.0005, device=model,
                                server=ServerModel(), device_slowdown=5.0, run_s=0.8,
                                warmup_s=0.2, seed=0)  # fmt: skip

    free = row(DeviceModel(noise=0.0))
    model = DeviceModel(noise=0.0, loop_ms=2.0, loop_result_ms=1.0)
    busy = row(model)
    per_frame_ms = model.loop_ms + model.loop_result_ms + model.head_ms + model.upload_ms
    assert free["fps"] > 400
    assert 0.8 * 1000 / per_frame_ms < busy["fps"] <= 1000 / per_frame_ms + 5
    assert busy["lost"] == free["lost"] == 0
    assert busy["latency_ms_mean"] > free["latency_ms_mean"] + 3.0


def test_edgent_aims_at_the_device_only_latency_of_the_profile_it_is_given() -> None:
    """The simulator's Edgent is ``bench.paper``'s: its target the device-only latency of
    the device's own profile, slowdown included once (not scaled again)."""
    policy = sim.paper_policy("edgent", SLOW)
    assert isinstance(policy, EdgentPolicy)
    assert policy.latency_target_ms == pytest.approx(
        20 * PROFILE.device_time_ms(PROFILE.num_stages)
    )


def test_a_fleet_run_in_parts_of_its_servers_gives_the_figures_of_one_clock() -> None:
    # A device talks to its one server alone: the servers with their devices, each part on
    # its own clock, in processes or not, give what one clock for the whole fleet gives.
    plan = sim.FleetPlan(devices=12, fps=10.0, seconds=1.0, warmup_s=0.2)
    args = (PROFILE, plan, 3, DeviceModel(), 30.0, 1)
    whole = sim.run_fleet(*args)
    parts = [sim.fleet_part(*args, [1]), sim.fleet_part(*args, [0, 2])]
    assert sim.fleet_figures(plan, 3, parts) == whole
    assert sim.run_fleet(*args, jobs=2) == whole
    assert whole["answered"] > 0 and whole["lost"] == 0
