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
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from torch import Tensor

from protocol.dictionaries import ZstdDictionaries
from protocol.packing import CODECS, DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC, pack, unpack
from spinn.decisions.offline_profile import LossyChoice, Profile, SplitProfile, ThresholdProfile
from spinn.model.checkpoint import CheckpointMeta
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import ImageSet
from spinn.offline.evaluate import collect_probs, sweep

__all__ = [
    "LOSSY_BITS_TRIED",
    "LOSSY_BOUND_PTS",
    "PROFILE_THRESHOLDS",
    "ProfilerConfig",
    "choose_lossy_bits",
    "codec_names",
    "lossy_accuracy_drop_pts",
    "measure_split_bytes",
    "profile_model",
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
    lossy_inputs: int = 1000
    """Calibration inputs on which each split's sparse_uintb width is chosen."""
    lossy_bound_pts: float | None = LOSSY_BOUND_PTS
    """Largest accuracy drop (points, on the calibration set) a split's sparse_uintb width
    may cost (PROTOCOL.md §6.9.1); None: no lossy precision is chosen."""

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
            for compress in (False, True):
                per_input = [pack(a, LOSSY_CODEC, compress, bits=bits).nbytes for a in arrays]
                key = f"{LOSSY_CODEC}+zstd" if compress else LOSSY_CODEC
                sizes[key] = int(statistics.median(per_input))
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


def _exit_accuracy(
    model: ProgressiveModel,
    acts: Tensor,
    labels: Tensor,
    split: int,
    bits: int | None,
    batch_size: int,
) -> Tensor:
    """Accuracy of every exit after `split` from `acts`, each input through sparse_uintb
    at `bits` first (None: as they are)."""
    right = []
    for i in range(0, len(labels), batch_size):
        batch = acts[i : i + batch_size]
        if bits is not None:
            batch = _through_codec(batch, bits)
        predicted = _exit_predictions(model, batch, split)
        right.append((predicted == labels[i : i + batch_size]).sum(dim=1))
    return torch.stack(right).sum(dim=0).double() / len(labels)


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
    acts = _split_inputs(model, x, split, batch_size)
    reference = _exit_accuracy(model, acts, labels, split, None, batch_size)
    coded = _exit_accuracy(model, acts, labels, split, bits, batch_size)
    return max(0.0, 100.0 * float((reference - coded).max()))


def choose_lossy_bits(
    model: ProgressiveModel,
    x: Tensor,
    labels: Tensor,
    split: int,
    bound_pts: float,
    *,
    bits_tried: tuple[int, ...] = LOSSY_BITS_TRIED,
    batch_size: int = 500,
) -> LossyChoice | None:
    """The fewest bits whose sparse_uintb coding of the activation entering `split` costs
    at most `bound_pts` points of accuracy on (`x`, `labels`), or None (a negative
    activation, which the codec cannot carry, or no width within the bound).

    The drop is that of `lossy_accuracy_drop_pts`: the largest over the exits the server
    may answer from (those read at a stage ≥ split), since whatever the threshold, an
    answer comes from one of them.
    """
    if split == 0 or split >= model.num_stages:
        return None
    acts = _split_inputs(model, x, split, batch_size)
    if bool((acts < 0).any()):
        return None
    reference = _exit_accuracy(model, acts, labels, split, None, batch_size)
    for bits in sorted(bits_tried):
        coded = _exit_accuracy(model, acts, labels, split, bits, batch_size)
        drop_pts = max(0.0, 100.0 * float((reference - coded).max()))
        if drop_pts <= bound_pts:
            return LossyChoice(bits, round(drop_pts, 4), bound_pts)
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
) -> Profile:
    """Measure ``model`` on ``data`` and return its offline profile (`dictionaries`: the
    model's zstd dictionaries, to profile sparse_int8_zdict as well)."""
    model.eval()
    calib = data.head(cfg.calibration_size)
    if len(calib) == 0:
        raise ValueError(f"calibration set {data.name} is empty")
    if calib.shape != model.input_spec.shape:
        raise ValueError(
            f"calibration images {calib.shape} do not match the model input {model.input_spec.shape}"
        )
    lossy: list[LossyChoice | None] = [None] * model.num_stages
    if cfg.lossy_bound_pts is not None:
        head = calib.head(cfg.lossy_inputs)
        log.info(
            "profile 0/4: sparse_uintb widths within %g points on %d inputs",
            cfg.lossy_bound_pts,
            len(head),
        )
        x_lossy = model.input_spec.preprocess(head.images)
        for s in range(1, model.num_stages):
            lossy[s] = choose_lossy_bits(model, x_lossy, head.labels, s, cfg.lossy_bound_pts)
    pixels = calib.images[: cfg.bytes_inputs]
    x_bytes = model.input_spec.preprocess(pixels)
    log.info("profile 1/4: packing %d inputs at %d splits", len(x_bytes), model.num_stages)
    split_bytes = measure_split_bytes(
        model, x_bytes, dictionaries, pixels.numpy(), [None if c is None else c.bits for c in lossy]
    )
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
            lossy=lossy[s],
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
    )
