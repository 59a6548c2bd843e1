"""Offline profiler (docs/DESIGN.md part 3; docs/ARCHITECTURE.md "Offline profile").

On a calibration set it measures, for every split s = 0..S-1, what crosses the
network (shape, and the packed bytes per codec of ``protocol.packing`` on real
activations, median per input, and at split 0 those of the frame's pixels as well); for every stage, the device and server time of the
stage plus its exit head (batch 1, median of repeated runs, with the thread count
used); and for a grid of thresholds, the share of inputs leaving at each exit and the
accuracy. The result is a ``spinn.decisions.offline_profile.Profile``: the scheduler and the runtime read
only that file plus live measurements.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import torch
from torch import Tensor

from protocol.dictionaries import ZstdDictionaries
from protocol.packing import CODECS, DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, pack, unpack
from spinn.decisions.offline_profile import (
    LossyChoice,
    Precision,
    Profile,
    SplitProfile,
    ThresholdProfile,
)
from spinn.model.checkpoint import CheckpointMeta
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import ImageSet
from spinn.offline.evaluate import collect_probs, sweep

__all__ = [
    "LOSSY_BITS_TRIED",
    "LOSSY_BOUND_PTS",
    "LOSSY_CONFIDENCE_Z",
    "LOSSY_INPUTS",
    "LOSSY_SPLIT",
    "PROFILE_THRESHOLDS",
    "ProfilerConfig",
    "choose_lossy_bits",
    "codec_names",
    "drop_with_bound",
    "lossy_accuracy_drop_pts",
    "lossy_drop_differences",
    "measure_precision_bytes",
    "measure_precisions",
    "measure_split_bytes",
    "profile_model",
    "reprofile_precisions",
    "time_stages",
]

log = logging.getLogger(__name__)

#: Threshold grid of the profile; the scheduler resolves other values to the next one up.
PROFILE_THRESHOLDS: tuple[float, ...] = (
    0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99,
    1.0,
)  # fmt: skip

LOSSY_BOUND_PTS = 0.5
"""Default bound on the accuracy drop (points) of a split's sparse_uintb precision."""

LOSSY_BITS_TRIED: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
"""The widths tried per split, fewest first: the first within the bound is kept."""

LOSSY_CONFIDENCE_Z = 1.645
"""A width is kept when the one-sided 95 % upper confidence bound of its drop (normal
quantile 1.645) is within the bound, not the measured drop alone: the drop is the largest
over about five exits and is noisy where a few dozen answers change. The largest of the
exits' bounds covers the largest true drop with 95 % confidence (it is at least the bound
of the exit that has it). The default model's widths, chosen on training images, cost
at most 0.23 ± 0.21 points at any of its 38 (split, exit) pairs on all 10,000 test
images, all held out (``bench.wire``; noise alone makes the largest reach 0.28 one time in
20 there); the camera model's at most 0.30 ± 0.21 at any of its 28 (noise alone:
0.30). On 2,000 held-out images alone the largest of such maxima reaches 0.65-0.70 by
noise (before, 0.70 and 0.75 were measured so): the noise of a maximum, not a drop beyond
the bound."""

LOSSY_INPUTS = 8000
"""Inputs the widths are measured on: the first of the training split (`LOSSY_SPLIT`)."""

LOSSY_SPLIT = "train"
"""The split of the model's data set the widths are measured on (``spinn profile
--lossy-split``): images that are not test images, so that all 10,000 test images stay
held out for ``bench.wire``. The shipped models were trained on all 60,000 training
images (no validation split), which they fit better than unseen ones; yet the drop a
width costs, which comes from the inputs near a decision boundary, is no smaller there:
on the default model, at the 20 (split, width) pairs measured on both with drops under
5 points, the first 8,000 training images show drops 0.07 points larger on average than
the first 8,000 test images (−0.23 to +0.45), and two splits get a wider width; on the
camera model, at 17 such pairs, 0.05 points larger (−0.56 to +0.40)
(models/*/README.md)."""


@dataclass(frozen=True)
class ProfilerConfig:
    """How to profile; the CLI (spinn profile) only fills this in."""

    calibration_size: int = 2000
    """Inputs used for exit rates and accuracy (the first N of the calibration set)."""
    bytes_inputs: int = 100
    """Inputs whose activations are packed to measure bytes per codec."""
    timing_inputs: int = 5
    """Distinct inputs cycled through the timing runs."""
    repeats: int = 30
    """Timed runs per stage (after ``warmup``); the median is kept."""
    warmup: int = 5
    """Untimed runs first, so allocations and caches settle."""
    device_threads: int = 1
    """torch threads for the device timings (a phone-class device: 1)."""
    server_threads: int = 1
    """torch threads for the server timings; 1 matches the runtime server's default of
    one torch thread per worker (batch-1 stages gain little from more, and a second
    thread stalls at every parallel region when the cores are shared)."""
    thresholds: tuple[float, ...] = PROFILE_THRESHOLDS
    """thr_conf grid for exit rates and accuracy."""
    lossy_inputs: int = LOSSY_INPUTS
    """Inputs on which each split's sparse_uintb widths are measured: the first ones of
    the widths' data set (``lossy_data`` of `profile_model`: the training split for
    ``spinn profile``), which may be more than ``calibration_size`` (a narrow width's drop
    is a difference of a few answers in a thousand, and needs many inputs to bound)."""
    lossy_bound_pts: float | None = LOSSY_BOUND_PTS
    """Largest accuracy drop (points) a split's sparse_uintb width may cost, with 95 %
    confidence on the calibration inputs (PROTOCOL.md §6.9.1); None: no lossy precision
    is measured."""

    def __post_init__(self) -> None:
        for name in (
            "calibration_size",
            "bytes_inputs",
            "timing_inputs",
            "repeats",
            "lossy_inputs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"profiler {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"profiler warmup must be >= 0, got {self.warmup}")
        if self.device_threads < 1 or self.server_threads < 1:
            raise ValueError("profiler thread counts must be >= 1")
        if not self.thresholds or any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"profiler thresholds must lie in [0, 1], got {self.thresholds}")
        if self.lossy_bound_pts is not None and not 0.0 <= self.lossy_bound_pts <= 100.0:
            raise ValueError(
                f"profiler lossy bound must be in [0, 100] points, got {self.lossy_bound_pts}"
            )


def codec_names() -> list[str]:
    """Profile codec keys: every packing codec, raw and with zstd (``<codec>+zstd``)."""
    return [name for c in CODECS for name in (c, f"{c}+zstd")]


def _split_activations(model: ProgressiveModel, x: Tensor) -> list[Tensor]:
    """Activation at every split 0..S-1 for a batch."""
    acts = [x]
    with torch.inference_mode():
        for k in range(model.num_stages - 1):
            acts.append(model.run_trunk(k, acts[-1]))
    return acts


def _lossy_sizes(arrays: Sequence[np.ndarray], bits: int) -> dict[str, int]:
    """Median ``sparse_uintb`` and ``sparse_uintb+zstd`` bytes of `arrays` at `bits`."""
    sizes = {}
    for compress in (False, True):
        per_input = [pack(a, LOSSY_CODEC, compress, bits=bits).nbytes for a in arrays]
        sizes[f"{LOSSY_CODEC}+zstd" if compress else LOSSY_CODEC] = int(
            statistics.median(per_input)
        )
    return sizes


def measure_precision_bytes(
    model: ProgressiveModel, x: Tensor, widths: Sequence[Sequence[int]]
) -> list[dict[int, dict[str, int]]]:
    """Per split s, the median sparse_uintb bytes (raw and with zstd) over the batch `x` at
    each width of ``widths[s]`` (PROTOCOL.md §6.9), each input packed alone."""
    result = []
    for split, act in enumerate(_split_activations(model, x)):
        arrays = [a.numpy() for a in act]
        bits = widths[split] if split < len(widths) else ()
        result.append({b: _lossy_sizes(arrays, b) for b in bits})
    return result


def measure_split_bytes(
    model: ProgressiveModel,
    x: Tensor,
    dictionaries: ZstdDictionaries | None = None,
    pixels: np.ndarray | None = None,
    lossy_bits: Sequence[int | None] = (),
) -> list[dict[str, int]]:
    """Median packed bytes per codec at every split 0..S-1 over the batch ``x``; with
    `dictionaries`, sparse_int8_zdict's too (table = split); with `pixels` (the uint8
    images ``x`` was made from, N×C×H×W), what split 0 sends as the frame's pixels:
    ``uint8_image`` and ``uint8_image+zstd`` (PROTOCOL.md §6.8); where `lossy_bits`
    gives split s a width, ``sparse_uintb`` and ``sparse_uintb+zstd`` at it (§6.9)."""
    result = []
    for split, act in enumerate(_split_activations(model, x)):
        arrays = [a.numpy() for a in act]
        sizes: dict[str, int] = {}
        for codec in CODECS:
            for compress in (False, True):
                per_input = [pack(a, codec, compress=compress).nbytes for a in arrays]
                key = f"{codec}+zstd" if compress else codec
                sizes[key] = int(statistics.median(per_input))
        if dictionaries is not None:
            per_input = [
                pack(a, DICT_CODEC, True, dictionaries=dictionaries, table=split).nbytes
                for a in arrays
            ]
            sizes[DICT_CODEC] = int(statistics.median(per_input))
        bits = lossy_bits[split] if split < len(lossy_bits) else None
        if bits is not None:
            sizes.update(_lossy_sizes(arrays, bits))
        if split == 0 and pixels is not None:
            for compress in (False, True):
                per_input = [pack(p[None], IMAGE_CODEC, compress).nbytes for p in pixels]
                key = f"{IMAGE_CODEC}+zstd" if compress else IMAGE_CODEC
                sizes[key] = int(statistics.median(per_input))
        result.append(sizes)
    return result


def _exit_predictions(model: ProgressiveModel, act: Tensor, split: int) -> Tensor:
    """Top-1 class of every exit read at a stage ≥ `split` for the batch `act` entering
    stage `split`: (exits after the split, N)."""
    preds = []
    with torch.inference_mode():
        for k in range(split, model.num_stages):
            act = model.run_trunk(k, act)
            e = model.exit_at_stage(k)
            if e is not None:
                preds.append(model.run_exit(e, act).argmax(dim=1))
    return torch.stack(preds)


def _through_codec(act: Tensor, bits: int) -> Tensor:
    """`act` (a batch) as the server decodes it, each input packed alone with sparse_uintb
    at `bits` (batch 1 on the wire: the scale is per input)."""
    decoded = [unpack(pack(a[None].numpy(), LOSSY_CODEC, False, bits=bits)) for a in act]
    return torch.from_numpy(np.concatenate(decoded))


def _split_inputs(model: ProgressiveModel, x: Tensor, split: int, batch_size: int) -> Tensor:
    """The activations entering stage `split` for the inputs `x`."""
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            act = x[i : i + batch_size]
            for k in range(split):
                act = model.run_trunk(k, act)
            chunks.append(act)
    return torch.cat(chunks)


def _exit_correct(
    model: ProgressiveModel,
    acts: Tensor,
    labels: Tensor,
    split: int,
    bits: int | None,
    batch_size: int,
) -> Tensor:
    """Whether every exit after `split` answers each input right from `acts`, each input
    through sparse_uintb at `bits` first (None: as they are): (exits after the split, N)."""
    right = []
    for i in range(0, len(labels), batch_size):
        batch = acts[i : i + batch_size]
        if bits is not None:
            batch = _through_codec(batch, bits)
        right.append(_exit_predictions(model, batch, split) == labels[i : i + batch_size])
    return torch.cat(right, dim=1)


def drop_with_bound(
    reference: Tensor, coded: Tensor, z: float = LOSSY_CONFIDENCE_Z
) -> tuple[float, float]:
    """(drop, upper bound) in points, each the largest over the exits (rows) of
    `reference` − `coded`, the per-input right/wrong of each exit without and with the
    codec. The bound is the paired difference's one-sided upper confidence bound, mean +
    `z`·sd/√N: an input the codec turns wrong counts +1, one it turns right −1, so the
    spread comes from the inputs whose answer changed (a McNemar-style interval)."""
    diff = reference.double() - coded.double()
    n = diff.shape[1]
    mean = diff.mean(dim=1)
    sd = diff.std(dim=1, correction=1) if n > 1 else torch.zeros_like(mean)
    upper = mean + z * sd / math.sqrt(n)
    return max(0.0, 100.0 * float(mean.max())), max(0.0, 100.0 * float(upper.max()))


def lossy_accuracy_drop_pts(
    model: ProgressiveModel,
    x: Tensor,
    labels: Tensor,
    split: int,
    bits: int,
    *,
    batch_size: int = 500,
) -> float:
    """Accuracy lost (points, ≥ 0) on (`x`, `labels`) when the activation entering `split`
    crosses as sparse_uintb at `bits`: the largest drop over the exits after the split,
    each exit against itself on the float activation (PROTOCOL.md §6.9.1)."""
    diff = lossy_drop_differences(model, x, labels, split, bits, batch_size=batch_size)
    return max(0.0, 100.0 * float(diff.mean(dim=1).max()))


def lossy_drop_differences(
    model: ProgressiveModel,
    x: Tensor,
    labels: Tensor,
    split: int,
    bits: int,
    *,
    batch_size: int = 500,
    acts: Tensor | None = None,
) -> Tensor:
    """Per exit after `split` and input of (`x`, `labels`): +1 where sparse_uintb at `bits`
    turns the exit's answer wrong, −1 where it turns it right, 0 else; (exits, N), float64.
    Each row's mean is that exit's drop, its spread the drop's sampling noise. `acts`: the
    activations entering `split` for `x`, where the caller has them (else computed)."""
    if acts is None:
        acts = _split_inputs(model, x, split, batch_size)
    reference = _exit_correct(model, acts, labels, split, None, batch_size)
    coded = _exit_correct(model, acts, labels, split, bits, batch_size)
    return reference.double() - coded.double()


def measure_precisions(
    model: ProgressiveModel,
    x: Tensor,
    labels: Tensor,
    split: int,
    bound_pts: float | None,
    *,
    bits_tried: tuple[int, ...] = LOSSY_BITS_TRIED,
    z: float = LOSSY_CONFIDENCE_Z,
    batch_size: int = 500,
) -> list[tuple[int, float, float]]:
    """(bits, drop, upper bound of the drop) in points for the sparse_uintb widths of the
    activation entering `split` on (`x`, `labels`), fewest bits first, up to the first
    whose bound is within `bound_pts` (None: every width in `bits_tried`); empty at split
    0, at device-only and for a negative activation, which the codec cannot carry.

    The drop is that of `lossy_accuracy_drop_pts`: the largest over the exits the server
    may answer from (those read at a stage ≥ split), since whatever the threshold, an
    answer comes from one of them. Wider widths than the first within the bound are not
    measured: they cost more bytes for a drop already within it, and lossless coding
    (no drop) is the scheduler's other option.
    """
    if split == 0 or split >= model.num_stages:
        return []
    acts = _split_inputs(model, x, split, batch_size)
    if bool((acts < 0).any()):
        return []
    reference = _exit_correct(model, acts, labels, split, None, batch_size)
    out = []
    for bits in sorted(bits_tried):
        coded = _exit_correct(model, acts, labels, split, bits, batch_size)
        drop, upper = drop_with_bound(reference, coded, z)
        out.append((bits, round(drop, 4), round(upper, 4)))
        if bound_pts is not None and upper <= bound_pts:
            break
    return out


def choose_lossy_bits(
    model: ProgressiveModel,
    x: Tensor,
    labels: Tensor,
    split: int,
    bound_pts: float,
    *,
    bits_tried: tuple[int, ...] = LOSSY_BITS_TRIED,
    z: float = LOSSY_CONFIDENCE_Z,
    batch_size: int = 500,
) -> LossyChoice | None:
    """The fewest bits whose sparse_uintb coding of the activation entering `split` costs
    at most `bound_pts` points of accuracy on (`x`, `labels`) with confidence: the upper
    confidence bound of its drop (`drop_with_bound`, one-sided 95 % at the default `z`)
    within the bound; or None (see `measure_precisions`)."""
    measured = measure_precisions(
        model, x, labels, split, bound_pts, bits_tried=bits_tried, z=z, batch_size=batch_size
    )
    return _choice(measured, bound_pts)


def _choice(measured: Sequence[tuple[int, float, float]], bound_pts: float) -> LossyChoice | None:
    """The fewest bits of `measured` whose drop's upper bound is within `bound_pts`."""
    for bits, drop, upper in measured:
        if upper <= bound_pts:
            return LossyChoice(bits, drop, bound_pts, drop_bound_pts=upper)
    return None


def time_stages(
    model: ProgressiveModel,
    inputs: Tensor,
    *,
    threads: int,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Median milliseconds of each stage plus its exit head, batch 1, with ``threads``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    samples: list[list[float]] = [[] for _ in range(model.num_stages)]
    try:
        with torch.inference_mode():
            for r in range(warmup + repeats):
                act = inputs[r % len(inputs)].unsqueeze(0)
                for k in range(model.num_stages):
                    t0 = clock()
                    act = model.run_trunk(k, act)
                    e = model.exit_at_stage(k)
                    if e is not None:
                        torch.softmax(model.run_exit(e, act), dim=1)
                    if r >= warmup:
                        samples[k].append((clock() - t0) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return [float(np.median(s)) for s in samples]


def profile_model(
    model: ProgressiveModel,
    meta: CheckpointMeta,
    data: ImageSet,
    cfg: ProfilerConfig = ProfilerConfig(),  # noqa: B008 - frozen dataclass, safe default
    *,
    now: datetime | None = None,
    dictionaries: ZstdDictionaries | None = None,
    lossy_data: ImageSet | None = None,
) -> Profile:
    """Measure ``model`` on ``data`` and return its offline profile (`dictionaries`: the
    model's zstd dictionaries, to profile sparse_int8_zdict as well; `lossy_data`: the
    images the sparse_uintb widths are chosen on, default `data`; their bytes are measured
    on `data` as every other codec's)."""
    model.eval()
    calib = data.head(cfg.calibration_size)
    if len(calib) == 0:
        raise ValueError(f"calibration set {data.name} is empty")
    if calib.shape != model.input_spec.shape:
        raise ValueError(
            f"calibration images {calib.shape} do not match the model input {model.input_spec.shape}"
        )
    pixels = calib.images[: cfg.bytes_inputs]
    x_bytes = model.input_spec.preprocess(pixels)
    widths = _measure_widths(
        model, data if lossy_data is None else lossy_data, cfg, x_bytes, "profile 0/4: "
    )
    log.info("profile 1/4: packing %d inputs at %d splits", len(x_bytes), model.num_stages)
    split_bytes = measure_split_bytes(model, x_bytes, dictionaries, pixels.numpy())
    for sizes, choice, measured in zip(split_bytes, widths.lossy, widths.precisions, strict=True):
        if choice is not None:
            sizes.update(next(p.bytes for p in measured if p.bits == choice.bits))
    x_time = model.input_spec.preprocess(calib.images[: cfg.timing_inputs])
    runs = cfg.warmup + cfg.repeats
    log.info("profile 2/4: timing %d stages x %d runs, device threads", model.num_stages, runs)
    device_ms = time_stages(
        model, x_time, threads=cfg.device_threads, repeats=cfg.repeats, warmup=cfg.warmup
    )
    log.info("profile 3/4: timing %d stages x %d runs, server threads", model.num_stages, runs)
    server_ms = time_stages(
        model, x_time, threads=cfg.server_threads, repeats=cfg.repeats, warmup=cfg.warmup
    )
    log.info("profile 4/4: exit rates and accuracy on %d %s images", len(calib), calib.name)
    probs, labels = collect_probs(model, calib)
    exit_accuracy = (probs.argmax(dim=2) == labels.unsqueeze(0)).double().mean(dim=1)
    rows = sweep(model, probs, labels, cfg.thresholds, model.num_stages)
    splits = tuple(
        SplitProfile(
            split=s,
            shape=model.split_shape(s),
            numel=int(np.prod(model.split_shape(s))),
            bytes=split_bytes[s],
            lossy=widths.lossy[s],
            precisions=widths.precisions[s],
        )
        for s in range(model.num_stages)
    )
    stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return Profile(
        model_id=meta.model_id,
        weights_sha256=meta.weights_sha256,
        arch=meta.arch,
        num_stages=model.num_stages,
        exit_stages=tuple(model.exit_stages),
        splits=splits,
        stage_device_ms=tuple(device_ms),
        stage_server_ms=tuple(server_ms),
        exit_accuracy=tuple(float(a) for a in exit_accuracy),
        thresholds=tuple(
            ThresholdProfile(thr_conf=r.thr_conf, exit_rate=r.exit_rate, accuracy=r.accuracy)
            for r in rows
        ),
        calibration_size=len(calib),
        device_threads=cfg.device_threads,
        server_threads=cfg.server_threads,
        created=stamp,
        precision_inputs=widths.inputs,
        precision_data=widths.data,
    )


@dataclass(frozen=True)
class _Widths:
    lossy: list[LossyChoice | None]
    precisions: list[tuple[Precision, ...]]
    inputs: int
    data: str


def _measure_widths(
    model: ProgressiveModel, data: ImageSet, cfg: ProfilerConfig, x_bytes: Tensor, step: str
) -> _Widths:
    """Every split's sparse_uintb widths (`measure_precisions`) on the first
    ``cfg.lossy_inputs`` inputs of `data`, their bytes on `x_bytes`, and the width chosen
    within ``cfg.lossy_bound_pts``."""
    none: list[LossyChoice | None] = [None] * model.num_stages
    if cfg.lossy_bound_pts is None:
        return _Widths(none, [()] * model.num_stages, 0, "")
    bound = cfg.lossy_bound_pts
    head = data.head(cfg.lossy_inputs)
    log.info(
        "%ssparse_uintb widths within %g points on %d %s inputs", step, bound, len(head), head.name
    )
    x = model.input_spec.preprocess(head.images)
    measured = []
    for s in range(model.num_stages):
        measured.append(measure_precisions(model, x, head.labels, s, bound))
        if measured[-1]:
            log.info("  split %d: (bits, drop, bound) %s", s, measured[-1])
    del x
    sizes = measure_precision_bytes(model, x_bytes, [[b for b, _, _ in m] for m in measured])
    precisions = [
        tuple(Precision(b, sizes[s][b], d, u) for b, d, u in m) for s, m in enumerate(measured)
    ]
    return _Widths([_choice(m, bound) for m in measured], precisions, len(head), head.name)


def reprofile_precisions(
    model: ProgressiveModel,
    profile: Profile,
    data: ImageSet,
    cfg: ProfilerConfig = ProfilerConfig(),  # noqa: B008 - frozen dataclass, safe default
    lossy_data: ImageSet | None = None,
) -> Profile:
    """`profile` with its sparse_uintb widths measured anew (`spinn profile
    --precision-only`): the widths on the first ``cfg.lossy_inputs`` of `lossy_data`
    (default `data`), their bytes on the first ``cfg.bytes_inputs`` of `data` and the
    choice within ``cfg.lossy_bound_pts``; every other field as it was (the stage timings
    in particular, which a loaded machine would change)."""
    model.eval()
    if profile.num_stages != model.num_stages:
        raise ValueError(
            f"the profile has {profile.num_stages} stages, the model {model.num_stages}"
        )
    x_bytes = model.input_spec.preprocess(data.images[: cfg.bytes_inputs])
    widths = _measure_widths(model, data if lossy_data is None else lossy_data, cfg, x_bytes, "")
    splits = []
    for sp, choice, measured in zip(profile.splits, widths.lossy, widths.precisions, strict=True):
        sizes = {k: v for k, v in sp.bytes.items() if not k.startswith(LOSSY_CODEC)}
        if choice is not None:
            sizes.update(next(p.bytes for p in measured if p.bits == choice.bits))
        splits.append(replace(sp, bytes=sizes, lossy=choice, precisions=measured))
    return replace(
        profile,
        splits=tuple(splits),
        precision_inputs=widths.inputs,
        precision_data=widths.data,
    )
