"""Joint training of every exit with the Shallow-Deep-Networks loss (docs/DESIGN.md part 1).

``loss = sum_i tau_i * CE_i + CE_final`` with ``tau_i = min(C_i, 0.01 + epoch * C_i / epochs)``
(Kaya et al., "Shallow-Deep Networks", section 4.1): early exits start with a small
weight and grow to ``C_i``, the share of the backbone's FLOPs at exit i, so early exits
do not pull the shared trunk away from the final classifier ("overthinking").
Every epoch writes the checkpoint plus a resume file (optimiser, scheduler and random
state); ``resume=True`` continues from it and gives the same weights as an
uninterrupted run with the same seed and thread count.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from spinn.model.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    ModelConfig,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from spinn.model.inference import exit_probs
from spinn.model.progressive import DEFAULT_EXIT_FRACTIONS, InputSpec, ProgressiveModel
from spinn.offline.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ImageSet,
    load_dataset,
)

__all__ = [
    "TrainConfig",
    "augment",
    "evaluate_exits",
    "exit_cost_fractions",
    "resume_path",
    "sdn_loss",
    "sdn_weights",
    "train",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """A training run; the CLI (spinn train) only fills this in."""

    out: str
    """Checkpoint path to write (the resume file sits beside it)."""
    arch: str = "resnet20"
    """Built-in architecture (resnet20, resnet56, mobilenet_v2, vgg16_bn) or module:callable."""
    width: float | None = None
    """Backbone width option (ResNet base channels; multiplier for the others); None = default."""
    dataset: str = "fashion-mnist"
    """fashion-mnist, mnist, an image folder (with train/ and test/) or a .npz file."""
    test_dataset: str | None = None
    """Held-out set when ``dataset`` is a path (.npz or folder); named sets use their test split."""
    data_dir: str | None = None
    """Where Fashion-MNIST's IDX files live (default: Debian's location)."""
    size: int | None = None
    """Input height = width for image folders; default: the data's own size."""
    channels: int | None = None
    """Input channels for image folders (1 or 3); default 1."""
    epochs: int = 8
    """Training epochs."""
    batch_size: int = 128
    """Mini-batch size."""
    optimizer: str = "sgd"
    """sgd (Nesterov momentum) or adamw."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    schedule: str = "onecycle"
    """Learning-rate schedule per step: onecycle, cosine or constant."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    augment: bool = True
    """Random shifts by up to 2 pixels and horizontal flips (plain torch)."""
    exit_fractions: tuple[float, ...] = DEFAULT_EXIT_FRACTIONS
    """Exit positions as shares of backbone FLOPs."""
    seed: int = 0
    """Seed of every random choice (init, shuffling, augmentation)."""
    threads: int = 2
    """torch intra-op threads (recorded; part of determinism)."""
    limit_train: int | None = None
    """Train on N images drawn with ``seed``, every class in its share (``ImageSet.sample``)."""
    limit_test: int | None = None
    """Evaluate each epoch on N test images drawn the same way."""
    resume: bool = False
    """Continue from the resume file beside ``out`` if it exists."""
    keep_resume: bool = False
    """Keep the resume file after the last epoch."""
    extra_recipe: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored in the checkpoint's recipe."""


def sdn_weights(epoch: int, epochs: int, costs: Sequence[float]) -> list[float]:
    """tau_i = min(C_i, 0.01 + epoch * C_i / epochs) for each early exit (epoch from 0)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return [min(c, 0.01 + epoch * c / epochs) for c in costs]


def sdn_loss(
    logits: Sequence[Tensor], target: Tensor, taus: Sequence[float], *, label_smoothing: float = 0.0
) -> Tensor:
    """sum_i tau_i * CE(early exit i) + CE(final exit)."""
    if len(taus) != len(logits) - 1:
        raise ValueError(f"{len(logits)} exits need {len(logits) - 1} weights, got {len(taus)}")
    loss = F.cross_entropy(logits[-1], target, label_smoothing=label_smoothing)
    for tau, z in zip(taus, logits[:-1], strict=True):
        loss = loss + tau * F.cross_entropy(z, target, label_smoothing=label_smoothing)
    return loss


def exit_cost_fractions(model: ProgressiveModel) -> list[float]:
    """C_i: share of the backbone's FLOPs computed before each early exit."""
    total = sum(model.stage_flops)
    out = []
    for k in model.exit_stages[:-1]:
        out.append(sum(model.stage_flops[: k + 1]) / total)
    return out


def augment(images: Tensor, gen: torch.Generator, *, shift: int = 2) -> Tensor:
    """Random shifts (zero padding) and horizontal flips of a uint8 batch, plain torch."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    c = images.shape[1]
    rows = rows.expand(n, c, h, w)
    cols = cols.expand(n, c, h, w)
    flat = padded.reshape(n, c, -1)
    idx = rows * (w + 2 * shift) + cols
    out = flat.gather(2, idx.reshape(n, c, -1)).reshape(n, c, h, w)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def evaluate_exits(
    model: ProgressiveModel, data: ImageSet, *, batch_size: int = 500
) -> list[float]:
    """Accuracy of every exit on ``data`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(model.num_exits)
    for i in range(0, len(data), batch_size):
        x = model.input_spec.preprocess(data.images[i : i + batch_size])
        probs = exit_probs(model, x)
        y = data.labels[i : i + batch_size]
        correct += (probs.argmax(dim=2) == y.unsqueeze(0)).sum(dim=1).float()
    model.train(was_training)
    return [float(c) / max(1, len(data)) for c in correct]


def resume_path(out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".resume")


def _load_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet]:
    size = (cfg.size, cfg.size) if cfg.size else (28, 28)
    channels = cfg.channels or 1
    kw: dict[str, Any] = {"data_dir": cfg.data_dir, "channels": channels, "size": size}
    train_set = load_dataset(cfg.dataset, "train", **kw)
    if cfg.test_dataset is not None:
        test_set = load_dataset(cfg.test_dataset, "test", **kw)
    elif cfg.dataset.endswith(".npz"):
        raise ValueError("a .npz training set needs --test-dataset for the held-out set")
    else:
        test_set = load_dataset(cfg.dataset, "test", **kw)
    if test_set.shape != train_set.shape:
        raise ValueError(f"train images {train_set.shape} and test images {test_set.shape} differ")
    return (
        train_set.sample(cfg.limit_train, seed=cfg.seed),
        test_set.sample(cfg.limit_test, seed=cfg.seed),
    )


def _input_spec(cfg: TrainConfig, data: ImageSet) -> InputSpec:
    c, h, w = data.shape
    if cfg.dataset in ("fashion-mnist", "fashion_mnist", "fmnist"):
        mean: tuple[float, ...] = (FASHION_MNIST_MEAN,)
        std: tuple[float, ...] = (FASHION_MNIST_STD,)
    else:
        mean, std = data.mean_std()
    return InputSpec(channels=c, height=h, width=w, mean=mean, std=std)


def _make_optimizer(cfg: TrainConfig, model: ProgressiveModel) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")


def _make_schedule(
    cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.15
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use onecycle, cosine or constant")


def _validate(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, list[float]], None] | None = None,
    stop_after_epochs: int | None = None,
    on_model: Callable[[ProgressiveModel], None] | None = None,
) -> tuple[ProgressiveModel, CheckpointMeta]:
    """Train, writing ``cfg.out`` after every epoch; returns the final model and metadata.

    ``on_model`` sees the progressive model once it is built, before the first epoch
    (``spinn train`` prints where the splits and exits fell).

    ``stop_after_epochs`` ends the run early (as an interruption would) after that many
    epochs of this call, leaving the resume file in place.
    """
    _validate(cfg)
    torch.set_num_threads(cfg.threads)
    train_set, test_set = _load_data(cfg)
    spec = _input_spec(cfg, train_set)
    options: dict[str, Any] = {}
    if cfg.width is not None:
        options["width"] = int(cfg.width) if cfg.arch.startswith("resnet") else float(cfg.width)
    mcfg = ModelConfig(
        arch=cfg.arch,
        input_spec=spec,
        num_classes=len(train_set.class_names),
        arch_options=options,
        exit_fractions=tuple(cfg.exit_fractions),
    )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = mcfg.build().train()
    if on_model is not None:
        on_model(model)
    costs = exit_cost_fractions(model)
    steps_per_epoch = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    opt = _make_optimizer(cfg, model)
    sched = _make_schedule(cfg, opt, steps_per_epoch * cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    rpath = resume_path(cfg.out)
    if cfg.resume and rpath.exists():
        payload = read_checkpoint(rpath)
        extra = payload.get("extra")
        if not isinstance(extra, dict) or "optimizer" not in extra:
            raise CheckpointError(f"{rpath} holds no resume state")
        if extra.get("train_config") != _config_record(cfg):
            raise CheckpointError(
                f"{rpath} was written by a different training configuration; "
                "start afresh (delete it) or use the same flags"
            )
        model.load_state_dict(payload["state_dict"])
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        gen.set_state(extra["generator"])
        torch.set_rng_state(extra["torch_rng"])
        start_epoch = int(extra["epoch"])
        history = list(extra.get("history", []))
        log.info("resuming from %s at epoch %d", rpath, start_epoch)
    recipe = {
        **_config_record(cfg),
        "dataset_name": train_set.name,
        "train_size": len(train_set),
        "torch": str(torch.__version__),
        **cfg.extra_recipe,
    }
    meta: CheckpointMeta | None = None
    epochs_done = 0
    for epoch in range(start_epoch, cfg.epochs):
        taus = sdn_weights(epoch, cfg.epochs, costs)
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            mininterval=2.0,
        )
        running_loss = 0.0
        correct = torch.zeros(model.num_exits)
        seen = 0
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            images = train_set.images[idx]
            if cfg.augment:
                images = augment(images, gen)
            x = spec.preprocess(images)
            y = train_set.labels[idx]
            logits = model(x)
            loss = sdn_loss(logits, y, taus, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                correct += torch.stack([(z.argmax(1) == y).sum() for z in logits]).float()
            seen += len(y)
            lv = float(loss.detach())
            running_loss = 0.98 * running_loss + 0.02 * lv if step else lv
            if progress and step % 20 == 0:
                accs = " ".join(f"{100 * float(c) / seen:.0f}" for c in correct)
                bar.set_postfix_str(f"loss {running_loss:.3f} exit acc% {accs}")
        bar.close()
        test_acc = evaluate_exits(model, test_set)
        train_acc = [float(c) / max(1, seen) for c in correct]
        history.append(
            {
                "epoch": epoch + 1,
                "loss": running_loss,
                "train_exit_accuracy": train_acc,
                "test_exit_accuracy": test_acc,
                "seconds": time.perf_counter() - t0,
            }
        )
        log.info(
            "epoch %d/%d loss %.4f test exit accuracy %s (%.0fs)",
            epoch + 1,
            cfg.epochs,
            running_loss,
            " ".join(f"{100 * a:.2f}" for a in test_acc),
            time.perf_counter() - t0,
        )
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: test accuracy per exit "
                + " ".join(f"{100 * a:.2f}%" for a in test_acc)
            )
        metrics = {
            "epochs_done": epoch + 1,
            "test_set": test_set.name,
            "test_size": len(test_set),
            "test_exit_accuracy": test_acc,
            "history": history,
        }
        model.eval()
        meta = save_checkpoint(
            cfg.out, model, mcfg, class_names=train_set.class_names, recipe=recipe, metrics=metrics
        )
        save_checkpoint(
            rpath,
            model,
            mcfg,
            class_names=train_set.class_names,
            recipe=recipe,
            metrics=metrics,
            extra={
                "epoch": epoch + 1,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "train_config": _config_record(cfg),
            },
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, test_acc)
        epochs_done += 1
        if stop_after_epochs is not None and epochs_done >= stop_after_epochs:
            break
    else:
        if not cfg.keep_resume and rpath.exists():
            rpath.unlink()
    if meta is None:
        # Resumed a run that had already finished: the checkpoint is the answer.
        return load_checkpoint(cfg.out, allow_user_code=True)
    return model.eval(), meta


def _config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe fields that define a run (paths and run control left out)."""
    rec = asdict(cfg)
    for key in ("out", "resume", "keep_resume", "extra_recipe", "data_dir"):
        rec.pop(key)
    rec["exit_fractions"] = list(cfg.exit_fractions)
    return rec
