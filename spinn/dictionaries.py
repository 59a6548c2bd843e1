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
from pathlib import Path

import numpy as np
import torch

from protocol.dictionaries import DictionaryError, ZstdDictionaries
from spinn.data import ImageSet
from spinn.progressive import ProgressiveModel

__all__ = [
    "DEFAULT_TRAIN_IMAGES",
    "SUFFIX",
    "dictionaries_path",
    "load_dictionaries",
    "save_dictionaries",
    "train_dictionaries",
]

log = logging.getLogger(__name__)

SUFFIX = ".zdict"
DEFAULT_TRAIN_IMAGES = 1024
"""Training images per split: 512 already train tables within 1% of these."""


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
    return ZstdDictionaries.train(per_split, model_id)


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
