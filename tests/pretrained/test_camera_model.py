"""The shipped camera-scale model: loads, matches its sha256, reproduces its accuracy."""

from __future__ import annotations

import pytest

from spinn.decisions.offline_profile import Profile
from spinn.model.checkpoint import CheckpointMeta, load_checkpoint, read_checkpoint, weights_sha256
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import FASHION_MNIST_DIR, load_fashion_mnist_camera
from spinn.offline.evaluate import collect_probs
from spinn.pretrained import MODELS_DIR

ROOT = MODELS_DIR / "camera"
CHECKPOINT = ROOT / "model.pt"
#: models/camera/README.md states the same digest.
WEIGHTS_SHA256 = "5f00d41236a57782ab40124a3501ab103b463129998bf7f12ab7d72abf70063d"
#: Accuracy of each exit on the first 1,000 rendered test frames, measured when the model
#: was shipped (collect_probs, batch 500); the whole test set's are in the checkpoint.
FIRST_1000_ACCURACY = (0.585, 0.718, 0.777, 0.852, 0.872, 0.879, 0.884)


@pytest.fixture(scope="module")
def camera_model() -> tuple[ProgressiveModel, CheckpointMeta]:
    return load_checkpoint(CHECKPOINT)


def test_weights_load_and_match_their_sha256(
    camera_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    model, meta = camera_model
    raw = read_checkpoint(CHECKPOINT)
    assert weights_sha256(raw["state_dict"]) == meta.weights_sha256 == WEIGHTS_SHA256
    assert meta.weights_sha256 == weights_sha256(model.state_dict())
    assert CHECKPOINT.stat().st_size < 5_000_000  # small enough to ship in the repository
    assert meta.arch == "resnet18" and model.num_exits == 7
    assert meta.recipe["dataset"] == "fashion-mnist-camera"
    assert model.input_spec.shape == (3, 96, 96)
    # The ImageNet stem and its pooling: the first split holds a sixth of the input's values.
    assert model.split_shape(1) == (16, 24, 24)
    assert meta.metrics["test_size"] == 10_000
    assert meta.metrics["test_exit_accuracy"][-1] >= 0.88


def test_profile_dictionaries_and_evaluation_belong_to_these_weights(
    camera_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    model, meta = camera_model
    prof = Profile.load(ROOT / "profile.json")
    assert prof.model_id == meta.model_id
    assert prof.weights_sha256 == meta.weights_sha256
    assert prof.exit_stages == meta.exit_stages
    assert prof.num_stages == model.num_stages
    assert prof.calibration_size >= 1000
    assert (ROOT / "evaluation.md").read_text().count(meta.model_id) == 1
    assert (ROOT / "model.zdict").stat().st_size > 0


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_exit_accuracy_is_reproduced(
    camera_model: tuple[ProgressiveModel, CheckpointMeta],
) -> None:
    model, _ = camera_model
    test = load_fashion_mnist_camera("test", limit=1000)
    probs, labels = collect_probs(model, test, batch_size=500)
    accuracy = (probs.argmax(dim=2) == labels.unsqueeze(0)).double().mean(dim=1).tolist()
    assert len(accuracy) == len(FIRST_1000_ACCURACY)
    for got, want in zip(accuracy, FIRST_1000_ACCURACY, strict=True):
        assert abs(got - want) <= 0.002  # within 0.2 points
