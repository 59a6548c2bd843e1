"""python -m bench.scheduler: the command line explains itself."""

from __future__ import annotations

import subprocess

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
