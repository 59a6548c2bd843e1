"""Per-split zstd dictionaries of one model: the tables of the `sparse_int8_zdict` codec.

A batch-1 activation is a few hundred to a few thousand bytes once packed, too small for
zstd to afford the Huffman table it would have to send with it, so plain zstd barely
shrinks the values and not at all the bitmask. A dictionary trained on the same split's
activations of training images carries those tables instead: both ends hold it, nothing
of it crosses the network per tensor (PROTOCOL.md §6.7). One table per split point: the
bitmask and the values have their own dictionary each, because their byte statistics
have nothing in common.

The set is a file shipped beside the model (`spinn dictionaries` trains it, in
`spinn.offline.zdict_training`); its sha256 over the exact file bytes is what HELLO and
WELCOME compare, so the codec is used only between peers holding the same set. This
module is sans-I/O: it turns bytes into tables and back; reading the file is the
caller's business.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Final

import msgpack
import zstandard

from protocol.errors import TensorError
from protocol.framing import decode_msgpack

__all__ = [
    "FORMAT",
    "DictionaryError",
    "ZstdDictionaries",
]

FORMAT: Final = "spinn-zdict/1"
"""`format` value of a dictionary file (PROTOCOL.md §6.7)."""

MAX_TABLES: Final = 2**16
"""The payload names its table in a uint16."""
MAX_DICT_BYTES: Final = 1 << 20
"""Largest single dictionary a file may hold."""

ZSTD_LEVEL: Final = 1
"""Level the codec compresses at: as fast as sparse_int8 + zstd, with tables for free."""

_ZSTD_MAGICLESS: Final = zstandard.FORMAT_ZSTD1_MAGICLESS


_PROBE: Final = bytes(range(64))
"""What each dictionary compresses and decompresses once when loaded."""


class DictionaryError(ValueError):
    """A dictionary file or table set that cannot be used, and why."""


def _params() -> zstandard.ZstdCompressionParameters:
    # Magicless frames with their content size and no dictionary id: the payload header
    # names the table, so the 4-byte magic and the 4-byte id would be bytes for nothing.
    return zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL,
        format=_ZSTD_MAGICLESS,
        write_content_size=1,
        write_dict_id=0,
        write_checksum=0,
    )


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.compressors: dict[int, tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]] = {}
        self.decompressors: dict[
            int, tuple[zstandard.ZstdDecompressor, zstandard.ZstdDecompressor]
        ] = {}


class ZstdDictionaries:
    """One model's dictionary pairs (bitmask, values), indexed by table = split point.

    Thread-safe: zstd contexts are made per thread on first use and then reused.
    """

    __slots__ = ("_data", "_dicts", "_local", "model_id", "sha256", "tables")

    def __init__(self, tables: Sequence[tuple[bytes, bytes]], model_id: str = "") -> None:
        if not isinstance(model_id, str):
            raise DictionaryError(f"model_id must be a str, got {type(model_id).__name__}")
        if not 0 < len(tables) <= MAX_TABLES:
            raise DictionaryError(
                f"a dictionary set holds 1..{MAX_TABLES} tables, got {len(tables)}"
            )
        checked: list[tuple[bytes, bytes]] = []
        for i, pair in enumerate(tables):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DictionaryError(f"table {i}: expected a (bitmask, values) pair of bytes")
            for what, data in zip(("bitmask", "values"), pair, strict=True):
                if type(data) is not bytes or not 8 <= len(data) <= MAX_DICT_BYTES:
                    raise DictionaryError(
                        f"table {i}: the {what} dictionary must be 8..{MAX_DICT_BYTES} bytes"
                    )
            checked.append((pair[0], pair[1]))
        self.tables: tuple[tuple[bytes, bytes], ...] = tuple(checked)
        self.model_id = model_id
        self._data = msgpack.packb(
            {"format": FORMAT, "model_id": model_id, "tables": [list(p) for p in checked]},
            use_bin_type=True,
        )
        self.sha256: str = hashlib.sha256(self._data).hexdigest()
        """sha256 of `to_bytes()`: what HELLO and WELCOME compare (PROTOCOL.md §5.1)."""
        dicts = []
        for i, pair in enumerate(checked):
            loaded = []
            for what, data in zip(("bitmask", "values"), pair, strict=True):
                d = zstandard.ZstdCompressionDict(data)
                try:
                    d.precompute_compress(compression_params=_params())
                    # One round trip builds the decompression side here, once, rather
                    # than in whichever threads first decode with it, and proves that it
                    # parses there too (PROTOCOL.md §6.7.3).
                    frame = zstandard.ZstdCompressor(
                        dict_data=d, compression_params=_params()
                    ).compress(_PROBE)
                    back = zstandard.ZstdDecompressor(
                        dict_data=d, format=_ZSTD_MAGICLESS
                    ).decompress(frame)
                except zstandard.ZstdError as exc:
                    raise DictionaryError(f"table {i}: bad {what} dictionary: {exc}") from None
                if back != _PROBE:
                    raise DictionaryError(f"table {i}: the {what} dictionary does not round-trip")
                loaded.append(d)
            dicts.append((loaded[0], loaded[1]))
        self._dicts: tuple[tuple[zstandard.ZstdCompressionDict, ...], ...] = tuple(dicts)
        self._local = _PerThread()

    def __len__(self) -> int:
        return len(self.tables)

    def __repr__(self) -> str:
        return (
            f"ZstdDictionaries({len(self)} tables, model {self.model_id!r}, "
            f"sha256 {self.sha256[:16]}…)"
        )

    def to_bytes(self) -> bytes:
        """The dictionary file: a msgpack map (PROTOCOL.md §6.7); `sha256` is its hash."""
        return self._data

    @classmethod
    def from_bytes(
        cls, data: bytes, where: str = "dictionary file", *, expect_tables: int | None = None
    ) -> ZstdDictionaries:
        """Parse a dictionary file, or raise `DictionaryError` saying what is wrong with it.
        `expect_tables` (the model's split count) is checked before any table is loaded,
        which costs tens of kilobytes each."""
        try:
            raw = decode_msgpack(data)
        except Exception as exc:  # msgpack raises several types for garbage
            raise DictionaryError(f"{where}: not a msgpack dictionary file ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise DictionaryError(f"{where}: format is {got!r}; expected {FORMAT!r}")
        tables, model_id = raw.get("tables"), raw.get("model_id", "")
        if not isinstance(tables, tuple):
            raise DictionaryError(f"{where}: 'tables' must be a list of [bitmask, values] pairs")
        if expect_tables is not None and len(tables) != expect_tables:
            raise DictionaryError(
                f"{where}: {len(tables)} tables for a model of {expect_tables} splits"
            )
        try:
            made = cls(tables, model_id)
        except DictionaryError as exc:
            raise DictionaryError(f"{where}: {exc}") from None
        if made._data != bytes(data):
            # Re-encoding must give the same bytes, or two peers holding the same file could
            # disagree on its hash (PROTOCOL.md §6.7: the canonical encoding).
            raise DictionaryError(f"{where}: not in canonical form (extra keys or encoding)")
        return made

    def _check(self, table: int) -> None:
        if not 0 <= table < len(self.tables):
            raise TensorError(
                f"sparse_int8_zdict names table {table}; the dictionary set "
                f"{self.sha256[:16]}… has tables 0..{len(self.tables) - 1}"
            )

    def compressors(self, table: int) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]:
        """(bitmask, values) compressors of `table`, this thread's."""
        cache = self._local.compressors
        got = cache.get(table)
        if got is None:
            self._check(table)
            params = _params()
            mask_dict, values_dict = self._dicts[table]
            got = (
                zstandard.ZstdCompressor(dict_data=mask_dict, compression_params=params),
                zstandard.ZstdCompressor(dict_data=values_dict, compression_params=params),
            )
            cache[table] = got
        return got

    def decompressors(
        self, table: int
    ) -> tuple[zstandard.ZstdDecompressor, zstandard.ZstdDecompressor]:
        """(bitmask, values) decompressors of `table`, this thread's; `TensorError` for a
        table the set does not have."""
        cache = self._local.decompressors
        got = cache.get(table)
        if got is None:
            self._check(table)
            mask_dict, values_dict = self._dicts[table]
            got = (
                zstandard.ZstdDecompressor(dict_data=mask_dict, format=_ZSTD_MAGICLESS),
                zstandard.ZstdDecompressor(dict_data=values_dict, format=_ZSTD_MAGICLESS),
            )
            cache[table] = got
        return got
