"""Offline profiler (docs/DESIGN.md part 3; docs/ARCHITECTURE.md "Offline profile").

On a calibration set it measures, for every split s = 0..S-1, what crosses the
network (shape, and the packed bytes per codec of ``protocol.packing`` on real
activations, median per input, and at split 0 those of the frame's pixels as well); for every stage, the device and server time of the
stage plus its exit head (batch 1, median of repeated runs, with the thread count
used); and for a grid of thresholds, the share of inputs leaving at each exit and the
accuracy. The result is a ``spinn.profile.Profile``: the scheduler and the runtime read
only that file plus live measurements.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from torch import Tensor

from protocol.dictionaries import ZstdDictionaries
from protocol.packing import CODECS, DICT_CODEC, IMAGE_CODEC, pack
from spinn.checkpoint import CheckpointMeta
from spinn.data import ImageSet
from spinn.evaluate import collect_probs, sweep
from spinn.profile import Profile, SplitProfile, ThresholdProfile
from spinn.progressive import ProgressiveModel

__all__ = [
    "PROFILE_THRESHOLDS",
    "ProfilerConfig",
    "codec_names",
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

    def __post_init__(self) -> None:
        for name in ("calibration_size", "bytes_inputs", "timing_inputs", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"profiler {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"profiler warmup must be >= 0, got {self.warmup}")
        if self.device_threads < 1 or self.server_threads < 1:
            raise ValueError("profiler thread counts must be >= 1")
        if not self.thresholds or any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"profiler thresholds must lie in [0, 1], got {self.thresholds}")


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
) -> list[dict[str, int]]:
    """Median packed bytes per codec at every split 0..S-1 over the batch ``x``; with
    `dictionaries`, sparse_int8_zdict's too (table = split); with `pixels` (the uint8
    images ``x`` was made from, N×C×H×W), what split 0 sends as the frame's pixels:
    ``uint8_image`` and ``uint8_image+zstd`` (PROTOCOL.md §6.8)."""
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
        if split == 0 and pixels is not None:
            for compress in (False, True):
                per_input = [pack(p[None], IMAGE_CODEC, compress).nbytes for p in pixels]
                key = f"{IMAGE_CODEC}+zstd" if compress else IMAGE_CODEC
                sizes[key] = int(statistics.median(per_input))
        result.append(sizes)
    return result


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
    pixels = calib.images[: cfg.bytes_inputs]
    x_bytes = model.input_spec.preprocess(pixels)
    log.info("profile 1/4: packing %d inputs at %d splits", len(x_bytes), model.num_stages)
    split_bytes = measure_split_bytes(model, x_bytes, dictionaries, pixels.numpy())
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
