"""A server's self-description (PROTOCOL.md §5.12) from a checkpoint, and the device's
check of one against its own checkpoint.

Pure functions: the server builds its `Description` once from the loaded model and its
limits; a device that holds the same model compares, field by field, what the server says
with what its checkpoint says, and names every difference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from protocol.description import PREPROCESS, Description

if TYPE_CHECKING:
    from spinn.model.checkpoint import CheckpointMeta
    from spinn.model.progressive import ProgressiveModel

__all__ = ["CheckpointFacts", "checkpoint_facts", "describe", "mismatches"]


def describe(
    model: ProgressiveModel,
    meta: CheckpointMeta,
    *,
    max_batch: int,
    max_frame_bytes: int,
    max_tensor_elements: int,
    max_in_flight: int,
    max_outstanding: int,
    handshake_timeout_s: float,
    idle_timeout_s: float,
    max_ping_rate: float | None = None,
    max_ping_burst: float | None = None,
    max_unknown_cancel_rate: float | None = None,
    max_unknown_cancel_burst: float | None = None,
) -> Description:
    """The description of a server of ``model`` with these limits (the rates of control
    frames: None, not stated)."""
    spec = meta.input_spec
    return Description(
        input_shape=spec.shape,
        input_mean=tuple(spec.mean),
        input_std=tuple(spec.std),
        classes=tuple(meta.class_names),
        split_shapes=tuple(tuple(model.split_shape(s)) for s in range(model.num_stages)),
        max_batch=max_batch,
        max_frame_bytes=max_frame_bytes,
        max_tensor_elements=max_tensor_elements,
        max_in_flight=max_in_flight,
        max_outstanding=max_outstanding,
        handshake_timeout_s=handshake_timeout_s,
        idle_timeout_s=idle_timeout_s,
        max_ping_rate=max_ping_rate,
        max_ping_burst=max_ping_burst,
        max_unknown_cancel_rate=max_unknown_cancel_rate,
        max_unknown_cancel_burst=max_unknown_cancel_burst,
    )


@dataclass(frozen=True, slots=True)
class CheckpointFacts:
    """What a checkpoint says that a server's description must repeat (PROTOCOL.md
    §5.12): plain data, so the device's core can hold it and judge a WELCOME."""

    input_shape: tuple[int, ...]
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    classes: tuple[str, ...]
    split_shapes: tuple[tuple[int, ...], ...]
    """The activation shape at each split 0..S−1."""


def checkpoint_facts(model: ProgressiveModel, meta: CheckpointMeta) -> CheckpointFacts:
    """The facts of the checkpoint ``model``, ``meta``."""
    spec = meta.input_spec
    return CheckpointFacts(
        input_shape=tuple(spec.shape),
        input_mean=tuple(spec.mean),
        input_std=tuple(spec.std),
        classes=tuple(meta.class_names),
        split_shapes=tuple(tuple(model.split_shape(s)) for s in range(model.num_stages)),
    )


def mismatches(description: Description, facts: CheckpointFacts) -> list[str]:
    """What ``description`` says differently from the checkpoint's ``facts``, one line
    per field; empty when they agree."""
    ours = {f.name: getattr(facts, f.name) for f in fields(facts)}
    out = []
    for name, mine in ours.items():
        theirs = getattr(description, name)
        if theirs == mine:
            continue
        if name == "split_shapes" and len(theirs) == len(mine):
            differ = [
                f"split {s} server {list(a)}, checkpoint {list(b)}"
                for s, (a, b) in enumerate(zip(theirs, mine, strict=True))
                if a != b
            ]
            out.append(f"{name}: " + ", ".join(differ))
        elif name == "split_shapes":
            out.append(f"{name}: server {len(theirs)} splits, checkpoint {len(mine)}")
        else:
            out.append(f"{name}: server {_short(theirs)}, checkpoint {_short(mine)}")
    raw: dict[str, object] = {
        "input_dtype": "uint8",
        "input_range": (0, 255),
        "preprocess": PREPROCESS,
    }
    for name, wanted in raw.items():  # InputSpec.preprocess, the one formula this code runs
        if getattr(description, name) != wanted:
            out.append(f"{name}: server {getattr(description, name)!r}, this device {wanted!r}")
    return out


def _short(value: object, limit: int = 120) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
