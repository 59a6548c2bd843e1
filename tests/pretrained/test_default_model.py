"""The shipped default model: loads, matches its sha256, reproduces its test accuracy."""

from __future__ import annotations

import json

import pytest

from spinn.decisions.offline_profile import Profile
from spinn.model.checkpoint import CheckpointMeta, load_checkpoint, read_checkpoint, weights_sha256
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import FASHION_MNIST_DIR, load_fashion_mnist
from spinn.offline.evaluate import collect_probs
from spinn.pretrained import DEFAULT_CHECKPOINT

ROOT = DEFAULT_CHECKPOINT.parent
CHECKPOINT = ROOT / "model.pt"


@pytest.fixture(scope="module")
def default_model() -> tuple[ProgressiveModel, CheckpointMeta]:
    """Loaded once: loading verifies the weights' sha256, which takes seconds here."""
    return load_checkpoint(CHECKPOINT)


def test_weights_load_and_match_their_sha256(
    default_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    model, meta = default_model
    raw = read_checkpoint(CHECKPOINT)
    assert weights_sha256(raw["state_dict"]) == meta.weights_sha256
    assert meta.weights_sha256 == weights_sha256(model.state_dict())
    assert CHECKPOINT.stat().st_size < 5_000_000  # small enough to ship in the repository
    assert meta.arch == "resnet20" and model.num_exits == 7
    assert meta.recipe["dataset"] == "fashion-mnist"
    assert meta.metrics["test_size"] == 10_000


def test_profile_and_evaluation_belong_to_these_weights(
    default_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    _, meta = default_model
    prof = Profile.load(ROOT / "profile.json")
    assert prof.model_id == meta.model_id
    assert prof.weights_sha256 == meta.weights_sha256
    assert prof.exit_stages == meta.exit_stages
    assert (ROOT / "evaluation.md").read_text().count(meta.model_id) == 1
    doc = json.loads((ROOT / "profile.json").read_text())
    assert doc["calibration_size"] >= 1000


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_recorded_test_accuracy_is_reproduced(
    default_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    # The full 10,000-image test set, batched, every exit in one forward pass; one
    # intra-op thread (tests/conftest.py) is fastest on two cores shared with other work.
    model, meta = default_model
    test = load_fashion_mnist("test")
    probs, labels = collect_probs(model, test, batch_size=1000)
    accuracy = (probs.argmax(dim=2) == labels.unsqueeze(0)).double().mean(dim=1).tolist()
    recorded = meta.metrics["test_exit_accuracy"]
    assert len(accuracy) == len(recorded)
    for got, want in zip(accuracy, recorded, strict=True):
        assert abs(got - want) <= 0.002  # within 0.2 points
    assert accuracy[-1] >= 0.90  # the final exit's target (README, default model)
