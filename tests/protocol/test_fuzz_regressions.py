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

from bench.fuzz_atheris import (
    SESSION_KINDS,
    TARGETS,
    iter_regressions,
    seeds,
    session_frames,
    session_kinds,
)

pytestmark = pytest.mark.timeout(120)

_REGRESSIONS = list(iter_regressions())


def test_the_recorded_session_has_every_kind_of_frame() -> None:
    up, down = session_frames()
    assert session_kinds(b"".join(up), b"".join(down)) >= SESSION_KINDS
    assert {"Cancel", "Error", "Infer", "Result", "Ping", "Pong"} <= SESSION_KINDS


def test_the_recorded_welcome_states_every_field_of_the_description() -> None:
    # A server states every field of its description (the control-frame rates
    # included): a corpus recorded before a field existed does not seed its decoding.
    import dataclasses

    import msgpack

    from protocol.description import Description

    _, down = session_frames()
    _, fields = msgpack.unpackb(down[0][4:], raw=False)  # [type, {fields}] (§5)
    stated = set(fields.get("description") or ())
    missing = {f.name for f in dataclasses.fields(Description)} - stated
    assert not missing, f"re-record (python -m bench.fuzz_atheris --record): {missing}"


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
