"""Tests for spinn.decisions.offline_profile: validation, JSON round trip and the derived quantities."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest

from spinn.decisions.offline_profile import (
    FORMAT,
    LossyChoice,
    Precision,
    Profile,
    ProfileError,
    synthetic_profile,
)


def small_doc() -> dict[str, Any]:
    """S = 4 stages, exits after stages 1 and 3 (the last is the final exit)."""
    return {
        "format": FORMAT,
        "model_id": "m1",
        "weights_sha256": "ab" * 32,
        "arch": "resnet20",
        "num_stages": 4,
        "exit_stages": [1, 3],
        "splits": [
            {
                "split": s,
                "shape": [4, 2, 2],
                "numel": 16,
                "bytes": {"float32": 64, "sparse": 20 + s},
            }
            for s in range(4)
        ],
        "stage_device_ms": [1.0, 2.0, 3.0, 4.0],
        "stage_server_ms": [0.1, 0.2, 0.3, 0.4],
        "exit_accuracy": [0.6, 0.9],
        "thresholds": [
            {"thr_conf": 0.5, "exit_rate": [0.7, 0.3], "accuracy": 0.8},
            {"thr_conf": 0.8, "exit_rate": [0.4, 0.6], "accuracy": 0.88},
            {"thr_conf": 0.9, "exit_rate": [0.2, 0.8], "accuracy": 0.895},
        ],
        "calibration_size": 500,
        "device_threads": 1,
        "server_threads": 4,
        "created": "2026-11-25T12:00:00Z",
    }


def test_round_trip(tmp_path: Path) -> None:
    prof = Profile.from_dict(small_doc())
    path = tmp_path / "profile.json"
    prof.save(path)
    again = Profile.load(path)
    assert again == prof
    assert json.loads(path.read_text())["format"] == FORMAT
    assert again.to_dict() == small_doc()


def test_timings() -> None:
    prof = Profile.from_dict(small_doc())
    assert prof.device_time_ms(0) == 0.0
    assert prof.device_time_ms(2) == pytest.approx(3.0)
    assert prof.device_time_ms(4) == pytest.approx(10.0)
    assert prof.server_time_ms(0) == pytest.approx(1.0)
    assert prof.server_time_ms(2) == pytest.approx(0.7)
    assert prof.server_time_ms(4) == 0.0
    assert prof.server_time_ms(1, stop=2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="out of range"):
        prof.device_time_ms(5)
    with pytest.raises(ValueError, match="before split"):
        prof.server_time_ms(3, stop=2)


def test_threshold_lookup_resolves_at_or_above() -> None:
    prof = Profile.from_dict(small_doc())
    assert prof.exit_rate(0.8) == (0.4, 0.6)
    assert prof.exit_rate(0.6) == (0.4, 0.6)  # between 0.5 and 0.8 -> 0.8
    assert prof.exit_rate(0.0) == (0.7, 0.3)  # below the grid -> lowest point
    assert prof.exit_rate(0.8 + 1e-12) == (0.4, 0.6)  # float noise stays on the point
    assert prof.accuracy(0.85) == 0.895
    # None (no early exit), and above the grid: the final exit alone, its accuracy.
    assert prof.exit_rate(0.95) == (0.0, 1.0)
    assert prof.exit_rate(None) == (0.0, 1.0)
    assert prof.accuracy(None) == 0.9
    assert prof.threshold_index(None) is None
    for bad in (math.nan, 2.0, -0.1, True):
        with pytest.raises(ValueError, match="thr_conf"):
            prof.accuracy(bad)


def test_reach_and_expected_times() -> None:
    prof = Profile.from_dict(small_doc())
    # The exit after stage 1 is on the device only for splits >= 2.
    assert prof.reach_prob(0, 0.5) == 1.0
    assert prof.reach_prob(2, 0.5) == pytest.approx(0.3)
    assert prof.reach_prob(4, 0.5) == 0.0
    assert prof.expected_device_ms(4, 0.5) == pytest.approx(1.0 + 2.0 + 0.3 * (3.0 + 4.0))
    assert prof.expected_device_ms(4, None) == pytest.approx(10.0)
    # Uploaded at split 1, the server exits after stage 1 for 70% of inputs.
    assert prof.expected_server_ms(1, 0.5) == pytest.approx(0.2 + 0.3 * (0.3 + 0.4))
    assert prof.expected_server_ms(2, 0.5) == pytest.approx(0.7)
    assert prof.expected_server_ms(4, 0.5) == 0.0
    assert prof.packed_bytes(2) == 22
    assert prof.packed_bytes(2, "float32") == 64
    assert prof.packed_bytes(4) == 0
    assert prof.codecs == ("float32", "sparse")
    with pytest.raises(ValueError, match="codec 'zstd'"):
        prof.packed_bytes(1, "zstd")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(format="spinn-profile/0"), "format"),
        (lambda d: d.pop("arch"), "arch"),
        (lambda d: d.update(num_stages=0), "num_stages"),
        (lambda d: d.update(exit_stages=[1, 2]), "exit_stages"),
        (lambda d: d.update(exit_stages=[3, 1, 3]), "exit_stages"),
        (lambda d: d["splits"].pop(), "splits"),
        (lambda d: d["splits"][2].update(split=3), "splits[2].split"),
        (lambda d: d["splits"][1].update(numel=17), "splits[1].numel"),
        (lambda d: d["splits"][1].update(bytes={}), "splits[1].bytes"),
        (lambda d: d["splits"][0]["bytes"].update(sparse=-1), "splits[0].bytes['sparse']"),
        (lambda d: d["stage_device_ms"].__setitem__(2, -1.0), "stage_device_ms[2]"),
        (lambda d: d["stage_server_ms"].__setitem__(0, "fast"), "stage_server_ms[0]"),
        (lambda d: d["stage_server_ms"].__setitem__(0, math.inf), "stage_server_ms[0]"),
        (lambda d: d.update(exit_accuracy=[0.5]), "exit_accuracy"),
        (lambda d: d["thresholds"][1].update(exit_rate=[0.5, 0.6]), "thresholds[1].exit_rate"),
        (lambda d: d["thresholds"][1].update(thr_conf=1.5), "thresholds[1].thr_conf"),
        (lambda d: d["thresholds"][2].update(thr_conf=0.5), "thresholds"),
        (lambda d: d["thresholds"][0].pop("accuracy"), "thresholds[0].accuracy"),
        (lambda d: d.update(thresholds=[]), "thresholds"),
        (lambda d: d.update(calibration_size=True), "calibration_size"),
    ],
)
def test_validation_names_the_field(mutate: Any, field: str) -> None:
    doc = small_doc()
    mutate(doc)
    with pytest.raises(ProfileError, match=rf"field {re.escape(field)}:"):
        Profile.from_dict(doc)


def test_unknown_field_and_bad_file(tmp_path: Path) -> None:
    doc = small_doc()
    doc["stage_gpu_ms"] = [1, 2, 3, 4]
    with pytest.raises(ProfileError, match="stage_gpu_ms"):
        Profile.from_dict(doc)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(bad)
    bad.write_text(json.dumps({**small_doc(), "num_stages": "4"}))
    with pytest.raises(ProfileError, match=r"bad.json: profile field num_stages"):
        Profile.load(bad)


def test_synthetic_profiles_validate_and_round_trip(tmp_path: Path) -> None:
    rng = random.Random(7)
    for _ in range(5):
        prof = synthetic_profile(rng, num_stages=rng.randint(1, 20), num_exits=1)
        assert prof.exit_rate(0.0) == (1.0,)
        prof = synthetic_profile(rng, num_stages=20, num_exits=7, num_thresholds=20)
        prof.save(tmp_path / "p.json")
        assert Profile.load(tmp_path / "p.json") == prof
        # The share uploaded never grows with the split.
        for thr in prof.thr_grid:
            reach = [prof.reach_prob(s, thr) for s in range(prof.num_stages + 1)]
            assert all(b <= a + 1e-12 for a, b in zip(reach, reach[1:], strict=False))


def test_lossy_width_per_split_round_trips_and_old_profiles_still_load(tmp_path: Path) -> None:
    # A profile made before sparse_uintb has no "lossy" entries: it loads with none.
    old = Profile.from_dict(small_doc())
    assert all(sp.lossy is None for sp in old.splits)
    doc = small_doc()
    doc["splits"][2]["lossy"] = {"bits": 3, "accuracy_drop_pts": 0.2, "bound_pts": 0.5}
    doc["splits"][3]["lossy"] = None  # null reads as none, and is not written back
    prof = Profile.from_dict(doc)
    assert prof.splits[2].lossy == LossyChoice(bits=3, accuracy_drop_pts=0.2, bound_pts=0.5)
    assert prof.splits[3].lossy is None
    path = tmp_path / "profile.json"
    prof.save(path)
    assert Profile.load(path) == prof
    written = json.loads(path.read_text())["splits"]
    assert written[2]["lossy"]["bits"] == 3 and "lossy" not in written[3]
    assert Profile.from_dict(prof.to_dict()).to_dict() == prof.to_dict()


@pytest.mark.parametrize(
    ("lossy", "message"),
    [
        ({"bits": 9, "accuracy_drop_pts": 0.1, "bound_pts": 0.5}, r"splits\[1\]\.lossy\.bits"),
        ({"bits": 0, "accuracy_drop_pts": 0.1, "bound_pts": 0.5}, r"splits\[1\]\.lossy\.bits"),
        ({"bits": 4, "bound_pts": 0.5}, r"lossy\.accuracy_drop_pts: missing"),
        ({"bits": 4, "accuracy_drop_pts": -1, "bound_pts": 0.5}, "accuracy_drop_pts"),
        ([4], r"splits\[1\]\.lossy: expected an object"),
    ],
)
def test_bad_lossy_width_is_named(lossy: object, message: str) -> None:
    doc = small_doc()
    doc["splits"][1]["lossy"] = lossy
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(doc)


def test_on_slower_device_scales_the_device_stages_only() -> None:
    prof = Profile.from_dict(small_doc())
    slow = prof.on_slower_device(2.5)
    again = dataclasses.replace(prof, stage_device_ms=tuple(2.5 * t for t in prof.stage_device_ms))
    assert slow == again
    assert slow.device_time_ms(prof.num_stages) == pytest.approx(
        2.5 * prof.device_time_ms(prof.num_stages)
    )
    assert slow.server_time_ms(0) == prof.server_time_ms(0)
    with pytest.raises(ValueError, match="slowdown"):
        prof.on_slower_device(0.0)


def test_precisions_round_trip_and_a_lossy_only_profile_offers_its_one_width(
    tmp_path: Path,
) -> None:
    doc = small_doc()
    widths = [
        {"bits": 2, "bytes": {"sparse_uintb": 9, "sparse_uintb+zstd": 7},
         "accuracy_drop_pts": 1.5, "drop_bound_pts": 2.0},
        {"bits": 3, "bytes": {"sparse_uintb": 12}, "accuracy_drop_pts": 0.1,
         "drop_bound_pts": 0.4},
    ]  # fmt: skip
    doc["splits"][2]["precisions"] = widths
    doc["splits"][2]["lossy"] = {
        "bits": 3, "accuracy_drop_pts": 0.1, "bound_pts": 0.5, "drop_bound_pts": 0.4
    }  # fmt: skip
    doc["splits"][2]["bytes"]["sparse_uintb"] = 12
    doc["precision_inputs"] = 8000
    doc["precision_data"] = "fashion-mnist/train"
    prof = Profile.from_dict(doc)
    sp = prof.splits[2]
    assert [w.bits for w in sp.precisions] == [2, 3] and sp.lossy_options() == sp.precisions
    assert sp.precision(2) == Precision(2, {"sparse_uintb": 9, "sparse_uintb+zstd": 7}, 1.5, 2.0)
    assert sp.lossy is not None and sp.lossy.drop_bound_pts == 0.4
    with pytest.raises(ValueError, match="no sparse_uintb width 4"):
        sp.precision(4)
    # The lossless look-up never answers with a lossy size.
    assert prof.packed_bytes(2) == min(v for k, v in sp.bytes.items() if k != "sparse_uintb")
    assert prof.precision_inputs == 8000 and prof.precision_data == "fashion-mnist/train"
    with pytest.raises(ProfileError, match="precision_data"):
        Profile.from_dict({**doc, "precision_data": 1})
    path = tmp_path / "profile.json"
    prof.save(path)
    assert Profile.load(path) == prof
    # A profile with only the chosen width (made before the widths were kept): it is the
    # one option, at its measured drop.
    del doc["splits"][2]["precisions"]
    doc["splits"][2]["lossy"] = {"bits": 3, "accuracy_drop_pts": 0.1, "bound_pts": 0.5}
    old = Profile.from_dict(doc).splits[2]
    assert old.lossy_options() == (Precision(3, {"sparse_uintb": 12}, 0.1, 0.1),)


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([{"bits": 3, "bytes": {"x": 1}, "accuracy_drop_pts": 0.1}], r"drop_bound_pts: missing"),
        ([{"bits": 9, "bytes": {"x": 1}, "accuracy_drop_pts": 0.1, "drop_bound_pts": 0.2}],
         r"precisions\[0\]\.bits"),
        ([{"bits": 3, "bytes": {}, "accuracy_drop_pts": 0.1, "drop_bound_pts": 0.2}],
         r"precisions\[0\]\.bytes"),
        ([{"bits": 3, "bytes": {"x": 1}, "accuracy_drop_pts": 0.1, "drop_bound_pts": 0.2},
          {"bits": 2, "bytes": {"x": 1}, "accuracy_drop_pts": 0.1, "drop_bound_pts": 0.2}],
         "strictly ascending"),
        ("3", r"splits\[1\]\.precisions: expected a list"),
    ],
)  # fmt: skip
def test_bad_precisions_are_named(widths: object, message: str) -> None:
    doc = small_doc()
    doc["splits"][1]["precisions"] = widths
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(doc)
