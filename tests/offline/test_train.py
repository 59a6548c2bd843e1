"""Training: the SDN loss and tau schedule, augmentation, determinism, resume, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spinn.model.checkpoint import load_checkpoint
from spinn.offline.train import (
    TrainConfig,
    augment,
    exit_cost_fractions,
    resume_path,
    sdn_loss,
    sdn_weights,
    train,
)


def test_sdn_weights_follow_design() -> None:
    costs = [0.15, 0.30, 0.45, 0.60, 0.75, 0.90]
    assert sdn_weights(0, 10, costs) == pytest.approx([0.01] * 6)
    # tau_i = min(C_i, 0.01 + epoch * C_i / epochs)
    assert sdn_weights(5, 10, costs) == pytest.approx([0.01 + 0.5 * c for c in costs])
    assert sdn_weights(10, 10, costs) == pytest.approx(costs)
    assert sdn_weights(20, 10, costs) == pytest.approx(costs)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        sdn_weights(0, 0, costs)


def test_sdn_loss_is_weighted_sum() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    want = (
        0.2 * F.cross_entropy(logits[0], y)
        + 0.5 * F.cross_entropy(logits[1], y)
        + F.cross_entropy(logits[2], y)
    )
    torch.testing.assert_close(sdn_loss(logits, y, [0.2, 0.5]), want)
    with pytest.raises(ValueError, match="3 exits need 2 weights"):
        sdn_loss(logits, y, [0.2])


def test_augment_shifts_and_flips_only() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8, generator=g)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b)
    # Without shifts every image is itself or its mirror image.
    flipped = augment(images, torch.Generator().manual_seed(2), shift=0)
    for x, y in zip(images, flipped, strict=True):
        assert torch.equal(x, y) or torch.equal(x.flip(-1), y)
    assert not torch.equal(flipped, images)


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        out=str(tmp_path / "m.pt"),
        arch="resnet20",
        width=4,
        dataset="mnist",
        epochs=2,
        batch_size=32,
        optimizer="adamw",
        lr=0.01,
        schedule="constant",
        weight_decay=0.0,
        limit_train=320,
        limit_test=200,
        threads=1,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_train_writes_a_loadable_checkpoint_with_metadata(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    seen: list[int] = []
    model, meta = train(cfg, progress=False, on_epoch=lambda e, acc: seen.append(e))
    assert seen == [1, 2]
    assert not resume_path(cfg.out).exists()
    loaded, meta2 = load_checkpoint(cfg.out)
    assert meta2.weights_sha256 == meta.weights_sha256
    assert meta2.class_names == tuple(str(d) for d in range(10))
    assert meta2.recipe["dataset"] == "mnist" and meta2.recipe["seed"] == 7
    assert meta2.recipe["epochs"] == 2 and meta2.recipe["optimizer"] == "adamw"
    acc = meta2.metrics["test_exit_accuracy"]
    assert len(acc) == loaded.num_exits
    # 320 digits, two epochs of 10 steps: the early exits (4x4-pooled features) learn
    # fastest and are well above chance (10%); the final exit is still catching up.
    assert max(acc) > 0.3
    costs = exit_cost_fractions(loaded)
    assert costs == sorted(costs) and 0 < costs[0] < costs[-1] < 1


def test_same_seed_same_weights_and_resume_matches(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    _, meta_a = train(_cfg(a), progress=False)
    # Interrupted after one epoch, then resumed: identical to the uninterrupted run.
    train(_cfg(b), progress=False, stop_after_epochs=1)
    assert resume_path(_cfg(b).out).exists()
    _, meta_b = train(_cfg(b, resume=True), progress=False)
    assert meta_b.weights_sha256 == meta_a.weights_sha256
    assert not resume_path(_cfg(b).out).exists()


def test_resume_with_other_flags_is_refused(tmp_path: Path) -> None:
    train(_cfg(tmp_path, epochs=2, limit_train=64), progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="different training configuration"):
        train(_cfg(tmp_path, epochs=2, limit_train=64, lr=0.2, resume=True), progress=False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epochs", 0, "--epochs"),
        ("lr", 0.0, "--lr"),
        ("optimizer", "lbfgs", "unknown optimizer"),
        ("schedule", "poly", "unknown schedule"),
        ("arch", "alexnet", "unknown architecture"),
    ],
)
def test_bad_settings(tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train(_cfg(tmp_path, **{field: value, "limit_train": 64}), progress=False)
