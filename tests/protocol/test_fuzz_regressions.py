"""Inputs the coverage-guided fuzzer found, and its seeds, replayed through its targets.

``python -m bench.fuzz --engine atheris`` saves each input that broke a target (anything
but ``ProtocolError`` escaped, or memory ran past its bound) into
``tests/fuzz_regressions/<target>/``; each stays here as a regression test. The targets are
plain functions (``bench.fuzz_atheris.TARGETS``): no atheris is needed to replay them.
The seeds, frames of a recorded real session, run too, so every target is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz_atheris import TARGETS, iter_regressions, seeds, session_frames

pytestmark = pytest.mark.timeout(120)

_REGRESSIONS = list(iter_regressions())


def test_the_recorded_session_has_every_kind_of_frame() -> None:
    import msgpack

    from protocol import Cancel, Error, Hello, Infer, Ping, Pong, Result, Welcome
    from protocol.messages import decode_message

    up, down = session_frames()
    kinds = {type(decode_message(msgpack.unpackb(f[4:], raw=False))) for f in up + down}
    assert {Hello, Welcome, Infer, Result, Cancel, Ping, Pong, Error} <= kinds, kinds


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_pass_every_target(target: str) -> None:
    inputs = seeds(target)
    assert inputs
    for data in inputs:
        TARGETS[target](data)
        TARGETS[target](data[: len(data) // 2])  # cut inside a frame or a payload


@pytest.mark.parametrize(
    "target,path", _REGRESSIONS, ids=[f"{t}/{p.name}" for t, p in _REGRESSIONS]
)
def test_saved_crash_input_no_longer_crashes(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())
