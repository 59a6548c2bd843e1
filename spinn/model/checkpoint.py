"""Checkpoints: weights plus the metadata needed to rebuild the progressive model.

A checkpoint is a ``torch.save`` of plain containers (str, int, float, list, dict)
and tensors, loaded with ``weights_only=True`` so that a file can never run code
(docs/ARCHITECTURE.md, "Checkpoint"). The model is rebuilt from its recorded
architecture and options by the generator, then the weights are loaded strictly and
their sha256 is checked against the recorded one. ``model_id`` names the exact
weights in the device-server handshake.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spinn.model.backbones import build_backbone
from spinn.model.progressive import (
    DEFAULT_EXIT_FRACTIONS,
    InputSpec,
    ProgressiveModel,
    make_progressive,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMeta",
    "ModelConfig",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "weights_sha256",
]

CHECKPOINT_FORMAT = "spinn-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, malformed, or does not match its metadata."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the generator needs to rebuild the same progressive model."""

    arch: str
    """Built-in architecture name (spinn.model.backbones.ARCHITECTURES) or 'module:callable'."""
    input_spec: InputSpec
    """Input shape and normalisation."""
    num_classes: int
    """Number of classes of every exit."""
    arch_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword options for the backbone builder (e.g. width)."""
    exit_fractions: tuple[float, ...] = DEFAULT_EXIT_FRACTIONS
    """Requested exit positions as shares of the backbone's FLOPs."""
    head_hidden: int = 32
    """Channels of the exit heads' 1x1 convolution."""
    head_pool: int = 4
    """Spatial size the exit heads pool to."""

    def build(self) -> ProgressiveModel:
        backbone = build_backbone(
            self.arch,
            in_channels=self.input_spec.channels,
            num_classes=self.num_classes,
            **self.arch_options,
        )
        model = make_progressive(
            backbone,
            self.input_spec,
            exit_fractions=self.exit_fractions,
            head_hidden=self.head_hidden,
            head_pool=self.head_pool,
        )
        if model.num_classes != self.num_classes:
            raise CheckpointError(
                f"architecture {self.arch!r} outputs {model.num_classes} classes, "
                f"expected {self.num_classes}"
            )
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "input_spec": self.input_spec.to_dict(),
            "num_classes": self.num_classes,
            "arch_options": dict(self.arch_options),
            "exit_fractions": list(self.exit_fractions),
            "head_hidden": self.head_hidden,
            "head_pool": self.head_pool,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls(
            arch=str(data["arch"]),
            input_spec=InputSpec.from_dict(data["input_spec"]),
            num_classes=int(data["num_classes"]),
            arch_options=dict(data.get("arch_options", {})),
            exit_fractions=tuple(float(f) for f in data["exit_fractions"]),
            head_hidden=int(data.get("head_hidden", 32)),
            head_pool=int(data.get("head_pool", 4)),
        )


@dataclass(frozen=True)
class CheckpointMeta:
    """Metadata recorded beside the weights (docs/ARCHITECTURE.md, "Checkpoint")."""

    config: ModelConfig
    """How to rebuild the model."""
    class_names: tuple[str, ...]
    """Human-readable name of each class index."""
    exit_stages: tuple[int, ...]
    """Stage read by each exit, as built when the checkpoint was saved."""
    recipe: dict[str, Any]
    """Training recipe: dataset, epochs, optimiser, seed, ... (free-form, plain values)."""
    metrics: dict[str, Any]
    """Measured results recorded at save time (e.g. per-exit test accuracy)."""
    weights_sha256: str
    """sha256 over the state dict (see weights_sha256)."""

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def input_spec(self) -> InputSpec:
        return self.config.input_spec

    @property
    def exit_fractions(self) -> tuple[float, ...]:
        return self.config.exit_fractions

    @property
    def model_id(self) -> str:
        """Short identifier used in the handshake: architecture plus weight hash prefix."""
        name = self.config.arch.replace(":", ".")
        return f"{name}-{self.weights_sha256[:16]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "exit_stages": list(self.exit_stages),
            "recipe": dict(self.recipe),
            "metrics": dict(self.metrics),
            "weights_sha256": self.weights_sha256,
        }


def weights_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain(value: Any, where: str) -> Any:
    """Copy ``value`` into builtin containers and scalars (plus tensors).

    ``weights_only=True`` loading accepts only those, so a str subclass such as
    ``torch.__version__`` or a numpy scalar would make the saved file unreadable.
    """
    if isinstance(value, Tensor):
        return value.detach().to("cpu")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return _plain(value.item(), where)
    if isinstance(value, Mapping):
        return {
            (int(k) if isinstance(k, int) else str(k)): _plain(v, f"{where}.{k}")
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CheckpointError(f"{where}: cannot store {type(value).__name__} in a checkpoint")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: ProgressiveModel,
    config: ModelConfig,
    *,
    class_names: Sequence[str],
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> CheckpointMeta:
    """Write the model atomically; ``extra`` holds plain training state for resuming."""
    if len(class_names) != model.num_classes:
        raise CheckpointError(
            f"{len(class_names)} class names given for a model with {model.num_classes} classes"
        )
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    meta = CheckpointMeta(
        config=config,
        class_names=tuple(str(c) for c in class_names),
        exit_stages=tuple(model.exit_stages),
        recipe=dict(recipe or {}),
        metrics=dict(metrics or {}),
        weights_sha256=weights_sha256(state),
    )
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "meta": _plain(meta.to_dict(), "meta"),
        "state_dict": state,
    }
    if extra is not None:
        payload["extra"] = _plain(dict(extra), "extra")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, target)
    return meta


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the raw payload with ``weights_only=True`` and check its format tag."""
    where = os.fspath(path)
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {where!r} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {where!r} is a directory, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {where!r}: {exc.strerror}") from None
    except Exception as exc:  # unpickling errors come in many types
        # torch.save writes a zip archive; anything else (a text file, a truncated
        # download) makes torch fail with an error that says nothing of the cause,
        # e.g. KeyError(101) for a file starting with 'e'.
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{where!r} is not a torch checkpoint file (not the zip archive torch.save "
                "writes): wrong file, or an incomplete copy"
            ) from exc
        raise CheckpointError(f"{where!r} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint (found {found!r})"
        )
    return payload


def _parse_meta(raw: Mapping[str, Any], path: str) -> CheckpointMeta:
    try:
        return CheckpointMeta(
            config=ModelConfig.from_dict(raw["config"]),
            class_names=tuple(str(c) for c in raw["class_names"]),
            exit_stages=tuple(int(k) for k in raw["exit_stages"]),
            recipe=dict(raw.get("recipe", {})),
            metrics=dict(raw.get("metrics", {})),
            weights_sha256=str(raw["weights_sha256"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r} has malformed metadata: {exc!r}") from exc


def load_checkpoint(
    path: str | os.PathLike[str], *, allow_user_code: bool = False
) -> tuple[ProgressiveModel, CheckpointMeta]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode).

    A checkpoint of a user model (``arch`` 'module:callable') would import that module
    to rebuild the backbone; that is refused unless ``allow_user_code`` is set, so a
    file alone never decides what code runs.
    """
    where = os.fspath(path)
    payload = read_checkpoint(path)
    meta = _parse_meta(payload.get("meta", {}), where)
    if ":" in meta.arch and not allow_user_code:
        raise CheckpointError(
            f"checkpoint {where!r} needs user code {meta.arch!r} to rebuild its model; "
            "pass allow_user_code=True (CLI: --allow-user-code) if you trust that module"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where!r} has no state_dict")
    digest = weights_sha256(state)
    if digest != meta.weights_sha256:
        raise CheckpointError(
            f"checkpoint {where!r}: weights sha256 {digest[:16]}... does not match the "
            f"recorded {meta.weights_sha256[:16]}...; the file is corrupt or was edited"
        )
    try:
        model = meta.config.build()
    except CheckpointError:
        raise
    except ValueError as exc:
        # The user module cannot be imported or called, or no longer traces: one line
        # that names the checkpoint, for spinn-server and spinn-device alike.
        raise CheckpointError(f"checkpoint {where!r}: {exc}") from exc
    if tuple(model.exit_stages) != meta.exit_stages:
        raise CheckpointError(
            f"checkpoint {where!r} was saved with exits after stages {list(meta.exit_stages)} "
            f"but the generator now places them after {model.exit_stages}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {where!r} does not fit its architecture: {exc}") from exc
    return model.eval(), meta
