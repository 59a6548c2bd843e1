"""The model's zstd dictionaries for the ``sparse_int8_zdict`` codec: train, save, load.

The file sits beside the checkpoint with the suffix ``.zdict`` (``models/default/model.pt``
→ ``…/model.zdict``); device and server each load the one beside the model
they run and offer the codec only when it is there, and HELLO/WELCOME compare the two
files' sha256 (PROTOCOL.md §6.7). Table ``s`` holds the dictionaries of split ``s``,
trained on that split's activations of training images, batch 1, as the device sends them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch
import zstandard

from protocol.dictionaries import ZSTD_LEVEL, DictionaryError, ZstdDictionaries
from protocol.packing import zdict_streams
from spinn.data import ImageSet
from spinn.progressive import ProgressiveModel

__all__ = [
    "DEFAULT_TRAIN_IMAGES",
    "MASK_DICT_SIZE",
    "SUFFIX",
    "VALUES_DICT_SIZE",
    "dictionaries_path",
    "load_dictionaries",
    "save_dictionaries",
    "train_dictionaries",
    "train_tables",
]

log = logging.getLogger(__name__)

SUFFIX = ".zdict"
DEFAULT_TRAIN_IMAGES = 1024
"""Training images per split: 512 already train tables within 1% of these."""
MASK_DICT_SIZE: Final = 2048
"""Bytes of a trained bitmask dictionary: its entropy tables are what matters, and the
XOR-ed bitmask has few repeats worth keeping as content."""
VALUES_DICT_SIZE: Final = 4096
"""Bytes of a trained values dictionary (16 KiB measured no better on the default model)."""


def dictionaries_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the dictionaries of `checkpoint` live: same name, suffix ``.zdict``."""
    return Path(checkpoint).with_suffix(SUFFIX)


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


def save_dictionaries(dictionaries: ZstdDictionaries, path: str | os.PathLike[str]) -> None:
    """Write the dictionary file atomically (a reader never sees half of one)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(dictionaries.to_bytes())
    os.replace(tmp, target)


def load_dictionaries(
    checkpoint: str | os.PathLike[str], model_id: str, num_stages: int
) -> ZstdDictionaries | None:
    """The dictionaries beside `checkpoint`, or None when there is no file.

    A file that is there but unusable (corrupt, another model's, too few tables) raises
    `DictionaryError` naming the file: a peer must not silently lose a codec it was given.
    """
    path = dictionaries_path(checkpoint)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DictionaryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    dictionaries = ZstdDictionaries.from_bytes(data, str(path), expect_tables=num_stages)
    if dictionaries.model_id != model_id:
        raise DictionaryError(
            f"{path}: trained for model {dictionaries.model_id!r}, not {model_id!r}; "
            f"retrain it with spinn dictionaries"
        )
    log.debug("loaded %r from %s", dictionaries, path)
    return dictionaries


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
