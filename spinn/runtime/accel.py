"""Where the server computes: CPU or a CUDA GPU.

``resolve_device("auto")`` picks CUDA when torch sees a GPU, else the CPU, so the same
command line serves on both.  Activations reach the GPU through pinned host buffers with
non-blocking copies (``spinn.runtime.batching.to_device``); compute runs under
``torch.inference_mode`` (``spinn.model.inference``).
"""

from __future__ import annotations

import torch

from spinn.runtime.config import check_device_name

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ValueError if unusable."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return device
