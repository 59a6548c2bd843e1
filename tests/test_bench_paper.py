"""bench.paper and its harness: the pure pieces, and a tiny real run.

The real run uses the small seeded ResNet-20 of ``tests/_runtime_support`` (real
compute, real server and netshape processes on loopback) with runs of about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import paper
from bench._harness import (
    DecisionRecord,
    RunResult,
    ServerProcess,
    Shaper,
    Testbed,
    measure,
    scaled_device_profile,
)
from spinn.policy import FixedPolicy
from spinn.profile import NO_EARLY_EXIT, Profile
from tools.netshape import load_trace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def restore_affinity() -> Iterator[None]:
    """Testbed.prepare pins this process to one core; give the others back afterwards."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if cores is not None:
        os.sched_setaffinity(0, cores)


@pytest.fixture(scope="module")
def small(checkpoint: Path) -> tuple[Path, Path]:
    """The session's small checkpoint (tests/conftest.py) and the profile beside it."""
    return checkpoint, checkpoint.parent / "profile.json"


def _run(decisions: list[DecisionRecord]) -> RunResult:
    return RunResult("spinn", 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {}, {},
                     records=[], decisions=decisions)  # fmt: skip


def _dec(t: float, split: int, thr: float, mbit: float) -> DecisionRecord:
    return DecisionRecord(t, split, thr, None, mbit * 1e6, 1.0, 1.0, True)


def test_scaled_profile_scales_device_times_only(small: tuple[Path, Path]) -> None:
    prof = Profile.load(small[1])
    scaled = scaled_device_profile(prof, 4.0)
    assert scaled.device_time_ms(prof.num_stages) == pytest.approx(
        4.0 * prof.device_time_ms(prof.num_stages)
    )
    assert scaled.stage_server_ms == prof.stage_server_ms
    assert scaled.model_id == prof.model_id


def test_oracle_grid_keeps_the_accuracy_floor(small: tuple[Path, Path]) -> None:
    prof = Profile.load(small[1])
    s_count = prof.num_stages
    grid = paper.oracle_grid(prof, 0.05, 2)
    assert {s for s, _ in grid} == {0, s_count // 2, s_count}
    assert {t for _, t in grid} == {0.0, NO_EARLY_EXIT}
    # A floor no threshold meets leaves only "no early exit".
    assert {t for _, t in paper.oracle_grid(prof, 0.5, 3)} == {NO_EARLY_EXIT}
    assert len(paper.oracle_grid(prof, 0.05, 3)) > len(grid)


def test_step_trace_is_a_valid_netshape_trace(tmp_path: Path) -> None:
    path = paper.write_step_trace(tmp_path / "s.csv", (100, 0.2, 50), 5.0)
    trace = load_trace(path)
    assert trace.at(1.0).up_rate_bps == pytest.approx(100e6)
    assert trace.at(7.5).up_rate_bps == pytest.approx(0.2e6)
    assert trace.at(12.0).down_rate_bps == pytest.approx(50e6)


def test_settle_times() -> None:
    decisions = [
        _dec(100.0, 0, 0.5, 90),  # level 1 (100 Mbit/s), not measured
        _dec(110.2, 0, 0.5, 60),  # step to 1 Mbit/s at t = 10
        _dec(110.8, 5, 0.5, 5),
        _dec(111.5, 11, 0.5, 1.2),
        _dec(112.0, 11, 0.5, 0.9),
        _dec(120.5, 11, 0.5, 0.9),  # step to 50 Mbit/s at t = 20: estimate never follows
    ]
    out = paper.settle_times(_run(decisions), 100.0, [(10.0, 1.0), (20.0, 50.0)], 30.0)
    assert out[0]["decision_s"] == pytest.approx(1.5)
    assert out[0]["estimate_s"] == pytest.approx(1.5)
    assert out[0]["decision"] == "11/0.50"
    assert out[1]["decision_s"] == 0.0
    assert out[1]["estimate_s"] is None


def test_outage_share_from_history() -> None:
    stats = {
        "elapsed_s": 10.0,
        "outage": {
            "history": [
                {"elapsed_s": 1.0, "mode": "blackhole"},
                {"elapsed_s": 2.0, "mode": None},
                {"elapsed_s": 8.0, "mode": "blackhole"},
            ]
        },
    }
    assert paper._outage_share(stats) == pytest.approx(0.3)


def test_headline_figures() -> None:
    e1 = {
        "rows": [
            {"spinn_vs_best_baseline": 1.5, "spinn_vs_oracle": 0.9, "spinn_thresholds": [0.5]},
            {"spinn_vs_best_baseline": 0.8, "spinn_vs_oracle": 0.7,
             "spinn_thresholds": [2.0, 0.5]},
        ]
    }  # fmt: skip
    e6 = {"final_exit_accuracy": 0.9, "accuracy_at": {0.5: 0.88, 0.9: 0.9}}
    fig = paper.headline(e1, {"settle_median": 1.25}, e6, 0)
    assert fig["spinn_vs_best_baseline_max"] == 1.5
    assert fig["spinn_vs_best_baseline_min"] == 0.8
    assert fig["spinn_vs_oracle_median"] == pytest.approx(0.8)
    assert fig["settle_seconds_median"] == 1.25
    assert fig["frames_lost"] == 0
    # Worst condition: all frames at 0.5 -> 2 points below the final exit.
    assert fig["accuracy_drop_vs_final_exit"] == pytest.approx(2.0)


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in (
        (["--only", "7"], "experiments are 1-6"),
        (["--device-slowdown", "0.5"], "--device-slowdown must be in [1, 1000]"),
        (["--checkpoint", "/nonexistent/model.pt"], "no such file"),
    ):
        with pytest.raises(SystemExit):
            paper.main(argv)
        assert words in capsys.readouterr().err


def test_harness_real_run(small: tuple[Path, Path], tmp_path: Path, restore_affinity: None) -> None:
    ckpt, prof = small
    tb = Testbed.prepare(ckpt, prof, 3.0, tmp_path)
    assert tb.profile.stage_device_ms[0] == pytest.approx(3 * 0.5)
    if len(os.sched_getaffinity(0)) > 1:
        pytest.fail("the device process was not pinned")
    with ServerProcess(tb) as server, Shaper(tb, server.port, rate="20mbit", delay="1ms") as sh:
        offload = measure(tb, sh.port, "fixed 0", FixedPolicy(0, 1.0),
                                duration_s=1.0, warmup_s=0.2)  # fmt: skip
        stats = sh.stats()
    assert offload.lost == 0 and offload.frames > 0
    assert offload.answered_by["server"] > 0
    assert offload.fps > 0
    assert all(d.split == 0 for d in offload.decisions)
    assert stats["up"]["bytes"] > 0
    local = measure(tb, None, "device-only", FixedPolicy(tb.profile.num_stages, 1.0),
                          duration_s=0.6, warmup_s=0.0, rate_fps=20)  # fmt: skip
    assert local.lost == 0 and local.answered_by["device"] == local.frames
    # Paced at 20/s for 0.6 s: about 12 frames, never many more.
    assert 5 <= local.frames <= 14
    # The device's online profiler sees the slowdown against the unscaled stage times.
    assert local.summary["estimates"]["device_scale"] > 0


def test_run_all_tiny(small: tuple[Path, Path], tmp_path: Path, restore_affinity: None) -> None:
    ckpt, prof = small
    tiny = dataclasses.replace(
        paper.QUICK,
        name="tiny",
        run_s=0.6,
        warmup_s=0.1,
        networks=(paper.Network("tiny 50 Mbit/s", 50, "1ms"),),
        eval_images=200,
        # A short start-up run is enough for this model; the run still goes through it.
        startup_s=0.3,
    )
    out = tmp_path / "results"
    figures = paper.run_all(tiny, out, ckpt, prof, 2.0, only=(1, 6))
    assert figures == {"frames_lost": 0}
    md = (out / "exp1_bandwidth.md").read_text()
    assert "Device slowdown ×2" in md and "tiny 50 Mbit/s" in md
    assert (out / "exp1_bandwidth.png").stat().st_size > 1000
    assert (out / "exp6_thresholds" / "evaluation.md").exists()
    raw = json.loads((out / "raw.json").read_text())
    row = raw["exp1"]["rows"][0]
    assert set(row["fps"]) == set(paper.POLICIES)
    assert row["oracle_fps"] >= max(row["fps"]["device-only"], row["fps"]["server-only"])
