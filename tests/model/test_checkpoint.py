"""Checkpoints: round trip, sha256, model id, and refusal of bad or unsafe files."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest
import torch

from spinn.model.checkpoint import (
    CheckpointError,
    ModelConfig,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from spinn.model.progressive import InputSpec, ProgressiveModel

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.3,), std=(0.35,))
CONFIG = ModelConfig(arch="resnet20", input_spec=SPEC, num_classes=4, arch_options={"width": 4})
NAMES = ("a", "b", "c", "d")


@functools.cache
def _model() -> ProgressiveModel:
    torch.manual_seed(0)
    model = CONFIG.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _save(tmp_path: Path, name: str = "m.pt") -> Path:
    path = tmp_path / name
    save_checkpoint(
        path, _model(), CONFIG, class_names=NAMES, recipe={"epochs": 1, "torch": torch.__version__}
    )
    return path


def test_round_trip_gives_same_outputs_and_meta(tmp_path: Path) -> None:
    path = _save(tmp_path)
    model, meta = load_checkpoint(path)
    assert not model.training
    x = torch.randn(3, *SPEC.shape)
    with torch.no_grad():
        for a, b in zip(model(x), _model()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert meta.arch == "resnet20"
    assert meta.input_spec == SPEC
    assert meta.class_names == NAMES
    assert meta.exit_stages == tuple(model.exit_stages)
    assert meta.exit_fractions == CONFIG.exit_fractions
    assert meta.recipe["epochs"] == 1
    assert meta.weights_sha256 == weights_sha256(_model().state_dict())
    assert meta.model_id == f"resnet20-{meta.weights_sha256[:16]}"


def test_sha256_is_deterministic_and_sensitive() -> None:
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    digest = weights_sha256(state)
    assert digest == weights_sha256(dict(reversed(list(state.items()))))
    key = next(k for k in state if k.endswith("weight"))
    state[key].view(-1)[0] += 1e-6
    assert weights_sha256(state) != digest


def test_edited_weights_are_detected(tmp_path: Path) -> None:
    path = _save(tmp_path)
    payload = read_checkpoint(path)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key].view(-1)[0] += 1.0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not match the recorded"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "spinn-checkpoint/1", "meta": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert "code ran" not in capsys.readouterr().out


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint file"):
        load_checkpoint(junk)
    # torch alone reports this one as KeyError(101), the byte 'e'.
    text = tmp_path / "notes.pt"
    text.write_text("epochs: 8\n")
    with pytest.raises(CheckpointError, match=r"notes.pt' is not a torch checkpoint file") as info:
        load_checkpoint(text)
    assert "101" not in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="is not a spinn-checkpoint/1 checkpoint"):
        load_checkpoint(other)
    bad_meta = tmp_path / "bad_meta.pt"
    torch.save({"format": "spinn-checkpoint/1", "meta": {"config": {}}, "state_dict": {}}, bad_meta)
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(bad_meta)


def test_user_code_needs_permission(tmp_path: Path) -> None:
    path = _save(tmp_path)
    payload = read_checkpoint(path)
    payload["meta"]["config"]["arch"] = "some_module:build"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="allow_user_code"):
        load_checkpoint(path)


def test_class_names_must_match(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="3 class names"):
        save_checkpoint(tmp_path / "x.pt", _model(), CONFIG, class_names=("a", "b", "c"))


def test_unstorable_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot store object"):
        save_checkpoint(
            tmp_path / "x.pt", _model(), CONFIG, class_names=NAMES, recipe={"x": object()}
        )
