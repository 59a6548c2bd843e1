"""bench.paper and its harness: the pure pieces, and a tiny real run.

The real run uses the small seeded ResNet-20 of ``tests/support/runtime.py`` (real
compute, real server and netshape processes on loopback) with runs of about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import paper
from bench._harness import (
    DecisionRecord,
    RunResult,
    ServerProcess,
    Shaper,
    Testbed,
    frames_dataset,
    frames_for,
    measure,
    scaled_device_profile,
)
from spinn.decisions.offline_profile import Profile
from spinn.decisions.policy import FixedPolicy
from spinn.runtime.device import SpinnDevice
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
    assert {t for _, t in grid} == {0.0, None}
    # A floor no threshold meets leaves only "no early exit".
    assert {t for _, t in paper.oracle_grid(prof, 0.5, 3)} == {None}
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
    assert fig["spinn_vs_oracle_min"] == pytest.approx(0.7)
    assert fig["settle_seconds_median"] == 1.25
    assert fig["frames_lost"] == 0
    assert fig["middle_regime"] is False and fig["middle_regime_mbit"] is None
    assert fig["sla_met_where_feasible"] is None
    assert fig["server_cost_ratio_vs_server_only"] is None
    # Worst condition: all frames at 0.5 -> 2 points below the final exit.
    assert fig["accuracy_drop_vs_final_exit"] == pytest.approx(2.0)
    # Experiment 2's rows count in the ratios; experiment 1's give the middle regime and
    # the server-cost ratio, experiment 3 the SLA verdicts.
    e1["rows"][0].update(
        mbit=1.0, middle=True, server_ms_per_inference={"spinn": 0.5, "server-only": 2.0}
    )
    e1["rows"][1].update(
        mbit=10.0, middle=True, server_ms_per_inference={"spinn": 0.0, "server-only": 2.0}
    )
    e2 = {"rows": [{"spinn_vs_best_baseline": 2.5, "spinn_vs_oracle": 0.6}]}
    e3 = {"met_where_feasible": False, "accuracy_gain_vs_edgent_pts": 3.456}
    fig = paper.headline(e1, {"settle_median": None}, e6, 0, e2, e3)
    assert fig["spinn_vs_best_baseline_max"] == 2.5
    assert fig["spinn_vs_oracle_min"] == pytest.approx(0.6)
    assert fig["settle_seconds_median"] is None
    assert fig["middle_regime"] is True and fig["middle_regime_mbit"] == [1.0, 10.0]
    assert fig["server_cost_ratio_vs_server_only"] == 4.0
    assert fig["sla_met_where_feasible"] is False
    assert fig["sla_accuracy_gain_vs_edgent_pts"] == 3.46


def test_middle_split_wins_against_both_ends_at_their_best() -> None:
    grid = {(0, 2.0): 100.0, (0, 0.5): 150.0, (5, 0.5): 140.0, (11, 0.5): 90.0}
    assert not paper.middle_split_wins(grid, 11)
    assert paper.middle_split_wins({**grid, (5, 2.0): 151.0}, 11)
    assert not paper.middle_split_wins({(0, 2.0): 1.0, (11, 2.0): 2.0}, 11)


def _sla_row(ms: float, **runs: tuple[float, bool]) -> dict[str, object]:
    return {"sla_ms": ms,
            "results": {k: {"test_accuracy": a, "met": m} for k, (a, m) in runs.items()}}  # fmt: skip


def test_sla_summary() -> None:
    rows = [
        _sla_row(5.0, spinn=(0.84, False), edgent=(0.84, False)),  # nobody meets it
        # SPINN alone meets it: Edgent's accuracy, bought with latency, is not compared.
        _sla_row(10.0, spinn=(0.88, True), edgent=(0.95, False)),
        _sla_row(16.0, spinn=(0.93, True), edgent=(0.915, True), other=(0.92, True)),
        _sla_row(27.0, spinn=(0.93, True), edgent=(0.934, True)),
    ]
    # Where SPINN is the most accurate of those that met each limit: yes.
    assert paper.sla_summary(rows[:3])["most_accurate_verdict"] == "yes"
    out = paper.sla_summary(rows)
    assert out["feasible_rows"] == 3
    assert out["met_where_feasible"] is True
    assert out["accuracy_gain_vs_edgent_pts"] == pytest.approx(1.5)
    # Edgent is more accurate at the loosest limit: 0.4 points above SPINN, with no noise
    # figure for the comparison: no.
    assert out["most_accurate_verdict"] == "no"
    assert out["accuracy_deficit_pts"] == pytest.approx(0.4)
    assert out["accuracy_deficit_noise_pts"] is None
    # Within the 95% interval of the paired difference on the test images: not a
    # difference shown either way, and not a "yes".
    edgent = rows[3]["results"]["edgent"]  # type: ignore[index]
    edgent["paired_noise_vs_spinn"] = 0.005
    out = paper.sla_summary(rows)
    assert out["most_accurate_verdict"] == "within noise"
    assert out["accuracy_deficit_noise_pts"] == pytest.approx(0.5)
    # A smaller gap that is beyond its own noise elsewhere decides: no.
    rows[2]["results"]["other"].update(test_accuracy=0.932, paired_noise_vs_spinn=0.001)  # type: ignore[index]
    out = paper.sla_summary(rows)
    assert out["most_accurate_verdict"] == "no"
    assert out["accuracy_deficit_pts"] == pytest.approx(0.2)
    rows[2]["results"]["other"]["test_accuracy"] = 0.92  # type: ignore[index]
    edgent["paired_noise_vs_spinn"] = 0.003
    assert paper.sla_summary(rows)["most_accurate_verdict"] == "no"
    rows[2]["results"]["spinn"]["met"] = False  # type: ignore[index]
    assert paper.sla_summary(rows)["met_where_feasible"] is False
    assert paper.sla_summary(rows)["most_accurate_verdict"] == "no"
    assert paper.sla_summary(rows[:1])["accuracy_gain_vs_edgent_pts"] is None
    assert paper.accuracy_half_width(0.93, 2500) == pytest.approx(0.01, abs=1e-3)


def test_test_answers_pair_the_configurations_on_the_same_images() -> None:
    import numpy as np
    import torch

    from bench._harness import DecisionRecord, RunResult

    # Two exits, four images, three classes: exit 0 is confident on images 0 and 1 (right
    # on 0, wrong on 1), the final exit right on 1, 2 and 3.
    probs = torch.tensor(
        [
            [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.4, 0.3, 0.3]],
            [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]],
        ]
    )
    labels = torch.tensor([0, 1, 2, 0])
    answers = paper.TestAnswers.from_probs(probs, labels, (0.5, 0.95))
    np.testing.assert_array_equal(answers.exits[-1], [False, True, True, True])
    np.testing.assert_array_equal(answers.at[0.5], [True, False, True, True])
    np.testing.assert_array_equal(answers.at[0.95], answers.exits[-1])

    def run(*configs: tuple[float | None, int | None]) -> RunResult:
        decisions = [DecisionRecord(1.0, 0, t, e, 1e6, 1.0, 1.0, True) for t, e in configs]
        return RunResult("x", 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {}, {}, [],
                         decisions)  # fmt: skip

    # A run's per-image figure is the share of its frames whose configuration is right:
    # half at thr 0.5, half truncated at exit 0.
    mixed = answers.of_run(run((0.5, None), (None, 0)))
    np.testing.assert_allclose(mixed, [1.0, 0.0, 0.5, 1.0])
    no_exit = answers.of_run(run((None, None)))
    # Paired: the noise of the difference comes from the images answered differently.
    d = mixed - no_exit
    assert paper.paired_half_width(mixed, no_exit) == pytest.approx(1.96 * d.std(ddof=1) / 2.0)
    assert paper.paired_half_width(no_exit, no_exit) == 0.0


def test_workloads_by_name_or_path(tmp_path: Path) -> None:
    for name in ("camera", "default", "zeta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert [n for n, _ in paper.shipped_workloads(tmp_path)] == ["default", "camera", "zeta"]
    got = paper.parse_workloads("default, camera", tmp_path)
    assert got == [("default", tmp_path / "default" / "model.pt"),
                   ("camera", tmp_path / "camera" / "model.pt")]  # fmt: skip
    path = str(tmp_path / "zeta" / "model.pt")
    assert paper.parse_workloads(path, tmp_path) == [("zeta", Path(path))]
    for text, words in (("nope", "'nope' is neither"), ("default,default", "distinct"),
                        (",", "distinct"), ("empty", "known: default, camera, zeta")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            paper.parse_workloads(text, tmp_path)


def test_combine_takes_the_worst_case_of_each_target() -> None:
    a = {"spinn_vs_oracle_min": 0.95, "spinn_vs_best_baseline_max": 1.2, "middle_regime": False,
         "sla_met_where_feasible": True, "settle_seconds_median": 0.5, "frames_lost": 1,
         "sla_accuracy_gain_vs_edgent_pts": None}  # fmt: skip
    b = {"spinn_vs_oracle_min": 0.85, "spinn_vs_best_baseline_max": 1.9, "middle_regime": True,
         "sla_met_where_feasible": False, "settle_seconds_median": 2.0, "frames_lost": 2,
         "sla_accuracy_gain_vs_edgent_pts": 4.0}  # fmt: skip
    a["middle_regime_mbit"], b["middle_regime_mbit"] = [1, 3], [10, 24]
    out = paper.combine({"default": a, "camera": b})
    assert out["middle_regime_mbit"] == [1, 24]
    assert out["server_cost_ratio_vs_server_only"] is None  # in neither
    assert out["spinn_vs_oracle_min"] == 0.85
    assert out["spinn_vs_best_baseline_max"] == 1.9
    assert out["middle_regime"] is True
    assert out["sla_met_where_feasible"] is False
    assert out["settle_seconds_median"] == 2.0
    assert out["frames_lost"] == 3
    assert out["sla_accuracy_gain_vs_edgent_pts"] == 4.0


def test_frames_for_the_model_input_match_the_device_preprocessing() -> None:
    import numpy as np
    import torch

    from spinn.model.progressive import InputSpec
    from spinn.runtime.sources import preprocess

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    rgb96 = InputSpec(3, 96, 96, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    frames = frames_for(grey, rgb96)
    assert frames.shape == (3, 96, 96, 3) and frames.dtype == np.uint8
    for i in range(3):
        assert torch.equal(preprocess(frames[i], rgb96), preprocess(grey[i], rgb96))
    same = InputSpec(1, 28, 28, (0.5,), (0.25,))
    assert frames_for(grey, same) is grey
    assert frames_for(frames, rgb96) is frames
    small_grey = frames_for(frames, InputSpec(1, 32, 32, (0.5,), (0.25,)))
    assert small_grey.shape == (3, 32, 32)
    # The runs replay the test split of the dataset the model was trained on.
    assert frames_dataset({"dataset": "fashion-mnist-camera"}) == "fashion-mnist-camera"
    assert frames_dataset({"dataset": "x.npz"}) == "fashion-mnist"
    assert frames_dataset({}) == "fashion-mnist"


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in (
        (["--only", "7"], "experiments are 1-6"),
        (["--device-slowdown", "0.5"], "--device-slowdown must be in [1, 1000]"),
        (["--checkpoint", "/nonexistent/model.pt"], "no such file"),
        (["--model", "/nonexistent/model.pt"], "no such file"),
        (["--workloads", "no-such-model"], "is neither a model"),
        (["--model", __file__, "--workloads", "default"], "one or the other"),
    ):
        with pytest.raises(SystemExit):
            paper.main(argv)
        assert words in capsys.readouterr().err


def test_harness_real_run(small: tuple[Path, Path], tmp_path: Path, restore_affinity: None) -> None:
    ckpt, prof = small
    tb = Testbed.prepare(ckpt, prof, 3.0, tmp_path)
    assert tb.profile.stage_device_ms[0] == pytest.approx(3 * 0.5)
    # Edgent's latency target, the device-only latency, is the scaled profile's, once.
    bench = paper.Bench(tb, paper.QUICK, tmp_path, 3.0)
    unscaled = Profile.load(prof)
    assert bench.device_only_ms == pytest.approx(3.0 * unscaled.device_time_ms(unscaled.num_stages))
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
    # Nothing of the runs' devices is left for a full collection in a later run's window.
    assert not [o for o in gc.get_objects() if isinstance(o, SpinnDevice)]


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
    before = os.sched_getaffinity(0)
    figures = paper.run_all(tiny, out, ckpt, prof, 2.0, only=(1, 6))
    # The next workload pins afresh: the run gives back the cores it took.
    assert os.sched_getaffinity(0) == before
    # Without experiment 4 no headline; the residual rates come from the profile and the
    # scheduler alone.
    rates = paper.residual_rates(Profile.load(prof), 2.0)
    assert figures == {"frames_lost": 0, **rates}
    assert set(rates) == {f"residual_{k}_{b}pt" for k in ("rate", "decision") for b in (1, 5)}
    md = (out / "exp1_bandwidth.md").read_text()
    assert "Device slowdown ×2" in md and "tiny 50 Mbit/s" in md
    assert (out / "exp1_bandwidth.png").stat().st_size > 1000
    assert (out / "exp6_thresholds" / "evaluation.md").exists()
    raw = json.loads((out / "raw.json").read_text())
    row = raw["exp1"]["rows"][0]
    assert set(row["fps"]) == set(paper.POLICIES)
    assert row["oracle_fps"] >= max(row["fps"]["device-only"], row["fps"]["server-only"])


def test_residual_rates_are_the_schedulers_choice_within_the_device_limit() -> None:
    # Two stages of 1 ms on the device (an early exit after stage 0) and 10,000-value images:
    # the device may run at most half the network (split 0 or 1); on the 1 Mbit/s link the
    # upload decides which is fastest.
    doc: dict[str, Any] = {
        "format": "spinn-profile/1", "model_id": "m", "weights_sha256": "", "arch": "a",
        "num_stages": 2, "exit_stages": [0, 1],
        "splits": [
            {"split": 0, "shape": [10000], "numel": 10000, "bytes": {"uint8_image+zstd": 6000}},
            {"split": 1, "shape": [5000], "numel": 5000, "bytes": {"sparse_int8+zstd": 4000}},
        ],
        "stage_device_ms": [1.0, 1.0], "stage_server_ms": [0.1, 0.1],
        "exit_accuracy": [0.8, 0.9],
        "thresholds": [{"thr_conf": 0.5, "exit_rate": [0.5, 0.5], "accuracy": 0.88}],
        "calibration_size": 10,
    }  # fmt: skip
    plain = paper.residual_rates(Profile.from_dict(doc))
    # Within 1 point: no early exit (90%), split 1 sends 4,000 of the 10,000 image bytes;
    # within 5, the threshold (88%): half the inputs answer on the device.
    assert (plain["residual_rate_1pt"], plain["residual_rate_5pt"]) == (0.4, 0.2)
    assert plain["residual_decision_5pt"].startswith("split 1, thr 0.50, lossless: 2000 B")
    doc["splits"][1]["precisions"] = [
        {"bits": 3, "bytes": {"sparse_uintb+zstd": 1000}, "accuracy_drop_pts": 1.5,
         "drop_bound_pts": 2.0},
    ]  # fmt: skip
    lossy = paper.residual_rates(Profile.from_dict(doc))
    # The 3-bit width's drop bound (2 points) keeps it out of the 1-point bound; within 5
    # points it is faster: half the inputs at 1,000 bytes (88% − 1 point lost on half).
    assert (lossy["residual_rate_1pt"], lossy["residual_rate_5pt"]) == (0.4, 0.05)
    assert "3-bit" in lossy["residual_decision_5pt"]
    # A first stage longer than half the network: split 1 is out; the pixels go.
    doc["stage_device_ms"] = [30.0, 1.0]
    limited = paper.residual_rates(Profile.from_dict(doc))
    assert limited["residual_rate_1pt"] == 0.6
    assert limited["residual_decision_1pt"].startswith("server-only")
