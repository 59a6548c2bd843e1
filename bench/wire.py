"""Protocol benchmark: activation packing and framed loopback throughput.

``python -m bench.wire``

1. Packing, on one core (CPU time of the thread), on ReLU activations of a real CNN: every candidate split point
   (ReLU outputs, PROTOCOL.md §6) of the shipped default model for Fashion-MNIST test
   images, batch 1 as the runtime sends them. When the checkpoint cannot be loaded, a
   random-weight ResNet-20 made progressive by the project's generator stands in (said so
   in the output). Per codec, with and without zstd: bytes versus float32, pack and unpack
   speed in MB/s of float32 input, worst quantisation error in units of the scale; and
   ``sparse_int8_zdict`` (PROTOCOL.md §6.7), sparse int8 coded with the split's zstd
   dictionaries: the ones shipped beside the checkpoint (``model.zdict``), or, where there
   are none (or the random-weight stand-in runs), dictionaries trained in the bench on
   ``--dict-images`` training images, as ``spinn dictionaries`` trains them (said so).
   Targets: ≥ 8× smaller than float32 on the splits with ≥ 50% zeros, judged on
   sparse_int8_zdict from the measured ratio (the output says met or missed); pack and
   unpack ≥ 500 MB/s of float32 input.
   Per split, the compression ratios are set beside an entropy yardstick: the ratio an ideal
   order-0 coder would reach on the same bitmask and int8 values (the empirical entropy of
   the mask bits plus that of the int8 values, each tensor on its own). It is not a bound
   on zstd, which also exploits runs (it beats the yardstick where whole background areas
   are zero), but over all splits plain zstd lands at about it: the int8 values carry 6-7
   bits each, and a tensor of a few thousand values cannot afford to send tables that code
   them in fewer; sparse_int8_zdict's dictionaries hold such tables at both ends, and its
   bitmask XOR the row above leaves fewer ones to code. Four other lossless codings of the same sparse_int8
   payloads measure how much other zstd set-ups gain (``--dict-images`` training images teach
   the dictionary): level 19, the positions and the values in separate blocks, the bitmask
   XOR the row above, and one per-split dictionary over the whole payload. A last row
   leaves zstd: the bits an ideal coder would spend with context tables (a mask bit given
   its channel and its left and upper neighbours; a value given its channel and its count
   of non-zero neighbours) fitted per split on the same training images: the ceiling of a
   table-driven entropy coder shipped with the model.
2. Loopback round trips of 1 MiB INFER frames answered by RESULT frames: the real framing
   (`protocol.Connection` in an asyncio BufferedProtocol on uvloop, both ends) against
   blocking ``sock.sendall``/``recv_into`` of exactly the same bytes, interleaved in the
   same run, each end in its own process. Twice: with ``--window`` requests in flight (4 by
   default, the device runtime's default pipelining window ``max_in_flight``): this is the
   throughput, ``framing_vs_raw``; and with one in flight, where each round trip waits for
   the previous and so also times the fixed per-message cost (encode, decode, two event-loop
   wake-ups): ``framing_vs_raw_serial``. Target: framed throughput ≥ 70% of raw.
3. Split 0, the input frame (PROTOCOL.md §6.8): median bytes per image of ``uint8_image``
   (the frame's pixels, zstd with the smaller filtering: what is sent), against the
   normalised float input in every codec (what split 0 sent before; with the shipped
   table 0 of ``sparse_int8_zdict`` where it fits), the raw pixels and PNG, on the first
   ``--images`` Fashion-MNIST test images: 1×28×28 grey as the default model takes them,
   the camera workload's 3×96×96 RGB frames rendered from them (colour, sensor noise), and
   the same images plainly enlarged to 3×96×96 RGB (smooth, noise-free).
4. The lossy ``sparse_uintb`` (PROTOCOL.md §6.9) at the widths the checkpoint's profile
   records per split (``spinn profile``: the fewest bits whose accuracy drop on the first
   8,000 training images is within 0.5 points with 95 % confidence), on the last
   ``--lossy-images`` test images of the model's own dataset (all 10,000 by default: the
   widths were chosen on none of them; where a profile's widths came from the first test
   images, as before they came from training images, only those after them, said so):
   bytes against float32 over splits 1..S-1 (sparse_int8 where a split has no width; zstd
   where it is smaller), target ≥ 10×; and the accuracy it costs, target ≤ 0.5 points:
   each exit after each split against itself on the float activation, as a paired
   difference on the same images. The largest of these 30-40 drops is reported as
   measured, beside what the held-out images can verify of it (`drop_statistics`): each
   drop is noisy where a few dozen answers change (±0.12-0.23 points, 95 %, on 10,000
   images; ±0.3-0.6 on 2,000), so the largest of them reaches 0.28 to 0.30 on the shipped
   models' 10,000 (0.65-0.70 on 2,000) one time in 20 with no drop at any exit (the ``noise``
   figure, a paired sign-flip test); whether any
   exit's drop is above the target with 95 % family-wise confidence (the ``lower``
   figure, above 0.5 if so), and per split whether that lower bound refutes the
   profile's own bound for the width; and the drop pooled over the splits and their
   exits, with its interval. For the checkpoint, and for the shipped camera model
   (``models/camera``) when there is one.

The last line is one JSON object with ``sparse_zstd_ratio``, ``zdict_ratio``,
``zdict_ratio_half_sparse``, ``pack_mb_s``, ``unpack_mb_s``, ``framing_vs_raw`` and the
other figures printed above; ``dictionaries`` says where the zstd dictionaries came from;
``input_bytes`` holds the split-0 figures per frame size; ``lossy_ratio``,
``lossy_accuracy_drop_pts``, ``lossy_accuracy_drop_margin_pts`` (the half-width of that
drop's 95 % sampling interval on the held-out images: 1.96 standard errors of the paired
per-image differences at the exit that sets it), ``lossy_accuracy_drop_pooled_pts`` and
``lossy_accuracy_drop_pooled_margin_pts`` (the drop over every split and exit, ± its
95 % interval), ``lossy_accuracy_drop_lower_pts`` (the largest family-wise 95 % lower
bound of an exit's drop), ``lossy_accuracy_drop_noise_pts`` (the largest drop's 95th
percentile by noise alone), ``lossy_bound_refuted_splits`` (the splits where an exit's
family-wise lower bound is above the profile's bound for the width: none, unless the
chosen width loses more than the profile claims) and ``lossy_bits`` (per split 1..S-1)
those of part 4, and
``lossy_camera_*`` the same for the camera model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from bench._common import pin_one_core, stub_description
from protocol import (
    CODECS,
    NEED_DATA,
    PROTOCOL_VERSION,
    Bye,
    Connection,
    ConnectionClosed,
    Hello,
    Infer,
    Result,
    Role,
    Welcome,
    pack,
    unpack,
)
from protocol.dictionaries import DictionaryError, ZstdDictionaries
from protocol.packing import (
    DICT_CODEC,
    IMAGE_CODEC,
    IMAGE_FILTER_GRADIENT,
    IMAGE_FILTER_NONE,
    LOSSY_CODEC,
    ZSTD_COMPRESS_BPS,
    ZSTD_DECOMPRESS_BPS,
    PackedTensor,
)
from spinn.decisions.offline_profile import Profile
from spinn.pretrained import DEFAULT_CHECKPOINT as _DEFAULT_CHECKPOINT
from spinn.pretrained import MODELS_DIR

DEFAULT_CHECKPOINT = str(_DEFAULT_CHECKPOINT)
FRAME_PAYLOAD = 2**20  # float32 payload bytes of each loopback INFER: a 1 MiB frame
SOCKET_BUFFER = 4 * 2**20
SHIPPED = "shipped"  # the dictionaries beside the checkpoint (spinn/model/zdict_file.py)
TRAINED = "trained in bench"  # none usable there: trained here on training images
HALF_SPARSE_TARGET = 8.0  # x smaller than float32 on the splits with >= 50% zeros
LOSSY_RATIO_TARGET = 10.0  # x smaller than float32 over splits 1..S-1, sparse_uintb
LOSSY_DROP_TARGET_PTS = 0.5  # accuracy points it may cost on held-out images


# -- activations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """ReLU activations at every inner split point, one array per image and split."""

    source: str
    arrays: list[np.ndarray]  # batch 1, as the runtime sends them
    batched: list[np.ndarray]  # one per split, all images stacked: per-call costs amortised
    per_split: dict[int, tuple[tuple[int, ...], float]]  # split -> (shape, zero share)
    dictionaries: ZstdDictionaries | None  # sparse_int8_zdict's tables; table s = split s
    dictionaries_origin: str | None  # SHIPPED or TRAINED; None with `dictionaries`
    dictionaries_note: str  # where they came from, in words

    @property
    def array_splits(self) -> list[int]:
        """The split of each of `arrays`, which is also its dictionary table."""
        return [s for s, batch in zip(self.per_split, self.batched, strict=True) for _ in batch]


def collect_activations(
    checkpoint: str, images: int, subset: str = "test", dict_images: int = 0
) -> Activations:
    """Run Fashion-MNIST images (`subset`: test or train) through the model, keeping each
    split's input, and find the sparse_int8_zdict dictionaries to code them with.

    The dictionaries are the ones shipped beside a checkpoint that loads; otherwise (no
    file, an unusable one, or the random-weight stand-in) they are trained on the first
    `dict_images` training images as ``spinn dictionaries`` trains them, or are None when
    `dict_images` is 0.
    """
    import torch

    from spinn.model.progressive import InputSpec, ProgressiveModel, make_progressive
    from spinn.model.zdict_file import dictionaries_path, load_dictionaries
    from spinn.offline.data import load_fashion_mnist
    from spinn.offline.zdict_training import train_dictionaries

    torch.manual_seed(0)
    model: ProgressiveModel
    dictionaries: ZstdDictionaries | None = None
    try:
        from spinn.model.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        source = f"{checkpoint} ({meta.arch}, trained)"
    except Exception as exc:  # any failure: fall back to random weights, and say why
        from spinn.model.backbones import resnet20

        data = load_fashion_mnist("train")
        mean, std = data.head(2000).mean_std()
        spec = InputSpec(1, 28, 28, mean, std)
        model = make_progressive(resnet20(in_channels=1, num_classes=10), spec).eval()
        reason = str(exc).splitlines()[0][:100]
        source = f"random-weight resnet20 (default model unavailable: {reason})"
        model_id, missing = "", "random-weight model"
    else:
        model_id, path = meta.model_id, dictionaries_path(checkpoint)
        try:
            dictionaries = load_dictionaries(checkpoint, model_id, model.num_stages)
        except DictionaryError as exc:  # a bench reports on what it can: train, say why
            missing = f"{path} unusable: {str(exc).splitlines()[0][:100]}"
        else:
            missing = f"no {path}"
    origin: str | None = None
    if dictionaries is not None:
        origin, note = SHIPPED, f"{SHIPPED} ({dictionaries_path(checkpoint)})"
    elif dict_images > 0:
        seen = load_fashion_mnist("train").head(dict_images)
        dictionaries = train_dictionaries(model, seen, model_id)
        origin, note = TRAINED, f"{TRAINED} on {len(seen)} training images ({missing})"
    else:
        note = f"none ({missing})"
    test = load_fashion_mnist(subset).head(images)
    arrays: list[np.ndarray] = []
    batched: list[np.ndarray] = []
    per_split: dict[int, tuple[tuple[int, ...], float]] = {}
    with torch.no_grad():
        x = model.input_spec.preprocess(test.images)
        for k in range(model.num_stages - 1):
            x = model.run_trunk(k, x)
            split = k + 1  # the activation after stage k enters stage k + 1
            act = x.numpy()
            per_split[split] = (tuple(act.shape[1:]), float((act == 0).mean()))
            arrays.extend(np.ascontiguousarray(act[i : i + 1]) for i in range(act.shape[0]))
            batched.append(np.ascontiguousarray(act))
    return Activations(source, arrays, batched, per_split, dictionaries, origin, note)


@dataclass(frozen=True)
class SplitCompression:
    """sparse_int8 + zstd and sparse_int8_zdict at one split point, batch 1, against the
    entropy yardstick."""

    split: int
    zeros: float
    ratio: float
    zdict_ratio: float  # sparse_int8_zdict with the split's table
    value_bits: float  # mean empirical entropy of a tensor's int8 values, bits per value
    order0_ratio: float  # float32 bytes / ideal order-0 coding of bitmask and values
    raw_bytes: float  # float32 bytes of the split's tensors
    packed_bytes: float  # their sparse_int8 + zstd bytes
    zdict_bytes: float  # their sparse_int8_zdict bytes
    ideal_bits: float  # their order-0 information, bits


def _entropy_bits(symbols: np.ndarray) -> float:
    """Total order-0 information of `symbols` in bits (empirical distribution)."""
    if symbols.size == 0:
        return 0.0
    counts = np.unique(symbols, return_counts=True)[1]
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def split_compression(acts: Activations, dictionaries: ZstdDictionaries) -> list[SplitCompression]:
    """Per split: the achieved sparse_int8 + zstd and sparse_int8_zdict ratios and the
    order-0 yardstick."""
    from protocol.packing import quantise

    out = []
    for split, batch in zip(acts.per_split, acts.batched, strict=True):
        raw = packed = zdict = ideal_bits = value_bits = values = 0.0
        for image in batch:
            flat = image.reshape(-1)
            raw += flat.nbytes
            packed += pack(image[None], "sparse_int8", compress=True).nbytes
            coded = pack(image[None], DICT_CODEC, True, dictionaries=dictionaries, table=split)
            zdict += coded.nbytes
            mask = flat != 0
            q = quantise(flat[mask])[0]
            bits = _entropy_bits(q)
            ideal_bits += _entropy_bits(mask) + bits
            value_bits += bits
            values += q.size
        out.append(
            SplitCompression(
                split,
                acts.per_split[split][1],
                raw / packed,
                raw / zdict,
                value_bits / max(values, 1.0),
                8 * raw / max(ideal_bits, 1.0),
                raw,
                packed,
                zdict,
                max(ideal_bits, 1.0),
            )
        )
    return out


@dataclass(frozen=True)
class CoderVariant:
    """Another lossless coding of the information in the sparse_int8 payloads, pooled like
    the headline ratio: how much a better coder could still gain."""

    name: str
    ratio: float
    half_sparse: float | None  # pooled over the splits with >= 50% zeros

    def __str__(self) -> str:
        half = f"; >= 50% zeros {self.half_sparse:.2f}x" if self.half_sparse is not None else ""
        return f"{self.name:<46} all {self.ratio:.2f}x{half}"


def _positions_end(raw: bytes | bytearray | memoryview, size: int) -> int:
    """Offset where the int8 values begin in a sparse_int8 payload (PROTOCOL.md §6.5)."""
    from protocol.packing import _SPARSE_HEADER, SPARSE_BITMASK, SPARSE_INDEX_U16

    layout, nnz = _SPARSE_HEADER.unpack_from(raw)
    if layout == SPARSE_BITMASK:
        return _SPARSE_HEADER.size + (size + 7) // 8
    return _SPARSE_HEADER.size + nnz * (2 if layout == SPARSE_INDEX_U16 else 4)


def coder_headroom(acts: Activations, train: Activations) -> list[CoderVariant]:
    """Ratios of other zstd set-ups on the sparse_int8 payloads `acts` sends.

    Level 19 instead of 1; the positions and the values in two zstd blocks, so that each
    gets its own Huffman table instead of one fitted to their mixture; the bitmask XOR the
    row above in the same channel (zeros come in blobs, so this leaves fewer ones), with the
    values in a frame of their own; and per split one zstd dictionary (8 KiB, its entropy
    tables carry what a small tensor cannot afford to send) over the whole payload, trained
    on the same split's payloads for `train` images, which share no image with `acts`.
    sparse_int8_zdict, which is on the wire, combines the last two: its XOR-ed bitmask and
    its values each have a dictionary of their own. All decode to the same bytes: none
    changes the information.
    """
    import zstandard

    from protocol.packing import _SPARSE_HEADER, SPARSE_BITMASK

    def payloads(batch: np.ndarray) -> list[bytes | bytearray | memoryview]:
        return [pack(image[None], "sparse_int8", compress=False).payload for image in batch]

    level1, level19 = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=19)

    def two_blocks(raw: bytes | bytearray | memoryview, size: int) -> int:
        cut = _positions_end(raw, size)
        z = level1.compressobj(size=len(raw))
        parts = (z.compress(raw[:cut]), z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return len(parts[0]) + len(parts[1]) + len(z.compress(raw[cut:])) + len(z.flush())

    def row_xor(raw: bytes | bytearray | memoryview, image: np.ndarray) -> int:
        """The bitmask XOR the row above (one zstd frame), the values in a second frame."""
        if _SPARSE_HEADER.unpack_from(raw)[0] != SPARSE_BITMASK or image.ndim != 3:
            return len(level1.compress(raw))
        cut = _positions_end(raw, image.size)
        mask = image != 0
        mask[:, 1:] ^= image[:, :-1] != 0  # a decoder undoes it with a cumulative XOR down
        bits = np.packbits(mask.reshape(-1))
        return len(level1.compress(bytes(raw[: _SPARSE_HEADER.size]) + bits.tobytes())) + len(
            level1.compress(raw[cut:])
        )

    names = (
        "zstd level 19",
        "zstd 1, positions and values in two blocks",
        "zstd 1, bitmask XOR the row above, two frames",
        "zstd 1 + dictionary",
    )
    packed: dict[str, list[int]] = {name: [] for name in names}  # per split: all its bytes
    raw_bytes: list[int] = []
    zeros: list[float] = []
    for split, batch, seen in zip(acts.per_split, acts.batched, train.batched, strict=True):
        tensors = payloads(batch)
        size = batch[0].size
        packed[names[0]].append(sum(len(level19.compress(t)) for t in tensors))
        packed[names[1]].append(sum(two_blocks(t, size) for t in tensors))
        pairs = zip(tensors, batch, strict=True)
        packed[names[2]].append(sum(row_xor(t, image) for t, image in pairs))
        if names[3] in packed:
            try:
                trained = zstandard.train_dictionary(8192, payloads(seen), level=1)
            except zstandard.ZstdError as exc:
                print(f"  (no dictionary row: {len(seen)} training images are too few: {exc})")
                del packed[names[3]]
            else:
                with_dict = zstandard.ZstdCompressor(level=1, dict_data=trained)
                packed[names[3]].append(sum(len(with_dict.compress(t)) for t in tensors))
        raw_bytes.append(batch.nbytes)
        zeros.append(acts.per_split[split][1])
    return [CoderVariant(name, *_ratios(raw_bytes, sizes, zeros)) for name, sizes in packed.items()]


def _ratios(
    raw: Sequence[float], packed: Sequence[float], zeros: Sequence[float]
) -> tuple[float, float | None]:
    """Per-split bytes pooled, weighted by their bytes like the headline ratio (splits
    differ up to 4x in size): (all splits, those with >= 50% zeros or None if none)."""
    half = [i for i, z in enumerate(zeros) if z >= 0.5]
    half_ratio = sum(raw[i] for i in half) / sum(packed[i] for i in half) if half else None
    return sum(raw) / sum(packed), half_ratio


def _contexts(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask bits, their contexts, int8 levels, their contexts) of one C x H x W tensor.

    A mask bit's context is its channel and the bits to its left and above, which a decoder
    has already decoded in raster order; a value's context is its channel and how many of
    its four neighbours are non-zero, which the decoder knows once it has the whole mask.
    """
    from protocol.packing import quantise

    mask = image != 0
    left = np.zeros_like(mask)
    left[:, :, 1:] = mask[:, :, :-1]
    up = np.zeros_like(mask)
    up[:, 1:] = mask[:, :-1]
    channel = np.broadcast_to(np.arange(image.shape[0])[:, None, None], mask.shape)
    mask_ctx = channel * 4 + up * 2 + left
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1))).astype(np.int64)
    around = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    levels = quantise(image[mask])[0].astype(np.int64) + 128
    value_ctx = (channel * 5 + around)[mask]
    return mask.reshape(-1).astype(np.int64), mask_ctx.reshape(-1), levels, value_ctx


def _cross_entropy_bits(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], alphabet: int
) -> float:
    """Bits to code test's (symbols, contexts) with per-context frequencies of train's,
    add-half smoothed: what an arithmetic coder with those fixed tables would spend."""
    symbols, contexts = train
    n_ctx = int(max(contexts.max(initial=0), test[1].max(initial=0))) + 1
    counts = np.bincount(contexts * alphabet + symbols, minlength=n_ctx * alphabet)
    table = counts.reshape(n_ctx, alphabet) + 0.5
    log_p = np.log2(table / table.sum(axis=1, keepdims=True))
    return float(-log_p[test[1], test[0]].sum())


def static_model_ceiling(acts: Activations, train: Activations) -> CoderVariant | None:
    """The ratios of an ideal coder whose context tables are fitted per split on `train`'s
    tensors (see `_contexts`); None when the activations are not C x H x W.

    This is no zstd set-up: it is the ceiling of a table-driven entropy coder (e.g. ANS)
    with tables shipped beside the model, the kind of coder the 8x target would take.
    """
    from protocol.packing import _SPARSE_HEADER

    if any(batch.ndim != 4 for batch in acts.batched):
        return None
    raw: list[int] = []
    packed: list[float] = []  # bytes, per split
    for batch, seen in zip(acts.batched, train.batched, strict=True):
        fitted = [_contexts(image) for image in seen]
        mask_model = (
            np.concatenate([f[0] for f in fitted]),
            np.concatenate([f[1] for f in fitted]),
        )
        value_model = (
            np.concatenate([f[2] for f in fitted]),
            np.concatenate([f[3] for f in fitted]),
        )
        total = 0.0
        for image in batch:
            m, m_ctx, v, v_ctx = _contexts(image)
            total += _cross_entropy_bits(mask_model, (m, m_ctx), 2)
            total += _cross_entropy_bits(value_model, (v, v_ctx), 256)
            total += 8 * _SPARSE_HEADER.size  # layout and count, as sparse_int8 sends
        raw.append(batch.nbytes)
        packed.append(total / 8)
    zeros = [zeros for _, zeros in acts.per_split.values()]
    return CoderVariant("ideal coder, context tables fitted on train", *_ratios(raw, packed, zeros))


# -- packing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecFigures:
    codec: str
    zstd: bool
    ratio: float
    pack_mb_s: float
    unpack_mb_s: float
    max_err_scales: float


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU seconds of this thread over `repeats` runs of `fn`.

    CPU time, not wall time: on a shared machine the wall clock would time the other
    processes' load as much as the codec ("MB/s on one core" means per core-second).
    """
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return max(best, 1e-9)


_QUANTISED = ("int8", "sparse_int8", DICT_CODEC)  # error in units of the scale


def measure_codec(
    arrays: Sequence[np.ndarray],
    codec: str,
    zstd: bool,
    repeats: int,
    *,
    dictionaries: ZstdDictionaries | None = None,
    tables: Sequence[int] = (),
) -> CodecFigures:
    """Figures of one codec over all activations (best of `repeats` passes).

    `DICT_CODEC` codes ``arrays[i]`` with `dictionaries`' table ``tables[i]`` (its split).
    """
    raw_bytes = sum(a.nbytes for a in arrays)
    if codec == DICT_CODEC:
        jobs = list(zip(arrays, tables, strict=True))

        def pack_all() -> list[PackedTensor]:
            return [pack(a, codec, zstd, dictionaries=dictionaries, table=t) for a, t in jobs]

    else:

        def pack_all() -> list[PackedTensor]:
            return [pack(a, codec, zstd) for a in arrays]

    packed = pack_all()
    t_pack = _best_time(pack_all, repeats)
    t_unpack = _best_time(lambda: [unpack(p, dictionaries=dictionaries) for p in packed], repeats)
    worst = 0.0
    for a, p in zip(arrays, packed, strict=True):
        err = float(np.abs(unpack(p, dictionaries=dictionaries) - a).max()) if a.size else 0.0
        worst = max(worst, err / p.scale if codec in _QUANTISED else err)
    return CodecFigures(
        codec,
        zstd,
        raw_bytes / sum(p.nbytes for p in packed),
        raw_bytes / t_pack / 1e6,
        raw_bytes / t_unpack / 1e6,
        worst,
    )


# -- split 0: the input frame ---------------------------------------------------------------


@dataclass(frozen=True)
class InputBytes:
    """Median bytes per image of split 0's encodings, for one frame size."""

    name: str  # e.g. "1x28x28", "3x96x96 camera"
    pixels: int  # C·H·W: the raw frame, one byte a pixel
    before: dict[str, int]  # the normalised float input, per codec (what split 0 sent)
    image: dict[str, int]  # uint8_image: "raw", "zstd" (what is sent), per filter, and PNG

    @property
    def sent(self) -> int:
        """What split 0 sends now: uint8_image as the packer picks it, zstd on."""
        return self.image["zstd"]


def input_frames(images: int) -> list[tuple[str, Any, np.ndarray]]:
    """(name, input spec, uint8 N×C×H×W frames) of the first Fashion-MNIST test images:
    as the default model takes them (1×28×28 grey); as the camera workload's 3×96×96 RGB
    frames (``spinn.offline.data.render_camera_frames``: tinted, on a gradient, sensor noise); and
    plainly enlarged to 3×96×96 RGB as a device makes a camera model's input from a grey
    frame (grey replicated, bilinear: ``spinn.runtime.sources``), noise-free."""
    import torch

    from spinn.model.progressive import InputSpec
    from spinn.offline.data import (
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        load_fashion_mnist,
        render_camera_frames,
    )
    from spinn.runtime.sources import input_pixels

    test = load_fashion_mnist("test").head(images)
    grey = test.images.numpy()
    mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    small = InputSpec(1, 28, 28, mean, std)
    camera = InputSpec(3, 96, 96, mean * 3, std * 3)
    rendered = render_camera_frames(test.images, torch.arange(len(test)).numpy()).numpy()
    enlarged = np.stack([input_pixels(g[0], camera) for g in grey])
    return [
        ("1x28x28", small, grey),
        ("3x96x96 camera", camera, rendered),
        ("3x96x96 upscaled", camera, enlarged),
    ]


def _png_bytes(frame: np.ndarray) -> int:
    """Smallest PNG of a C×H×W frame over deflate levels 1..9 (OpenCV's encoder)."""
    import cv2

    hwc = frame[0] if frame.shape[0] == 1 else frame.transpose(1, 2, 0)[:, :, ::-1]  # BGR
    hwc = np.ascontiguousarray(hwc)
    return min(
        len(cv2.imencode(".png", hwc, [cv2.IMWRITE_PNG_COMPRESSION, level])[1])
        for level in range(1, 10)
    )


def measure_input(
    name: str, spec: Any, frames: np.ndarray, dictionaries: ZstdDictionaries | None
) -> InputBytes:
    """Split 0's bytes per image (medians): the normalised float input in every codec,
    as split 0 sent it before uint8_image (with `dictionaries`' table 0 where they fit
    the frame), and the pixels with uint8_image, per filter, and as PNG for comparison."""
    import torch
    import zstandard

    def median(sizes: list[int]) -> int:
        return int(statistics.median(sizes))

    x = spec.preprocess(torch.from_numpy(frames)).numpy()
    floats = [np.ascontiguousarray(x[i : i + 1]) for i in range(len(x))]
    before = {
        f"{c}+zstd" if z else c: median([pack(a, c, z).nbytes for a in floats])
        for c in CODECS
        for z in (False, True)
    }
    if dictionaries is not None and spec.shape == (1, 28, 28):
        before[DICT_CODEC] = median(
            [pack(a, DICT_CODEC, True, dictionaries=dictionaries, table=0).nbytes for a in floats]
        )
    zstd = zstandard.ZstdCompressor(level=1, write_content_size=True)
    pixels = [f[None] for f in frames]
    gradient = [np.diff(np.diff(p, axis=-1, prepend=0), axis=-2, prepend=0) for p in pixels]
    image = {
        "raw": median([pack(p, IMAGE_CODEC, False).nbytes for p in pixels]),
        "zstd": median([pack(p, IMAGE_CODEC, True).nbytes for p in pixels]),
        f"filter {IMAGE_FILTER_NONE}+zstd": median(
            [len(zstd.compress(bytes([IMAGE_FILTER_NONE]) + p.tobytes())) for p in pixels]
        ),
        f"filter {IMAGE_FILTER_GRADIENT}+zstd": median(
            [
                len(zstd.compress(bytes([IMAGE_FILTER_GRADIENT]) + g.astype(np.uint8).tobytes()))
                for g in gradient
            ]
        ),
        "png": median([_png_bytes(f) for f in frames]),
    }
    return InputBytes(name, int(frames[0].size), before, image)


def print_input(rows: Sequence[InputBytes]) -> None:
    """The split-0 table: bytes per image, and how many times fewer than float32 and than
    the raw frame (PROTOCOL.md §6.8)."""
    print("\nsplit 0, the input frame: median bytes per image (x fewer than float32 / raw pixels)")
    for r in rows:
        f32 = r.before["float32"]
        print(f"  {r.name} ({r.pixels} pixels, float32 input {f32} B):")
        entries = [(f"float input, {k}", v) for k, v in r.before.items() if k != "float32"]
        entries += [(f"{IMAGE_CODEC}, {k}", v) for k, v in r.image.items()]
        for label, n in entries:
            mark = "  <- sent" if label == f"{IMAGE_CODEC}, zstd" else ""
            print(f"    {label:<36} {n:7d} B {f32 / n:6.2f}x {r.pixels / n:6.2f}x{mark}")


@dataclass(frozen=True)
class LossySplit:
    """What sparse_uintb sends at one split, on held-out images (PROTOCOL.md §6.9)."""

    split: int
    bits: int | None
    """The profile's width; None: the device sends sparse_int8 there."""
    float32_bytes: int
    sent_bytes: int
    """Summed over the images, zstd where it makes the payload smaller (``compress=True``)."""
    drop_pts: float | None
    """Accuracy lost, the largest over the exits after the split (None: no width)."""
    margin_pts: float | None = None
    """Half-width of the 95 % interval of that drop on these images (1.96 standard errors
    of the paired differences at the exit that sets it): its sampling noise."""
    bound_pts: float | None = None
    """What the profile claims of the width: the upper confidence bound of its drop on the
    calibration images (the bound it was chosen within, in a profile made before that)."""
    lower_pts: float | None = None
    """The largest family-wise lower bound (`DropStatistics.lower_pts`) of the exits after
    the split: above `bound_pts`, these images refute the profile's claim."""


@dataclass(frozen=True)
class DropStatistics:
    """What the held-out paired differences of every (split, exit) say about the accuracy
    the profile's widths cost, in points (`drop_statistics`)."""

    estimates: int
    """(split, exit) drops measured: the largest of them is ``LossyFigures.drop_pts``."""
    pooled_pts: float
    """The drop averaged over every split and every exit after it."""
    pooled_margin_pts: float
    """Half-width of its 95 % interval (the per-image means are paired across exits)."""
    lower_pts: float
    """The largest over the estimates of the lower end of its one-sided confidence
    interval at 95 % family-wise (Bonferroni over `estimates`): above the bound, some
    exit shows a drop beyond it that the noise cannot explain."""
    noise_pts: float
    """How large the largest estimate gets by noise alone, with the codec costing no
    accuracy at any exit: the 95th percentile of that largest under random signs of each
    image's differences (a paired sign-flip test, the exits' correlation kept)."""
    split_lower_pts: tuple[float, ...] = ()
    """Per array of the differences (per split), the largest of its exits' lower bounds,
    at the same family-wise confidence: `lower_pts` is the largest of them."""


def drop_statistics(diffs: Sequence[np.ndarray], *, draws: int = 2000) -> DropStatistics | None:
    """`DropStatistics` of `diffs`, one (exits, N) array of paired differences per split
    with a width (+1: the codec turns that exit's answer wrong on that image, −1: right),
    all on the same N images; None without any.

    The largest of some 40 small-sample estimates sits above the drops themselves: on
    2,000 images an exit's drop is noisy by ±0.3-0.6 points where a few dozen answers
    change, so with no drop at any exit the largest is 0.45 points in a typical draw and
    0.65-0.70 one time in 20 on the shipped models (`noise_pts`); on all 10,000 test
    images, 0.28 and 0.30 on the default and camera models. The pooled drop and the
    family-wise lower bound are what held-out images of this size can verify."""
    if not diffs:
        return None
    rows = np.concatenate([np.asarray(d, dtype=np.float64) for d in diffs])
    k, n = rows.shape
    per_image = rows.mean(axis=0)
    pooled_sd = float(per_image.std(ddof=1)) if n > 1 else 0.0
    sd = rows.std(axis=1, ddof=1) if n > 1 else np.zeros(k)
    z = statistics.NormalDist().inv_cdf(1.0 - 0.05 / k)
    lower = 100.0 * (rows.mean(axis=1) - z * sd / np.sqrt(n))
    ends = np.cumsum([len(d) for d in diffs])
    signs = np.random.default_rng(0).choice(np.array([-1.0, 1.0]), size=(n, draws))
    null_max = (rows @ signs).max(axis=0) / n
    return DropStatistics(
        k,
        100.0 * float(per_image.mean()),
        100.0 * 1.96 * pooled_sd / float(np.sqrt(n)),
        float(lower.max()),
        100.0 * float(np.percentile(null_max, 95)),
        tuple(float(part.max()) for part in np.split(lower, ends[:-1])),
    )


@dataclass(frozen=True)
class LossyFigures:
    checkpoint: str
    images: str
    splits: list[LossySplit]
    drops: DropStatistics | None = None
    """Over every split with a width and every exit after it; None without any."""

    @property
    def ratio(self) -> float:
        return sum(r.float32_bytes for r in self.splits) / sum(r.sent_bytes for r in self.splits)

    @property
    def drop_pts(self) -> float | None:
        drops = [r.drop_pts for r in self.splits if r.drop_pts is not None]
        return max(drops) if drops else None

    @property
    def margin_pts(self) -> float | None:
        """The sampling noise (``LossySplit.margin_pts``) of the split with the largest drop."""
        measured = [r for r in self.splits if r.drop_pts is not None]
        worst = max(measured, key=lambda r: r.drop_pts or 0.0, default=None)
        return None if worst is None else worst.margin_pts

    @property
    def refuted_splits(self) -> list[int]:
        """The splits where these images show, with 95 % family-wise confidence, an exit
        losing more than the profile's bound (``LossySplit.lower_pts`` above ``bound_pts``)."""
        return [
            r.split
            for r in self.splits
            if r.lower_pts is not None and r.bound_pts is not None and r.lower_pts > r.bound_pts
        ]


def measure_lossy(checkpoint: str, images: int) -> LossyFigures:
    """sparse_uintb on `checkpoint` at the widths its profile records (`spinn profile`),
    on the last `images` of the test split of the model's own dataset, held out from the
    calibration that chose the widths: the training split's first images (`spinn
    profile`), or in a profile made before, the test split's first images, after which
    alone it takes them (fewer than `images` if need be, said in ``images``). Splits
    1..S-1, each input packed alone as the device packs it; split 0 is the input frame,
    which goes as uint8_image (§6.8), not this codec."""
    from pathlib import Path

    import torch

    from bench._common import frames_dataset
    from spinn.model.checkpoint import load_checkpoint
    from spinn.offline import data
    from spinn.offline.profiling import lossy_drop_differences

    model, meta = load_checkpoint(checkpoint)
    profile = Profile.load(Path(checkpoint).with_name("profile.json"))
    test = data.load_fashion_mnist("test")
    # Widths measured on the training split (spinn profile's default) leave every test
    # image held out; those of a profile made before it came from the first test images,
    # and only the images after them are held out.
    on_test = profile.precision_data.rsplit("/", 1)[-1] in ("", "test")
    first = profile.precision_inputs if on_test else 0
    if first >= len(test):
        raise ValueError(
            f"{checkpoint}'s profile chose its widths on the first {first} test images: "
            "none is left held out"
        )
    held_out = slice(max(first, len(test) - images), len(test))
    images_set = test.subset(held_out)
    if frames_dataset(meta.recipe) == "fashion-mnist-camera":
        frames = data.render_camera_frames(images_set.images, np.arange(len(test))[held_out])
        images_set = data.ImageSet(frames, images_set.labels, images_set.class_names, "camera")
    name = f"{images_set.name} test images {held_out.start}..{held_out.stop - 1}"
    if len(images_set) < images:
        name += f" (not the last {images}: the widths were chosen on the first {first})"
    x = model.input_spec.preprocess(images_set.images)
    rows = []
    diffs = []
    with torch.inference_mode():
        act = x
        for split in range(1, model.num_stages):
            act = model.run_trunk(split - 1, act)
            lossy = profile.splits[split].lossy
            arrays = [a[None].numpy() for a in act]
            drop = margin = None
            if lossy is None:
                sent = sum(pack(a, "sparse_int8", True).nbytes for a in arrays)
            else:
                sent = sum(pack(a, LOSSY_CODEC, True, bits=lossy.bits).nbytes for a in arrays)
                diff = lossy_drop_differences(
                    model, x, images_set.labels, split, lossy.bits, acts=act
                )
                diffs.append(diff.numpy())
                worst = int(diff.mean(dim=1).argmax())
                drop = max(0.0, 100.0 * float(diff[worst].mean()))
                margin = 100.0 * 1.96 * float(diff[worst].std()) / len(images_set) ** 0.5
            bits = None if lossy is None else lossy.bits
            float32 = sum(a.nbytes for a in arrays)
            claim = None
            if lossy is not None:
                claim = lossy.bound_pts if lossy.drop_bound_pts is None else lossy.drop_bound_pts
            rows.append(LossySplit(split, bits, float32, sent, drop, margin, claim))
    drops = drop_statistics(diffs)
    if drops is not None:  # each split's family-wise lower bound beside its claim
        lowers = iter(drops.split_lower_pts)
        rows = [r if r.bits is None else replace(r, lower_pts=next(lowers)) for r in rows]
    return LossyFigures(checkpoint, name, rows, drops)


def print_lossy(figures: LossyFigures) -> None:
    print(f"\nsparse_uintb at the profile's widths, {figures.checkpoint}, {figures.images}")
    print(
        f"  {'split':>5} {'bits':>5} {'x smaller':>10} {'accuracy drop (95%)':>19} "
        f"{'profile bound':>13} {'lower (fw 95%)':>14}"
    )
    for r in figures.splits:
        bits = "-" if r.bits is None else str(r.bits)
        drop, claim = "sparse_int8", ""
        if r.drop_pts is not None:
            drop = f"{r.drop_pts:.2f} ± {r.margin_pts or 0.0:.2f} pts"
        if r.bound_pts is not None and r.lower_pts is not None:
            claim = f"{r.bound_pts:13.2f} {r.lower_pts:14.2f}"
        ratio = r.float32_bytes / r.sent_bytes
        print(f"  {r.split:5d} {bits:>5} {ratio:9.1f}x {drop:>19} {claim}".rstrip())
    drop_pts = figures.drop_pts
    ratio_verdict = "met" if figures.ratio >= LOSSY_RATIO_TARGET else "missed"
    print(f"  all splits: {figures.ratio:.1f}x smaller than float32 "
          f"(target >= {LOSSY_RATIO_TARGET:g}x, {ratio_verdict})")  # fmt: skip
    if drop_pts is None:
        print("  accuracy drop: not measured, the profile records no width")
    else:
        print_drops(drop_pts, figures.margin_pts or 0.0, figures.drops)
        refuted = figures.refuted_splits
        print(
            f"  the profile's bound: refuted at splits {refuted} (an exit's lower bound above it)"
            if refuted
            else "  the profile's bound: refuted at no split (no exit's lower bound above it)"
        )


def print_drops(drop_pts: float, margin_pts: float, drops: DropStatistics | None) -> None:
    """The accuracy the widths cost on the held-out images, with what the noise of the
    estimates allows to conclude about the target (`drop_statistics`)."""
    target = LOSSY_DROP_TARGET_PTS
    verdict = "met" if drop_pts <= target else "missed"
    count = "" if drops is None else f" of {drops.estimates} (split, exit) estimates"
    print(f"  largest accuracy drop{count} {drop_pts:.2f} ± {margin_pts:.2f} points "
          f"(target <= {target:g}, {verdict} as measured; ± its 95% sampling interval)")  # fmt: skip
    if drops is None:
        return
    print(f"    by noise alone, with no drop at any exit, the largest of these estimates "
          f"reaches {drops.noise_pts:.2f} one time in 20")  # fmt: skip
    shown = "some exit's drop is" if drops.lower_pts > target else "no exit's drop is"
    print(f"    {shown} above {target:g} with 95% family-wise confidence (largest lower "
          f"bound {drops.lower_pts:.2f}: the target "
          f"{'refuted' if drops.lower_pts > target else 'not refuted'})")  # fmt: skip
    upper = drops.pooled_pts + drops.pooled_margin_pts
    pooled = (
        "met with 95% confidence" if upper <= target
        else "met as measured" if drops.pooled_pts <= target
        else "missed"
    )  # fmt: skip
    print(f"  pooled over the splits and the exits after each: {drops.pooled_pts:.2f} ± "
          f"{drops.pooled_margin_pts:.2f} points (target <= {target:g}, {pooled})")  # fmt: skip


def zstd_speeds(arrays: Sequence[np.ndarray], repeats: int) -> tuple[float, float]:
    """Measured zstd speeds on sparse_int8 payloads, bytes/s: (compress, decompress)."""
    import zstandard

    from protocol.packing import ZSTD_LEVEL

    payloads = [pack(a, "sparse_int8", False).payload for a in arrays]
    total = sum(len(p) for p in payloads)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    dctx = zstandard.ZstdDecompressor()
    frames = [cctx.compress(p) for p in payloads]
    t_c = _best_time(lambda: [cctx.compress(p) for p in payloads], repeats)
    t_d = _best_time(lambda: [dctx.decompress(f) for f in frames], repeats)
    return total / t_c, total / t_d


# -- loopback --------------------------------------------------------------------------------


def _frames() -> tuple[Infer, Result]:
    rng = np.random.default_rng(0)
    tensor = rng.standard_normal(FRAME_PAYLOAD // 4).astype(np.float32)
    infer = Infer(0, 1, 0.8, pack(tensor.reshape(1, -1), "float32", compress=False))
    return infer, Result(0, 2, (3, 1, 4), (0.9, 0.06, 0.01), compute_ms=1.5)


def _handshake_pair() -> tuple[Connection, Connection, list[bytes]]:
    """A device and a server connection past the handshake, and the bytes it took."""
    device, server = Connection(Role.DEVICE), Connection(Role.SERVER)
    hello = device.send(Hello(PROTOCOL_VERSION, "bench", "", CODECS))
    server.receive_data(hello)
    server.next_event()
    welcome = server.send(
        Welcome(PROTOCOL_VERSION, "bench", "", CODECS, True, description=stub_description())
    )
    device.receive_data(welcome)
    device.next_event()
    return device, server, [hello, welcome]


def _tune(sock: socket.socket) -> None:
    """Same settings for raw and framed: no Nagle delay, and socket buffers that hold a
    whole 1 MiB frame, so a non-blocking writer is not woken once per 64 KiB."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed during a raw round trip")
        got += n


def _raw_server(listener: socket.socket, request_len: int, response: bytes) -> None:
    conn, _ = listener.accept()
    _tune(conn)
    buf = memoryview(bytearray(request_len))
    with conn:
        while True:
            try:
                _recv_exactly(conn, buf)
            except ConnectionError:
                return
            conn.sendall(response)


class _FramedProtocol(asyncio.BufferedProtocol):
    """The runtime's pattern: bytes straight into the Connection's buffer, events out."""

    def __init__(self, conn: Connection, on_event: Callable[[Any], None]) -> None:
        self.conn = conn
        self.on_event = on_event
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune(sock)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        while (event := self.conn.next_event()) is not NEED_DATA:
            self.on_event(event)

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        while (event := self.conn.next_event()) is not NEED_DATA:
            self.on_event(event)
            if isinstance(event, ConnectionClosed):
                break
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _framed_server_main(listener: socket.socket) -> None:
    _, result = _frames()
    exit_index, classes, probs = result.exit_index, result.classes, result.probs
    compute_ms = result.compute_ms
    conn = Connection(Role.SERVER)
    done = asyncio.get_running_loop().create_future()

    def on_event(event: object) -> None:
        assert proto.transport is not None
        if isinstance(event, Hello):
            proto.transport.write(
                conn.send(
                    Welcome(
                        PROTOCOL_VERSION, "bench", "", CODECS, True, description=stub_description()
                    )
                )
            )
        elif isinstance(event, Infer):
            answer = Result(event.request_id, exit_index, classes, probs, compute_ms)
            proto.transport.write(conn.send(answer))
        elif isinstance(event, (Bye, ConnectionClosed)) and not done.done():
            done.set_result(None)

    proto = _FramedProtocol(conn, on_event)
    loop = asyncio.get_running_loop()
    sock, _ = await loop.sock_accept(listener)
    await loop.connect_accepted_socket(lambda: proto, sock)
    await asyncio.wait_for(done, 120)
    assert proto.transport is not None
    proto.transport.close()


def _server_process(kind: str, listener: socket.socket, request_len: int, response: bytes) -> None:
    if kind == "raw":
        _raw_server(listener, request_len, response)
    else:
        import uvloop

        listener.setblocking(False)
        uvloop.run(_framed_server_main(listener))


def _start_server(kind: str, request_len: int, response: bytes) -> tuple[Any, int]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    ctx = mp.get_context("fork")  # the listener socket is inherited as is
    proc = ctx.Process(target=_server_process, args=(kind, listener, request_len, response))
    proc.start()
    listener.close()
    return proc, port


def raw_round_trips(port: int, request: bytes, response_len: int, n: int, window: int) -> float:
    """Seconds for `n` request/response round trips with blocking sockets, at most
    `window` requests in flight (a reader thread collects the responses)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        _tune(sock)
        buf = memoryview(bytearray(response_len))
        sock.sendall(request)  # warm-up round trip
        _recv_exactly(sock, buf)
        if window == 1:
            t0 = time.perf_counter()
            for _ in range(n):
                sock.sendall(request)
                _recv_exactly(sock, buf)
            return time.perf_counter() - t0
        slots = threading.Semaphore(window)

        def reader() -> None:
            for _ in range(n):
                _recv_exactly(sock, buf)
                slots.release()

        t0 = time.perf_counter()
        thread = threading.Thread(target=reader)
        thread.start()
        for _ in range(n):
            slots.acquire()
            sock.sendall(request)
        thread.join()
        return time.perf_counter() - t0


async def _framed_client(port: int, infer: Infer, n: int, window: int) -> float:
    """Seconds for `n` INFER/RESULT round trips through `Connection` on the running loop,
    at most `window` requests in flight."""
    loop = asyncio.get_running_loop()
    conn = Connection(Role.DEVICE)
    welcomed: asyncio.Future[None] = loop.create_future()
    warmed: asyncio.Future[None] = loop.create_future()
    finished: asyncio.Future[None] = loop.create_future()
    slots = asyncio.Semaphore(window)
    answered = 0

    def on_event(event: object) -> None:
        nonlocal answered
        if isinstance(event, Welcome):
            welcomed.set_result(None)
        elif isinstance(event, Result):
            answered += 1
            slots.release()
            if answered == 1:
                warmed.set_result(None)
            if answered == n + 1:
                finished.set_result(None)
        else:
            raise RuntimeError(f"unexpected event {event!r}")

    proto = _FramedProtocol(conn, on_event)
    transport, _ = await loop.create_connection(lambda: proto, "127.0.0.1", port)
    transport.write(conn.send(Hello(PROTOCOL_VERSION, "bench", "", CODECS)))
    await welcomed
    t0 = 0.0
    for i in range(n + 1):
        await slots.acquire()
        transport.writelines(conn.send_parts(Infer(i, infer.split, infer.thr_conf, infer.tensor)))
        if i == 0:  # the first round trip is a warm-up, answered before the clock starts
            await warmed
            t0 = time.perf_counter()
    await finished
    elapsed = time.perf_counter() - t0
    transport.write(conn.send(Bye()))
    transport.close()
    await proto.closed
    return elapsed


def loopback(frames: int, repeats: int, window: int) -> tuple[float, float, float, int]:
    """Raw and framed round trips, back to back in each of `repeats` passes.

    Returns the best MiB/s of each (both directions counted), the median over passes of
    framed/raw measured in the same pass (robust to load that drifts between passes), and
    the INFER frame size.
    """
    import uvloop

    infer, result = _frames()
    device, server, _ = _handshake_pair()
    request = device.send(infer)
    server.receive_data(request)
    server.next_event()
    response = server.send(result)
    per_trip = len(request) + len(response)
    best = {"raw": 0.0, "framed": 0.0}
    ratios = []
    for _ in range(repeats):
        speed = {}
        for kind in ("raw", "framed"):
            proc, port = _start_server(kind, len(request), response)
            try:
                if kind == "raw":
                    seconds = raw_round_trips(port, request, len(response), frames, window)
                else:
                    client = _framed_client(port, infer, frames, window)
                    seconds = uvloop.run(asyncio.wait_for(client, 120))
            finally:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
            speed[kind] = per_trip * frames / seconds / 2**20
            best[kind] = max(best[kind], speed[kind])
        ratios.append(speed["framed"] / speed["raw"])
    return best["raw"], best["framed"], statistics.median(ratios), len(request)


# -- report ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__)
    parser.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, help="model to take activations from"
    )
    parser.add_argument("--images", type=int, default=32, help="Fashion-MNIST test images")
    parser.add_argument(
        "--dict-images",
        type=int,
        default=200,
        help="Fashion-MNIST training images the headroom rows' zstd dictionaries learn from, "
        "and sparse_int8_zdict's where none ship beside the checkpoint",
    )
    parser.add_argument(
        "--lossy-images",
        type=int,
        default=10_000,
        help="held-out test images (the last of the split) sparse_uintb's ratio and accuracy "
        "drop are measured on, for the checkpoint and the shipped camera model if there is one "
        "(default: all 10,000 where the profile's widths were chosen on training images; "
        "fewer where they were chosen on the first test images: those after them)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="passes; the best is reported")
    parser.add_argument("--frames", type=int, default=60, help="1 MiB round trips per pass")
    parser.add_argument(
        "--window",
        type=int,
        default=4,
        help="requests in flight for the throughput run (default 4: the device's max_in_flight)",
    )
    args = parser.parse_args(argv)
    if min(args.images, args.repeats, args.frames, args.window, args.dict_images) < 1:
        parser.error("--images, --dict-images, --repeats, --frames and --window must be >= 1")
    if not 1 <= args.lossy_images <= 10_000:
        parser.error("--lossy-images must be in 1..10000 (the test split's size)")

    try:
        acts = collect_activations(args.checkpoint, args.images, dict_images=args.dict_images)
    except DictionaryError as exc:  # only training raises: a shipped file that fails is skipped
        parser.error(f"--dict-images {args.dict_images} cannot train the dictionaries: {exc}")
    dictionaries = acts.dictionaries
    assert dictionaries is not None, "dict_images >= 1 trains them where none ship"
    print(f"activations: {acts.source}; dictionaries: {acts.dictionaries_note}")
    print(f"  {len(acts.arrays)} tensors = {args.images} images x {len(acts.per_split)} splits")
    per_split = split_compression(acts, dictionaries)
    print(
        f"  {'split':>5} {'shape':<14} {'zeros':>5} {'sparse+zstd':>11} {'zdict':>7} "
        f"{'int8 bits/value':>15} {'order-0 ideal':>13}"
    )
    for c in per_split:
        shape = "x".join(map(str, acts.per_split[c.split][0]))
        print(
            f"  {c.split:5d} {shape:<14} {c.zeros:5.0%} {c.ratio:10.2f}x {c.zdict_ratio:6.2f}x "
            f"{c.value_bits:15.2f} {c.order0_ratio:12.2f}x"
        )
    sparsity = float(np.mean([z for _, z in acts.per_split.values()]))
    raw_bytes = [c.raw_bytes for c in per_split]
    zeros = [c.zeros for c in per_split]
    pooled_ratio, half_pooled = _ratios(raw_bytes, [c.packed_bytes for c in per_split], zeros)
    zdict_pooled, zdict_half_pooled = _ratios(raw_bytes, [c.zdict_bytes for c in per_split], zeros)
    pooled_ideal = 8 * sum(raw_bytes) / sum(c.ideal_bits for c in per_split)
    half_ratio = round(half_pooled, 2) if half_pooled is not None else None
    zdict_half = round(zdict_half_pooled, 2) if zdict_half_pooled is not None else None
    print(
        f"  all splits: sparse+zstd {pooled_ratio:.2f}x, zdict {zdict_pooled:.2f}x "
        f"(order-0 yardstick {pooled_ideal:.2f}x); "
        + (
            f"splits with >= 50% zeros: sparse+zstd {half_ratio:.2f}x, zdict {zdict_half:.2f}x"
            if half_ratio is not None and zdict_half is not None
            else "no split has >= 50% zeros"
        )
    )
    target = f"target >= {HALF_SPARSE_TARGET:g}x on splits with >= 50% zeros: {DICT_CODEC}"
    if zdict_half is None:
        print(f"  {target}: not measured, no split has >= 50% zeros")
    else:
        verdict = "met" if zdict_half >= HALF_SPARSE_TARGET else "missed"
        print(f"  {target} {zdict_half:.2f}x, {verdict}")
    train = collect_activations(args.checkpoint, args.dict_images, "train")
    headroom = coder_headroom(acts, train)
    print("  the same sparse_int8 payloads, coded otherwise (lossless; not what is sent):")
    for v in headroom:
        print(f"    {v}")
    ceiling = static_model_ceiling(acts, train)
    if ceiling is not None:
        print(f"    {ceiling}  (no zstd: a table-driven entropy coder's ceiling)")

    # Loopback first: it needs both cores; packing is then pinned to one.
    passes = args.repeats
    raw_win, framed_win, ratio_win, frame_len = loopback(args.frames, passes, args.window)
    raw_seq, framed_seq, ratio_seq, _ = loopback(args.frames, passes, window=1)
    core = pin_one_core()

    rows = [measure_codec(acts.arrays, c, z, args.repeats) for c in CODECS for z in (False, True)]
    big = [measure_codec(acts.batched, c, z, args.repeats) for c in CODECS for z in (False, True)]
    # sparse_int8_zdict is always zstd-coded (with compress=False it would send sparse_int8).
    zdict = measure_codec(
        acts.arrays,
        DICT_CODEC,
        True,
        args.repeats,
        dictionaries=dictionaries,
        tables=acts.array_splits,
    )
    zdict_big = measure_codec(
        acts.batched,
        DICT_CODEC,
        True,
        args.repeats,
        dictionaries=dictionaries,
        tables=list(acts.per_split),
    )
    c_bps, d_bps = zstd_speeds(acts.arrays, args.repeats)
    inputs = [measure_input(*frames, dictionaries) for frames in input_frames(args.images)]

    kib = sum(a.nbytes for a in acts.arrays) / len(acts.arrays) / 1024
    big_kib = sum(a.nbytes for a in acts.batched) / len(acts.batched) / 1024
    print(f"\npacking on one core (core {core}), CPU time, best of {args.repeats} passes")
    print(f"batch 1 = {kib:.0f} KiB float32 per call; batch {args.images} = {big_kib:.0f} KiB")
    header = (
        f"{'codec':<17} {'zstd':<5} {'x smaller':>9} {'pack MB/s':>10} {'unpack MB/s':>12} "
        f"{'max err':>12}   {'batch pack':>10} {'batch unpack':>12}"
    )
    print(header)
    for r, b in zip([*rows, zdict], [*big, zdict_big], strict=True):
        quantised = r.codec in _QUANTISED
        err = f"{r.max_err_scales:.3f} scale" if quantised else f"{r.max_err_scales:.2g}"
        coded = "dict" if r.codec == DICT_CODEC else "yes" if r.zstd else "no"
        print(
            f"{r.codec:<17} {coded:<5} {r.ratio:9.2f} {r.pack_mb_s:10.0f} "
            f"{r.unpack_mb_s:12.0f} {err:>12}   {b.pack_mb_s:10.0f} {b.unpack_mb_s:12.0f}"
        )
    print(
        f"zstd on sparse_int8 payloads: compress {c_bps / 1e6:.0f} MB/s "
        f"(constant {ZSTD_COMPRESS_BPS / 1e6:.0f}), decompress {d_bps / 1e6:.0f} MB/s "
        f"(constant {ZSTD_DECOMPRESS_BPS / 1e6:.0f})"
    )
    print(
        f"\nloopback, {frame_len} B INFER answered by RESULT: best MiB/s of {passes} passes, "
        "framed/raw = median of the per-pass ratios"
    )
    print(
        f"{'in flight':<10} {'raw sendall/recv_into':>22} {'framed (uvloop)':>16} {'framed/raw':>11}"
    )
    print(f"{args.window:<10} {raw_win:22.0f} {framed_win:16.0f} {ratio_win:11.0%}  (throughput)")
    print(f"{1:<10} {raw_seq:22.0f} {framed_seq:16.0f} {ratio_seq:11.0%}  (serial round trips)")
    print_input(inputs)
    # After the timed runs: the accuracy runs use both cores' worth of torch.
    checkpoints = [args.checkpoint]
    camera = MODELS_DIR / "camera" / "model.pt"
    if camera.exists() and camera.with_name("profile.json").exists():
        checkpoints.append(str(camera))
    try:
        lossy = [measure_lossy(c, args.lossy_images) for c in checkpoints]
    except ValueError as exc:  # held-out images the widths were chosen on
        parser.error(str(exc))
    for measured in lossy:
        print_lossy(measured)

    sparse = next(r for r in rows if r.codec == "sparse_int8" and not r.zstd)
    sparse_z = next(r for r in rows if r.codec == "sparse_int8" and r.zstd)
    sparse_big = next(r for r in big if r.codec == "sparse_int8" and not r.zstd)
    figures = {
        "bench": "wire",
        "activations": acts.source,
        "sparsity": round(sparsity, 3),
        "sparse_zstd_ratio": round(sparse_z.ratio, 2),
        "sparse_zstd_ratio_min": round(min(c.ratio for c in per_split), 2),
        "sparse_zstd_ratio_max": round(max(c.ratio for c in per_split), 2),
        "sparse_zstd_ratio_half_sparse": half_ratio,  # splits with >= 50% zeros, pooled
        "order0_ideal_ratio": round(pooled_ideal, 2),
        "headroom_best_ratio": round(max(v.ratio for v in headroom), 2),
        "headroom_best_half_sparse": max(
            (round(v.half_sparse, 2) for v in headroom if v.half_sparse is not None), default=None
        ),
        "static_model_ratio": round(ceiling.ratio, 2) if ceiling else None,
        "static_model_half_sparse": (
            round(ceiling.half_sparse, 2) if ceiling and ceiling.half_sparse is not None else None
        ),
        "int8_bits_per_value": round(float(np.mean([c.value_bits for c in per_split])), 2),
        "sparse_ratio": round(sparse.ratio, 2),
        "pack_mb_s": round(sparse.pack_mb_s, 1),
        "unpack_mb_s": round(sparse.unpack_mb_s, 1),
        "pack_zstd_mb_s": round(sparse_z.pack_mb_s, 1),
        "unpack_zstd_mb_s": round(sparse_z.unpack_mb_s, 1),
        "pack_batch_mb_s": round(sparse_big.pack_mb_s, 1),
        "unpack_batch_mb_s": round(sparse_big.unpack_mb_s, 1),
        "max_err_scales": round(max(r.max_err_scales for r in rows if r.codec.endswith("int8")), 4),
        "zstd_compress_mb_s": round(c_bps / 1e6, 1),
        "zstd_decompress_mb_s": round(d_bps / 1e6, 1),
        "raw_mib_s": round(raw_win, 1),
        "framed_mib_s": round(framed_win, 1),
        "framing_vs_raw": round(ratio_win, 3),
        "window": args.window,
        "framing_vs_raw_serial": round(ratio_seq, 3),
        "raw_serial_mib_s": round(raw_seq, 1),
        "framed_serial_mib_s": round(framed_seq, 1),
        "zdict_ratio": round(zdict.ratio, 2),
        "zdict_ratio_min": round(min(c.zdict_ratio for c in per_split), 2),
        "zdict_ratio_max": round(max(c.zdict_ratio for c in per_split), 2),
        "zdict_ratio_half_sparse": zdict_half,  # splits with >= 50% zeros, pooled
        "zdict_pack_mb_s": round(zdict.pack_mb_s, 1),
        "zdict_unpack_mb_s": round(zdict.unpack_mb_s, 1),
        "dictionaries": acts.dictionaries_origin,
        # Split 0 (PROTOCOL.md §6.8), bytes per image: what is sent (uint8_image), the raw
        # frame, and the normalised float input split 0 sent before, per frame size.
        "input_bytes": {
            r.name: {"sent": r.sent, "pixels": r.pixels, **r.before, **r.image} for r in inputs
        },
    }
    # sparse_uintb (PROTOCOL.md §6.9) at the profile's widths, held-out images: the
    # checkpoint's, then the camera model's where it ships.
    for key, lossy_figures in zip(("", "_camera"), lossy, strict=False):
        drop_pts = lossy_figures.drop_pts
        figures[f"lossy{key}_ratio"] = round(lossy_figures.ratio, 2)
        figures[f"lossy{key}_accuracy_drop_pts"] = None if drop_pts is None else round(drop_pts, 2)
        margin = lossy_figures.margin_pts
        figures[f"lossy{key}_accuracy_drop_margin_pts"] = (
            None if margin is None else round(margin, 2)
        )
        figures[f"lossy{key}_bits"] = [r.bits for r in lossy_figures.splits]
        figures[f"lossy{key}_bound_refuted_splits"] = lossy_figures.refuted_splits
        drops = lossy_figures.drops
        for name in ("pooled", "pooled_margin", "lower", "noise"):
            value = None if drops is None else getattr(drops, f"{name}_pts")
            figures[f"lossy{key}_accuracy_drop_{name}_pts"] = (
                None if value is None else round(value, 2)
            )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
