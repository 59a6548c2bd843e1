"""Session-wide test settings: one intra-op thread and one shared small checkpoint."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.runtime import make_certs, make_small_checkpoint

__all__ = ["checkpoint", "one_torch_thread"]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Batch-1 inference on two cores shared with other work runs several times slower
    # with two intra-op threads contending than with one; the runtime itself is
    # single-input per request (paper Sec. 5), so one thread is also the realistic case.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small seeded ResNet-20 checkpoint (seed 0) with its profile, built once.

    Tests treat it as read-only; a test that needs other weights builds its own with
    ``make_small_checkpoint(directory, seed=...)``.
    """
    return make_small_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server and a device certificate (``make_certs``), made once per run."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl missing")
    return make_certs(tmp_path_factory.mktemp("certs"))
