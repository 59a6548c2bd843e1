"""spinn_device.py: flags, sources from real files, clear errors, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import spinn_device

pytestmark = pytest.mark.timeout(90)


def test_help_names_sources_policy_and_sla(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        spinn_device.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--camera", "--video", "--images", "--dataset", "--rate", "--limit",
                 "--split", "--thr", "--policy", "--max-latency-ms", "--out"):  # fmt: skip
        assert flag in out, flag


def test_help_explains_policy_split_and_each_sla_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        spinn_device.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default fixed)" in out and "act only with spinn" in out
    assert "S is the model's number of stages (default: S // 2)" in out
    for flag in ("--max-latency-ms MS", "--min-throughput PER_S", "--max-server-cost-ms MS",
                 "--max-device-cost-ms MS", "--min-accuracy FRACTION", "--rank M1,M2,..."):  # fmt: skip
        after = out.split("service-level agreement", 1)[1].split(flag, 1)[1]
        assert after.split()[0] in ("limit:", "metrics"), flag


@pytest.mark.parametrize(
    ("policy", "ignored"),
    [
        ("fixed", "--max-latency-ms, --rank"),
        ("device-only", "--max-latency-ms, --rank"),
        ("edgent", "--rank"),
        ("spinn", None),
    ],  # fmt: skip
)
def test_sla_flags_unread_by_the_policy_are_warned_about(
    policy: str, ignored: str | None, checkpoint: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--no-status", "--images",
            str(_one_image(tmp_path)), "--policy", policy, "--max-latency-ms", "500",
            "--rank", "latency"]  # fmt: skip
    assert spinn_device.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "ignored with --policy" in r.getMessage()]
    if ignored is None:
        assert warnings == []
    else:
        assert warnings == [f"{ignored} ignored with --policy {policy}: the SLA acts with "
                            "--policy spinn"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "warning"),
    [
        (
            ["--policy", "spinn", "--split", "2", "--thr", "0.5"],
            "--split, --thr ignored with --policy spinn: the policy chooses split and threshold",
        ),
        (["--policy", "fixed", "--split", "2", "--thr", "0.5"], None),
        (["--device-only", "--server", "10.0.0.1:7878"], "--server ignored with --device-only"),
        (["--data-dir", "/nowhere"], "--data-dir ignored"),
    ],  # fmt: skip
)
def test_flags_the_rest_of_the_command_line_ignores_are_named(
    extra: list[str], warning: str | None
) -> None:
    args = spinn_device.build_parser().parse_args(["--images", "somewhere", *extra])
    warnings = spinn_device.unread_flags(args)
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(warning), warnings
    fashion = ["--dataset", "fashion-mnist", "--data-dir", "/nowhere"]
    assert spinn_device.unread_flags(spinn_device.build_parser().parse_args(fashion)) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "fashion-mnist", "--server", "localhost"], "expected HOST:PORT"),
        (["--dataset", "fashion-mnist", "--server", "h:99999"], "port must be in 1..65535"),
        (["--dataset", "fashion-mnist", "--thr", "1.5"], "expected a number in [0, 1]"),
        (["--dataset", "fashion-mnist", "--max-in-flight", "0"], "--max-in-flight must be >= 1"),
        (["--dataset", "fashion-mnist", "--deadline-factor", "inf"], "--deadline-factor must be"),
        (["--dataset", "fashion-mnist", "--deadline-factor", "nan"], "--deadline-factor must be"),
        (["--dataset", "fashion-mnist", "--limit", "-1"], "--limit must be >= 0"),
        (["--dataset", "fashion-mnist", "--codec", "jpeg"], "--codec: invalid choice: 'jpeg'"),
        (["--dataset", "fashion-mnist", "--zstd", "maybe"], "--zstd: invalid choice: 'maybe'"),
        (["--dataset", "fashion-mnist", "--rate", "-1"], "--rate must be a finite number >= 0"),
        (["--thr", "0.5"], "one of the arguments --camera --video --images --dataset"),
        (
            ["--dataset", "fashion-mnist", "--device-only", "--torch-threads", "0"],
            "--torch-threads must be >= 1, got 0",
        ),
        (
            ["--dataset", "fashion-mnist", "--status-interval", "-1"],
            "--status-interval must be >= 0, got -1",
        ),
        # Errors the configuration raises name fields; the command line names the flags.
        (
            ["--dataset", "fashion-mnist", "--probe-bytes", "-1"],
            "--probe-bytes must be in [0, 1048576], got -1",
        ),
        (
            ["--dataset", "fashion-mnist", "--misconfig-tries", "0"],
            "--misconfig-tries must be >= 1, got 0",
        ),
        (
            ["--dataset", "fashion-mnist", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
            "--tls-cert/--tls-key need --tls or --tls-ca",
        ),
    ],
)
def test_bad_flags_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        spinn_device.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_source_and_split_exit_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--checkpoint", str(checkpoint), "--device-only", "--no-status"]
    assert spinn_device.main([*base, "--images", str(tmp_path / "none")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert spinn_device.main([*base, "--video", str(tmp_path / "x.mp4")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert spinn_device.main([*base, "--camera", "front"]) == 2
    assert "device index or a URL" in capsys.readouterr().err
    assert spinn_device.main([*base, "--dataset", "cifar"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.zeros((28, 28), np.uint8))
    assert spinn_device.main([*base, "--images", str(tmp_path / "img"), "--split", "40"]) == 2
    assert "--split must be in 0.." in capsys.readouterr().err


def _one_image(directory: Path) -> Path:
    (directory / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(directory / "img" / "a.png"), np.zeros((28, 28), np.uint8))
    return directory / "img"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json at all", "is not valid JSON"),
        ('{"format": "spinn-profile/1"}', "bad.json: "),
    ],
)
def test_malformed_profile_is_one_line_naming_the_file(
    content: str, message: str, checkpoint: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    profile = tmp_path / "bad.json"
    profile.write_text(content)
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--no-status",
            "--images", str(_one_image(tmp_path)), "--profile", str(profile)]  # fmt: skip
    assert spinn_device.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.json" in err
    assert len(err.strip().splitlines()) == 1, err


def test_unwritable_out_is_one_line_naming_the_flag(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "no" / "such" / "dir" / "a.jsonl"
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--no-status",
            "--images", str(_one_image(tmp_path)), "--out", str(out)]  # fmt: skip
    assert spinn_device.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write --out {out}: No such file or directory" in err
    assert len(err.strip().splitlines()) == 1, err


def test_limit_0_prints_a_summary_that_is_json(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--no-status",
            "--images", str(_one_image(tmp_path)), "--limit", "0"]  # fmt: skip
    assert spinn_device.main(argv) == 0
    line = capsys.readouterr().err.split("summary ", 1)[1].splitlines()[0]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert summary["frames"] == 0 and summary["latency_ms"]["p50"] is None


def test_image_folder_device_only_writes_one_json_line_per_image(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for cls in ("c3", "c7"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / "img" / cls / f"{i}.png"), img)
    out = tmp_path / "answers.jsonl"
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--images", str(tmp_path / "img"),
            "--out", str(out), "--status-interval", "0.05", "--split", "4"]  # fmt: skip
    assert spinn_device.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["frame"] for r in records) == list(range(6))
    assert sorted(r["label"] for r in records) == [3, 3, 3, 7, 7, 7]
    for r in records:
        assert r["where"] == "device" and r["bytes_sent"] == 0
        assert set(r) >= {"class", "confidence", "exit", "latency_ms", "origin"}
    err = capsys.readouterr().err
    summary = json.loads(err.split("summary ", 1)[1].splitlines()[0])
    assert summary["frames"] == 6 and summary["labelled"] == 6


def test_video_source_stdout(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--video", str(path),
            "--no-status", "--limit", "4"]  # fmt: skip
    assert spinn_device.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert sorted(json.loads(ln)["frame"] for ln in lines) == [0, 1, 2, 3]


def test_codec_and_zstd_flags_fill_the_config() -> None:
    parse = spinn_device.build_parser().parse_args
    default = spinn_device.config_from_args(parse(["--dataset", "fashion-mnist"]))
    assert (default.link.codec, default.link.zstd) == ("sparse_int8_zdict", "auto")
    argv = ["--dataset", "fashion-mnist", "--codec", "int8", "--zstd", "always"]
    config = spinn_device.config_from_args(parse(argv))
    assert (config.link.codec, config.link.zstd) == ("int8", "always")


@pytest.mark.parametrize("flags", [["--device-only"], ["--device-only", "--policy", "device-only"]])
def test_device_only_reports_the_last_split(
    flags: list[str], checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from spinn.model.checkpoint import load_checkpoint

    stages = load_checkpoint(checkpoint)[0].num_stages
    out = tmp_path / "answers.jsonl"
    argv = ["--checkpoint", str(checkpoint), *flags, "--no-status", "--images",
            str(_one_image(tmp_path)), "--out", str(out)]  # fmt: skip
    assert spinn_device.main(argv) == 0
    # Every stage ran here: the split is S, not the middle one a server would get.
    assert [json.loads(line)["split"] for line in out.read_text().splitlines()] == [stages]
    summary = json.loads(capsys.readouterr().err.split("summary ", 1)[1].splitlines()[0])
    assert summary["split"] == stages


def test_missing_camera_names_the_next_step(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(checkpoint), "--device-only", "--no-status", "--camera", "97"]
    assert spinn_device.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "OpenCV cannot open 97: no camera at that index" in err
    assert "--video FILE, --images DIR or --dataset fashion-mnist" in err
