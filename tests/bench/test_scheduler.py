"""python -m bench.scheduler: the command line explains itself, and the decision part runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.runtime import PYTHON, ROOT


def test_help_names_the_module_and_explains_every_option() -> None:
    out = subprocess.run(
        [PYTHON, "-m", "bench.scheduler", "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m bench.scheduler")
    assert "relative error" in " ".join(out.stdout.split())
    help_lines = out.stdout.split("options:", 1)[1]
    for flag in ("--calls", "--profile", "--seed", "--checkpoint", "--no-e2e", "--frames",
                 "--warmup"):  # fmt: skip
        # Each option is followed by words on its line or the next, not by the next flag.
        after = help_lines.split(flag, 1)[1].lstrip(" ABCDEFGHIJKLMNOPQRSTUVWXYZ_\n")
        assert after and not after.startswith("-"), flag


def test_bench_decision_part_runs_and_ends_with_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import os

    from bench.scheduler import main

    before = os.sched_getaffinity(0)
    assert main(["--calls", "30", "--no-e2e", "--profile", str(tmp_path / "none.json")]) == 0
    assert os.sched_getaffinity(0) == before  # the one-core pin is undone
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "scheduler" and last["decision_ms"] > 0
