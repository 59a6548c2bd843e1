"""Smoke test of bench/wire.py: it runs end to end and ends with its JSON line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import wire as bench


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    args = "--images 2 --dict-images 20 --repeats 1 --frames 3 --window 2 --lossy-images 40"
    args = args.split()
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["bench"] == "wire"
    for key in (
        "sparse_zstd_ratio",
        "pack_mb_s",
        "unpack_mb_s",
        "framing_vs_raw",
        "framing_vs_raw_serial",
        "order0_ideal_ratio",
        "zdict_ratio",
        "zdict_pack_mb_s",
        "zdict_unpack_mb_s",
    ):
        assert figures[key] > 0, key
    assert figures["window"] == 2
    assert set(figures["input_bytes"]) == {"1x28x28", "3x96x96 camera", "3x96x96 upscaled"}
    for sizes in figures["input_bytes"].values():
        assert 0 < sizes["sent"] < sizes["pixels"] < sizes["float32"]
    assert 0 < figures["int8_bits_per_value"] <= 8.0
    assert figures["sparse_zstd_ratio_min"] <= figures["sparse_zstd_ratio"]
    assert figures["sparse_zstd_ratio"] <= figures["sparse_zstd_ratio_max"]
    # Quantisation error is bounded by half a step on real activations (PROTOCOL.md §6.4).
    assert figures["max_err_scales"] <= 0.5 + 1e-3
    assert figures["sparse_zstd_ratio"] > figures["sparse_ratio"] > 1.0
    # The headroom rows code the same payloads losslessly: none can lose much to level 1.
    assert figures["headroom_best_ratio"] >= 0.95 * figures["sparse_zstd_ratio"]
    # The ceiling of a table-driven coder is a ratio of real bits, above the raw payload's.
    assert figures["static_model_ratio"] > figures["sparse_ratio"]
    # The default model ships its dictionaries; they beat plain zstd on every split of it.
    assert figures["dictionaries"] == bench.SHIPPED
    assert figures["zdict_ratio_min"] <= figures["zdict_ratio"] <= figures["zdict_ratio_max"]
    assert figures["zdict_ratio"] > figures["sparse_zstd_ratio"]
    # Per split (the table's rows: split, shape, zeros, sparse+zstd, zdict, ...), on every
    # feature map. The last split is the 32-value vector after the global pooling: there a
    # few bytes of frame header decide, and plain zstd may win.
    rows = [r.split() for r in lines if re.match(r"\s+\d+ \d+x\d+x\d+ ", r)]
    assert len(rows) == 10
    for split, shape, _, plain, zdict, *_ in rows:
        if not shape.endswith("x1x1"):
            assert float(zdict.rstrip("x")) > float(plain.rstrip("x")), split
    half, zdict_half = figures["sparse_zstd_ratio_half_sparse"], figures["zdict_ratio_half_sparse"]
    assert (half is None) == (zdict_half is None)
    assert half is None or zdict_half > half
    # sparse_uintb at the shipped profile's widths, splits 1..S-1 (PROTOCOL.md §6.9).
    assert len(figures["lossy_bits"]) == 10
    assert figures["lossy_ratio"] > 1.0
    drop = figures["lossy_accuracy_drop_pts"]
    assert (drop is None) == all(b is None for b in figures["lossy_bits"])
    assert drop is None or drop >= 0.0
    margin = figures["lossy_accuracy_drop_margin_pts"]
    assert (margin is None) == (drop is None) and (margin is None or margin >= 0.0)
    # Beside the largest drop, what the held-out images can verify: the pooled drop (the
    # mean of the estimates, at most their largest) and the family-wise lower bound.
    pooled, lower = (
        figures["lossy_accuracy_drop_pooled_pts"],
        figures["lossy_accuracy_drop_lower_pts"],
    )
    assert (pooled is None) == (drop is None) == (lower is None)
    if drop is not None:
        assert pooled <= drop and lower <= drop
        assert figures["lossy_accuracy_drop_pooled_margin_pts"] >= 0.0
        assert figures["lossy_accuracy_drop_noise_pts"] >= 0.0
    refuted = figures["lossy_bound_refuted_splits"]
    assert set(refuted) <= {s for s, b in enumerate(figures["lossy_bits"], 1) if b is not None}
    if (bench.MODELS_DIR / "camera" / "model.pt").exists():  # the camera model, measured too
        assert figures["lossy_camera_ratio"] > 1.0
        assert figures["lossy_camera_bits"] and figures["lossy_camera_accuracy_drop_pts"] >= 0
    # The verdict on the 8x target follows the measured ratio, whichever it is.
    target = [line.strip() for line in lines if line.strip().startswith("target >=")]
    assert len(target) == 1
    if zdict_half is not None:
        verdict = "met" if zdict_half >= bench.HALF_SPARSE_TARGET else "missed"
        assert target[0].endswith(f" {zdict_half:.2f}x, {verdict}")


def test_split_0_rows_measure_the_frame_against_the_float_input() -> None:
    rows = [bench.measure_input(*frames, None) for frames in bench.input_frames(6)]
    assert [(r.name, r.pixels) for r in rows] == [
        ("1x28x28", 784),
        ("3x96x96 camera", 27648),
        ("3x96x96 upscaled", 27648),
    ]
    for r in rows:
        assert r.before["float32"] == 4 * r.pixels and r.image["raw"] == 1 + r.pixels
        # What is sent is the smaller of the two filterings, below the raw frame; lossless,
        # and at most about what the float input's lossy int8 coding took.
        assert r.sent == min(r.image["filter 0+zstd"], r.image["filter 1+zstd"]) < r.pixels
        assert r.sent <= 1.05 * r.before["int8+zstd"]
    # On camera-sized frames well below it.
    assert all(r.sent < 0.8 * r.before["int8+zstd"] for r in rows[1:])
    # Enlarged frames are smooth: the gradient filter beats the plain pixels and PNG by
    # far there (PROTOCOL.md §6.8).
    upscaled = rows[2]
    assert upscaled.sent < 0.7 * min(upscaled.image["filter 0+zstd"], upscaled.image["png"])


@pytest.mark.parametrize("weights", ["random", "trained"])
def test_bench_trains_dictionaries_where_none_ship(weights: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"  # no model.zdict beside it
    if weights == "trained":
        shutil.copy(bench.DEFAULT_CHECKPOINT, checkpoint)
    acts = bench.collect_activations(str(checkpoint), 4, dict_images=20)
    assert acts.dictionaries is not None
    assert acts.dictionaries_origin == bench.TRAINED
    why = "random-weight model" if weights == "random" else f"no {tmp_path / 'model.zdict'}"
    assert why in acts.dictionaries_note
    assert len(acts.dictionaries) == len(acts.per_split) + 1  # table s = split s, from 0
    per_split = bench.split_compression(acts, acts.dictionaries)
    raw = sum(c.raw_bytes for c in per_split)
    # Even 20 training images teach tables that beat zstd sending its own (measured on these
    # 4 test images: 8.1x against 7.5x on random weights, 7.5x against 6.8x trained).
    assert raw / sum(c.zdict_bytes for c in per_split) > raw / sum(
        c.packed_bytes for c in per_split
    )
    # Without training images and no file, there is nothing to code sparse_int8_zdict with.
    bare = bench.collect_activations(str(checkpoint), 1)
    assert bare.dictionaries is None and bare.dictionaries_origin is None


def test_bench_refuses_too_few_images_to_train_dictionaries(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--checkpoint", str(tmp_path / "missing.pt"), "--dict-images", "2"])


def test_cross_entropy_counts_the_bits_of_fitted_tables() -> None:
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 2, 4000)
    symbols = contexts.copy()  # each context decides its symbol
    fitted = bench._cross_entropy_bits((symbols, contexts), (symbols, contexts), 2)
    blind = bench._cross_entropy_bits((symbols, 0 * contexts), (symbols, 0 * contexts), 2)
    # Add-half smoothing: p = 2000.5 / 2001 per symbol, about 0.0004 bits each.
    assert fitted == pytest.approx(-4000 * np.log2(2000.5 / 2001))
    assert blind == pytest.approx(4000.0, rel=1e-3)  # a fair coin: one bit per symbol
    # A context never seen in training falls back to the uniform table: one bit each.
    unseen = bench._cross_entropy_bits((symbols, contexts), (symbols[:10], contexts[:10] + 2), 2)
    assert unseen == pytest.approx(10.0)


def test_bench_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--frames", "0"])


def test_lossy_rows_follow_the_profile_widths(tmp_path: Path) -> None:
    # A copy of the shipped model whose profile gives split 8 a width of 2 bits, and none
    # elsewhere: split 8 alone crosses as sparse_uintb, smaller than sparse_int8 there.
    shipped = Path(bench.DEFAULT_CHECKPOINT)
    shutil.copy(shipped, tmp_path / "model.pt")
    doc = json.loads(shipped.with_name("profile.json").read_text())
    for entry in doc["splits"]:
        entry.pop("lossy", None)
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    plain = bench.measure_lossy(str(tmp_path / "model.pt"), 30)
    doc["splits"][8]["lossy"] = {"bits": 2, "accuracy_drop_pts": 0.0, "bound_pts": 0.5}
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    lossy = bench.measure_lossy(str(tmp_path / "model.pt"), 30)
    assert "test images 9970..9999" in lossy.images
    assert [r.split for r in lossy.splits] == list(range(1, 11))
    assert [r.bits for r in lossy.splits] == [None] * 7 + [2, None, None]
    assert plain.drop_pts is None and lossy.drop_pts is not None and lossy.drop_pts >= 0.0
    for with_width, without in zip(lossy.splits, plain.splits, strict=True):
        assert with_width.float32_bytes == without.float32_bytes
        if with_width.bits is None:
            assert with_width.sent_bytes == without.sent_bytes
        else:
            assert with_width.sent_bytes < 0.6 * without.sent_bytes
    assert lossy.ratio > plain.ratio
    # The drop comes with its sampling noise on these 30 images: 1.96 standard errors of
    # the per-image differences, at most 1.96 × 100 / √30 points.
    row = lossy.splits[7]
    assert row.margin_pts is not None and 0.0 <= row.margin_pts <= 196 / 30**0.5
    assert lossy.margin_pts == row.margin_pts and plain.margin_pts is None
    # One split with a width, two exits after it (at stages 8 and 10): two estimates.
    assert plain.drops is None and lossy.drops is not None and lossy.drops.estimates == 2
    # Beside it, the bound the profile claims (this one chose within 0.5 on the drop
    # alone) and the lower bound these images put on the drop there.
    assert row.bound_pts == 0.5 and row.lower_pts == lossy.drops.lower_pts
    assert all(r.bound_pts is None and r.lower_pts is None for r in plain.splits)
    assert lossy.refuted_splits == ([8] if row.lower_pts > 0.5 else [])
    # The images the widths were chosen on are never among those measured: widths from the
    # first test images (a profile made before they came from the training split) leave
    # only the test images after them, and none when they took them all ...
    for data in (None, "fashion-mnist/test"):
        doc.pop("precision_data", None)
        doc.update({} if data is None else {"precision_data": data})
        doc["precision_inputs"] = 9990
        (tmp_path / "profile.json").write_text(json.dumps(doc))
        fewer = bench.measure_lossy(str(tmp_path / "model.pt"), 30)
        assert "test images 9990..9999 (not the last 30" in fewer.images
        assert sum(r.float32_bytes for r in fewer.splits) * 3 == sum(
            r.float32_bytes for r in lossy.splits
        )
        doc["precision_inputs"] = 10_000
        (tmp_path / "profile.json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="first 10000 test images: none is left"):
            bench.measure_lossy(str(tmp_path / "model.pt"), 30)
    # ... while training images leave every test image held out.
    doc["precision_data"] = "fashion-mnist/train"
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    assert bench.measure_lossy(str(tmp_path / "model.pt"), 30).splits == lossy.splits


def test_drop_statistics_tell_a_real_drop_from_the_noise_of_the_largest() -> None:
    assert bench.drop_statistics([]) is None
    n = 2000
    # Nothing changes: every figure is 0.
    quiet = bench.drop_statistics([np.zeros((3, n)), np.zeros((1, n))])
    assert quiet is not None and quiet.estimates == 4
    assert quiet.pooled_pts == quiet.pooled_margin_pts == quiet.lower_pts == quiet.noise_pts == 0
    # 40 exits where the codec turns 1.5 % of the answers each way: no drop anywhere, yet
    # the largest estimate is well above 0, within what the noise gives the largest.
    rng = np.random.default_rng(1)
    noise = rng.choice(np.array([-1.0, 0.0, 1.0]), p=[0.015, 0.97, 0.015], size=(40, n))
    stats = bench.drop_statistics([noise[:30], noise[30:]])
    assert stats is not None and stats.estimates == 40
    largest = 100 * noise.mean(axis=1).max()
    assert 0.5 < largest < stats.noise_pts < 2.0
    assert stats.lower_pts < 0.5  # no exit shown above 0.5
    assert stats.pooled_pts == pytest.approx(100 * noise.mean())
    per_image = noise.mean(axis=0)
    margin = 196 * per_image.std(ddof=1) / n**0.5
    assert stats.pooled_margin_pts == pytest.approx(margin)
    # One exit that really loses 3 points (+1 on 60 more images) is shown above 0.5.
    real = noise.copy()
    real[7, np.flatnonzero(real[7] == 0)[:60]] = 1.0
    shown = bench.drop_statistics([real[:5], real[5:]])
    assert shown is not None and shown.lower_pts > 0.5
    assert shown.pooled_pts > stats.pooled_pts
    # Per split, the largest lower bound of its exits: the exit with the drop is in the
    # second array.
    assert len(shown.split_lower_pts) == 2 and shown.split_lower_pts[1] == shown.lower_pts
    assert shown.split_lower_pts[0] < 0.5


def test_a_split_is_refuted_where_an_exit_is_shown_above_the_profile_bound() -> None:
    rows = [
        bench.LossySplit(1, None, 100, 50, None),
        bench.LossySplit(2, 3, 100, 10, 0.9, 0.5, bound_pts=0.4, lower_pts=0.41),
        bench.LossySplit(3, 2, 100, 10, 0.9, 0.5, bound_pts=0.45, lower_pts=0.3),
        bench.LossySplit(4, 2, 100, 10, 0.2, 0.5, bound_pts=None, lower_pts=0.9),
    ]
    assert bench.LossyFigures("m", "images", rows).refuted_splits == [2]
