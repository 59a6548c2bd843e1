"""The model's zstd dictionary file for the ``sparse_int8_zdict`` codec: where it lives,
save, load (``spinn.offline.zdict_training`` trains its tables).

The file sits beside the checkpoint with the suffix ``.zdict`` (``models/default/model.pt``
→ ``…/model.zdict``); device and server each load the one beside the model
they run and offer the codec only when it is there, and HELLO/WELCOME compare the two
files' sha256 (PROTOCOL.md §6.7). Table ``s`` holds the dictionaries of split ``s``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from protocol.dictionaries import DictionaryError, ZstdDictionaries

__all__ = [
    "SUFFIX",
    "dictionaries_path",
    "load_dictionaries",
    "save_dictionaries",
]

log = logging.getLogger(__name__)

SUFFIX = ".zdict"


def dictionaries_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the dictionaries of `checkpoint` live: same name, suffix ``.zdict``."""
    return Path(checkpoint).with_suffix(SUFFIX)


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
