"""The models shipped with SPINN, as package data (found with importlib.resources).

This is the one place that knows where the shipped model lives: the server, the device,
the CLIs and the benchmarks take `DEFAULT_CHECKPOINT` from here. The models are kept in
the checkout's top-level ``models/`` (one directory per model, ``default`` first); this
package reaches them through its ``models`` link, and a wheel carries them as files of
the package, so an installed SPINN finds them in site-packages from any directory. Each
model is a directory holding ``model.pt`` with, beside it, ``model.zdict`` (PROTOCOL.md
§6.7) and ``profile.json``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_CHECKPOINT", "MODELS_DIR"]

MODELS_DIR: Final = Path(str(files(__name__).joinpath("models")))
"""The directory of the shipped models (``models/`` in a checkout)."""

DEFAULT_CHECKPOINT: Final = MODELS_DIR / "default" / "model.pt"
"""The shipped default checkpoint (ResNet-20 on Fashion-MNIST, ``README.md`` beside it),
served and run when no ``--checkpoint`` is given."""
