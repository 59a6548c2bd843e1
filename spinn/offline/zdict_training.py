"""Training the model's zstd dictionaries for the ``sparse_int8_zdict`` codec.

Table ``s`` holds the dictionaries of split ``s``, trained on that split's activations of
training images, batch 1, as the device sends them (PROTOCOL.md §6.7); the file that holds
them is ``spinn.model.zdict_file``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import numpy as np
import torch
import zstandard

from protocol.dictionaries import ZSTD_LEVEL, DictionaryError, ZstdDictionaries
from protocol.packing import zdict_streams
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import ImageSet

__all__ = [
    "DEFAULT_TRAIN_IMAGES",
    "MASK_DICT_SIZE",
    "VALUES_DICT_SIZE",
    "train_dictionaries",
    "train_tables",
]

log = logging.getLogger(__name__)

DEFAULT_TRAIN_IMAGES = 1024
"""Training images per split: 512 already train tables within 1% of these."""
MASK_DICT_SIZE: Final = 2048
"""Bytes of a trained bitmask dictionary: its entropy tables are what matters, and the
XOR-ed bitmask has few repeats worth keeping as content."""
VALUES_DICT_SIZE: Final = 4096
"""Bytes of a trained values dictionary (16 KiB measured no better on the default model)."""


def train_dictionaries(
    model: ProgressiveModel, data: ImageSet, model_id: str = "", batch: int = 256
) -> ZstdDictionaries:
    """Tables for splits 0..S-1 from `data`'s images run through `model`'s trunk."""
    per_split: list[list[np.ndarray]] = [[] for _ in range(model.num_stages)]
    model = model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch):
            x = model.input_spec.preprocess(data.images[start : start + batch])
            for k in range(model.num_stages):
                act = x.numpy()
                per_split[k].extend(np.ascontiguousarray(act[i : i + 1]) for i in range(len(act)))
                if k + 1 < model.num_stages:
                    x = model.run_trunk(k, x)
            log.info("dictionaries: %d/%d images through the model",
                     min(start + batch, len(data)), len(data))  # fmt: skip
    log.info("dictionaries: training %d tables (bitmask and values per split)", model.num_stages)
    return train_tables(per_split, model_id)


def train_tables(
    samples: Sequence[Sequence[np.ndarray]],
    model_id: str = "",
    *,
    mask_size: int = MASK_DICT_SIZE,
    values_size: int = VALUES_DICT_SIZE,
) -> ZstdDictionaries:
    """Train table i on the activations `samples[i]` (batch 1 each, as they are sent):
    zstd's trainer on the bitmask and values contents of PROTOCOL.md §6.7.1.

    Raises `DictionaryError` when a table has too few or too small samples for zstd's
    trainer (a few hundred tensors are plenty; see `spinn dictionaries`).
    """
    tables = []
    for i, arrays in enumerate(samples):
        streams = [zdict_streams(a) for a in arrays]
        pair = []
        for what, size, index in (("bitmask", mask_size, 0), ("values", values_size, 1)):
            parts: list[bytes | bytearray | memoryview] = [s[index] for s in streams]
            try:
                trained = zstandard.train_dictionary(
                    size, parts, level=ZSTD_LEVEL, threads=1, steps=4
                )
            except zstandard.ZstdError as exc:
                raise DictionaryError(
                    f"table {i}: cannot train the {what} dictionary on {len(parts)} "
                    f"samples ({exc}); give it more activations"
                ) from None
            pair.append(trained.as_bytes())
        tables.append((pair[0], pair[1]))
    return ZstdDictionaries(tables, model_id)
