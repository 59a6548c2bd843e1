"""The offline profile of a progressive model and the quantities derived from it.

The offline profiler (DESIGN.md, offline part 3) measures a checkpoint on a calibration
set and writes one JSON file, ``"format": "spinn-profile/1"``, whose fields are fixed by
docs/ARCHITECTURE.md ("Offline profile").  The scheduler (DESIGN.md part 5) reads only
this class: every prediction it makes starts from these numbers, scaled by the online
estimates.

Threshold look-up rule.  The profile holds exit rates and accuracy on a grid of
``thr_conf`` values.  A threshold that is not on the grid resolves to the nearest grid
point *at or above* it (within ``1e-9``): a higher threshold means fewer early exits, so
the prediction errs towards more compute and more offloading, never fewer.  ``None``
(no early exit, ``spinn.model.exits.ExitRule.none``), and a threshold above the highest grid
point, resolve to "no early exit": every input reaches the final exit, whose accuracy is
``exit_accuracy[-1]``.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.packing import LOSSY_CODEC

__all__ = [
    "FORMAT",
    "LossyChoice",
    "Precision",
    "Profile",
    "ProfileError",
    "SplitProfile",
    "ThresholdProfile",
    "synthetic_profile",
]

FORMAT = "spinn-profile/1"

_GRID_EPS = 1e-9
_RATE_SUM_TOL = 1e-3


class ProfileError(ValueError):
    """A profile (file or constructor arguments) is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class LossyChoice:
    """The sparse_uintb precision of one split (PROTOCOL.md §6.9.1): the fewest bits a
    non-zero whose accuracy drop on the calibration set stays within the bound (from
    profiles with ``drop_bound_pts``: whose upper confidence bound of the drop does)."""

    bits: int
    """Bits a non-zero value, 1..8."""
    accuracy_drop_pts: float
    """Measured drop at that width, in points: the largest over the exits after the split."""
    bound_pts: float
    """The bound it was chosen within, in points."""
    drop_bound_pts: float | None = None
    """One-sided 95 % upper confidence bound of the drop, in points (None: a profile made
    before it, whose width was chosen on the measured drop alone)."""


@dataclass(frozen=True, slots=True)
class Precision:
    """One sparse_uintb width measured at a split: what it sends and what it costs."""

    bits: int
    """Bits a non-zero value, 1..8."""
    bytes: Mapping[str, int]
    """Packed size, ``sparse_uintb`` and ``sparse_uintb+zstd``, median over the inputs."""
    accuracy_drop_pts: float
    """Measured drop on the calibration set, points: the largest over the exits after
    the split."""
    drop_bound_pts: float
    """Its one-sided 95 % upper confidence bound, points: what the scheduler charges."""


@dataclass(frozen=True, slots=True)
class SplitProfile:
    """What crosses the network at one split point."""

    split: int
    """Split index s (the device ran stages [0, s))."""
    shape: tuple[int, ...]
    """Activation shape at the split, batch excluded."""
    numel: int
    """Number of elements of the activation (product of ``shape``)."""
    bytes: Mapping[str, int]
    """Packed size per packing codec name, median over the calibration inputs."""
    lossy: LossyChoice | None = None
    """The split's sparse_uintb width, or None: none within the bound, a negative
    activation, or a profile made before the codec (an optional field of the file)."""
    precisions: tuple[Precision, ...] = ()
    """The sparse_uintb widths measured, fewest bits first, up to ``lossy``'s (every
    width where none is within the bound): the precisions the scheduler may choose
    besides lossless coding.  Empty where the codec cannot carry the activation, and in
    profiles made before it (an optional field of the file)."""

    def precision(self, bits: int) -> Precision:
        """The measured width ``bits``; ValueError if it was not measured."""
        for p in self.precisions:
            if p.bits == bits:
                return p
        have = [p.bits for p in self.precisions]
        raise ValueError(f"split {self.split}: no sparse_uintb width {bits} profiled; have {have}")

    def lossy_options(self) -> tuple[Precision, ...]:
        """The sparse_uintb widths a scheduler may choose here: ``precisions``; in a profile
        made before them, the one width ``lossy`` records, at its measured drop."""
        if self.precisions or self.lossy is None:
            return self.precisions
        sizes = {k: v for k, v in self.bytes.items() if k.startswith(LOSSY_CODEC)}
        if not sizes:
            return ()
        drop = self.lossy.accuracy_drop_pts
        upper = drop if self.lossy.drop_bound_pts is None else self.lossy.drop_bound_pts
        return (Precision(self.lossy.bits, sizes, drop, upper),)


@dataclass(frozen=True, slots=True)
class ThresholdProfile:
    """Exit behaviour of the calibration set at one confidence threshold."""

    thr_conf: float
    """Confidence threshold: an exit answers when its top-1 softmax is at least this."""
    exit_rate: tuple[float, ...]
    """Share of inputs answered at each exit; sums to 1."""
    accuracy: float
    """Top-1 accuracy of the progressive model at this threshold."""


def _fail(name: str, why: str) -> ProfileError:
    return ProfileError(f"profile field {name}: {why}")


def _as_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _fail(name, f"must be >= {minimum}, got {value}")
    return int(value)


def _as_float(name: str, value: Any, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, f"expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < lo or out > hi:
        raise _fail(name, f"must be a finite number in [{lo}, {hi}], got {value!r}")
    return out


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(name, f"expected a string, got {value!r}")
    return value


def _as_seq(name: str, value: Any, length: int | None = None) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(name, f"expected a list, got {value!r}")
    if length is not None and len(value) != length:
        raise _fail(name, f"expected {length} entries, got {len(value)}")
    return value


def _split_from(name: str, value: Any, expected_split: int) -> SplitProfile:
    if isinstance(value, SplitProfile):
        raw: Mapping[str, Any] = {
            "split": value.split,
            "shape": value.shape,
            "numel": value.numel,
            "bytes": value.bytes,
            "lossy": value.lossy,
            "precisions": value.precisions,
        }
    elif isinstance(value, Mapping):
        raw = value
    else:
        raise _fail(name, f"expected an object, got {value!r}")
    for key in ("split", "shape", "numel", "bytes"):
        if key not in raw:
            raise _fail(f"{name}.{key}", "missing")
    split = _as_int(f"{name}.split", raw["split"])
    if split != expected_split:
        raise _fail(f"{name}.split", f"expected {expected_split}, got {split}")
    shape = tuple(
        _as_int(f"{name}.shape[{i}]", d, 1)
        for i, d in enumerate(_as_seq(f"{name}.shape", raw["shape"]))
    )
    numel = _as_int(f"{name}.numel", raw["numel"], 1)
    if numel != math.prod(shape):
        raise _fail(f"{name}.numel", f"{numel} does not match shape {list(shape)}")
    codecs = raw["bytes"]
    if not isinstance(codecs, Mapping) or not codecs:
        raise _fail(f"{name}.bytes", f"expected a non-empty object codec -> bytes, got {codecs!r}")
    sizes = {
        _as_str(f"{name}.bytes key", k): _as_int(f"{name}.bytes[{k!r}]", v, 1)
        for k, v in codecs.items()
    }
    return SplitProfile(
        split=split,
        shape=shape,
        numel=numel,
        bytes=sizes,
        lossy=_lossy_from(name, raw),
        precisions=_precisions_from(name, raw),
    )


def _bits_from(name: str, value: Any) -> int:
    bits = _as_int(name, value, 1)
    if bits > 8:
        raise _fail(name, f"must be in 1..8, got {bits}")
    return bits


def _precisions_from(name: str, raw: Mapping[str, Any]) -> tuple[Precision, ...]:
    value = raw.get("precisions")
    if value is None:
        return ()
    out = []
    for i, item in enumerate(_as_seq(f"{name}.precisions", value)):
        where = f"{name}.precisions[{i}]"
        if isinstance(item, Precision):
            item = _precision_dict(item)
        if not isinstance(item, Mapping):
            raise _fail(where, f"expected an object, got {item!r}")
        for key in ("bits", "bytes", "accuracy_drop_pts", "drop_bound_pts"):
            if key not in item:
                raise _fail(f"{where}.{key}", "missing")
        sizes = item["bytes"]
        if not isinstance(sizes, Mapping) or not sizes:
            raise _fail(f"{where}.bytes", f"expected a non-empty object, got {sizes!r}")
        out.append(
            Precision(
                bits=_bits_from(f"{where}.bits", item["bits"]),
                bytes={
                    _as_str(f"{where}.bytes key", k): _as_int(f"{where}.bytes[{k!r}]", v, 1)
                    for k, v in sizes.items()
                },
                accuracy_drop_pts=_as_float(
                    f"{where}.accuracy_drop_pts", item["accuracy_drop_pts"], 0.0, 100.0
                ),
                drop_bound_pts=_as_float(
                    f"{where}.drop_bound_pts", item["drop_bound_pts"], 0.0, 100.0
                ),
            )
        )
    bits = [p.bits for p in out]
    if any(b <= a for a, b in zip(bits, bits[1:], strict=False)):
        raise _fail(f"{name}.precisions", f"bits must be strictly ascending, got {bits}")
    return tuple(out)


def _precision_dict(p: Precision) -> dict[str, Any]:
    return {
        "bits": p.bits,
        "bytes": dict(p.bytes),
        "accuracy_drop_pts": p.accuracy_drop_pts,
        "drop_bound_pts": p.drop_bound_pts,
    }


def _lossy_from(name: str, raw: Mapping[str, Any]) -> LossyChoice | None:
    value = raw.get("lossy")
    if value is None:
        return None
    if isinstance(value, LossyChoice):
        value = _lossy_dict(value)
    if not isinstance(value, Mapping):
        raise _fail(f"{name}.lossy", f"expected an object or null, got {value!r}")
    for key in ("bits", "accuracy_drop_pts", "bound_pts"):
        if key not in value:
            raise _fail(f"{name}.lossy.{key}", "missing")
    upper = value.get("drop_bound_pts")
    return LossyChoice(
        bits=_bits_from(f"{name}.lossy.bits", value["bits"]),
        accuracy_drop_pts=_as_float(
            f"{name}.lossy.accuracy_drop_pts", value["accuracy_drop_pts"], 0.0, 100.0
        ),
        bound_pts=_as_float(f"{name}.lossy.bound_pts", value["bound_pts"], 0.0, 100.0),
        drop_bound_pts=None
        if upper is None
        else _as_float(f"{name}.lossy.drop_bound_pts", upper, 0.0, 100.0),
    )


def _lossy_dict(c: LossyChoice) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bits": c.bits,
        "accuracy_drop_pts": c.accuracy_drop_pts,
        "bound_pts": c.bound_pts,
    }
    if c.drop_bound_pts is not None:
        out["drop_bound_pts"] = c.drop_bound_pts
    return out


def _split_dict(s: SplitProfile) -> dict[str, Any]:
    out: dict[str, Any] = {
        "split": s.split,
        "shape": list(s.shape),
        "numel": s.numel,
        "bytes": dict(s.bytes),
    }
    # Only when there are some: a profile without lossy widths reads as before.
    if s.lossy is not None:
        out["lossy"] = _lossy_dict(s.lossy)
    if s.precisions:
        out["precisions"] = [_precision_dict(p) for p in s.precisions]
    return out


def _threshold_from(name: str, value: Any, num_exits: int) -> ThresholdProfile:
    if isinstance(value, ThresholdProfile):
        raw: Mapping[str, Any] = {
            "thr_conf": value.thr_conf,
            "exit_rate": value.exit_rate,
            "accuracy": value.accuracy,
        }
    elif isinstance(value, Mapping):
        raw = value
    else:
        raise _fail(name, f"expected an object, got {value!r}")
    for key in ("thr_conf", "exit_rate", "accuracy"):
        if key not in raw:
            raise _fail(f"{name}.{key}", "missing")
    thr = _as_float(f"{name}.thr_conf", raw["thr_conf"], 0.0, 1.0)
    rates = tuple(
        _as_float(f"{name}.exit_rate[{i}]", r, 0.0, 1.0)
        for i, r in enumerate(_as_seq(f"{name}.exit_rate", raw["exit_rate"], num_exits))
    )
    if abs(sum(rates) - 1.0) > _RATE_SUM_TOL:
        raise _fail(f"{name}.exit_rate", f"must sum to 1, sums to {sum(rates):.6f}")
    accuracy = _as_float(f"{name}.accuracy", raw["accuracy"], 0.0, 1.0)
    return ThresholdProfile(thr_conf=thr, exit_rate=rates, accuracy=accuracy)


@dataclass(frozen=True)
class Profile:
    """Offline profile of one checkpoint (docs/ARCHITECTURE.md, "Offline profile").

    Construct with keyword fields; lists may be given as lists or tuples and the
    per-split / per-threshold entries as dicts or as ``SplitProfile`` /
    ``ThresholdProfile``.  Everything is validated on construction and a
    ``ProfileError`` names the first bad field.
    """

    model_id: str
    """Model id of the checkpoint profiled (used in the protocol handshake)."""
    weights_sha256: str
    """sha256 of the checkpoint's weights."""
    arch: str
    """Backbone architecture name."""
    num_stages: int
    """S: splits are 0..S, stages 0..S-1."""
    exit_stages: tuple[int, ...]
    """Stage read by each exit, ascending; the last is S-1 (the backbone's classifier)."""
    splits: tuple[SplitProfile, ...]
    """splits[s] for s = 0..S-1: what crosses the network at split s."""
    stage_device_ms: tuple[float, ...]
    """Median device time of stage k plus its exit head, batch 1."""
    stage_server_ms: tuple[float, ...]
    """Median server time of stage k plus its exit head, batch 1."""
    exit_accuracy: tuple[float, ...]
    """Accuracy if every input left at exit e."""
    thresholds: tuple[ThresholdProfile, ...]
    """Exit rates and accuracy per threshold, ascending ``thr_conf``."""
    calibration_size: int
    """Number of calibration inputs measured."""
    device_threads: int = 1
    """Torch threads used for the device timings."""
    server_threads: int = 1
    """Torch threads used for the server timings."""
    created: str = ""
    """ISO-8601 time the profile was made."""
    precision_inputs: int = 0
    """Inputs the sparse_uintb widths were measured on: the first ones of the data set
    `precision_data` (0: none measured, or a profile made before it), so that a
    benchmark can hold out others."""
    precision_data: str = ""
    """The data set those inputs came from (``fashion-mnist/train``: the training split,
    ``spinn profile``'s default); empty: the calibration data set (a profile made before
    it, whose widths came from the first test images)."""
    _cum_device: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _cum_server: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _as_str("model_id", self.model_id)
        _as_str("weights_sha256", self.weights_sha256)
        _as_str("arch", self.arch)
        _as_str("created", self.created)
        s_count = _as_int("num_stages", self.num_stages, 1)
        _as_int("calibration_size", self.calibration_size, 1)
        _as_int("device_threads", self.device_threads, 1)
        _as_int("server_threads", self.server_threads, 1)
        _as_int("precision_inputs", self.precision_inputs, 0)
        _as_str("precision_data", self.precision_data)

        exits = tuple(
            _as_int(f"exit_stages[{i}]", x)
            for i, x in enumerate(_as_seq("exit_stages", self.exit_stages))
        )
        if not exits:
            raise _fail("exit_stages", "must list at least the final exit")
        if any(b <= a for a, b in zip(exits, exits[1:], strict=False)):
            raise _fail("exit_stages", f"must be strictly ascending, got {list(exits)}")
        if exits[-1] != s_count - 1:
            raise _fail("exit_stages", f"last exit must read stage {s_count - 1}, got {exits[-1]}")
        n_exits = len(exits)

        splits = tuple(
            _split_from(f"splits[{i}]", v, i)
            for i, v in enumerate(_as_seq("splits", self.splits, s_count))
        )
        dev = tuple(
            _as_float(f"stage_device_ms[{i}]", v)
            for i, v in enumerate(_as_seq("stage_device_ms", self.stage_device_ms, s_count))
        )
        srv = tuple(
            _as_float(f"stage_server_ms[{i}]", v)
            for i, v in enumerate(_as_seq("stage_server_ms", self.stage_server_ms, s_count))
        )
        exit_acc = tuple(
            _as_float(f"exit_accuracy[{i}]", v, 0.0, 1.0)
            for i, v in enumerate(_as_seq("exit_accuracy", self.exit_accuracy, n_exits))
        )
        thresholds = tuple(
            _threshold_from(f"thresholds[{i}]", v, n_exits)
            for i, v in enumerate(_as_seq("thresholds", self.thresholds))
        )
        if not thresholds:
            raise _fail("thresholds", "must hold at least one threshold")
        grid = [t.thr_conf for t in thresholds]
        if any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
            raise _fail("thresholds", f"thr_conf must be strictly ascending, got {grid}")

        object.__setattr__(self, "exit_stages", exits)
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "stage_device_ms", dev)
        object.__setattr__(self, "stage_server_ms", srv)
        object.__setattr__(self, "exit_accuracy", exit_acc)
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "_cum_device", _prefix_sums(dev))
        object.__setattr__(self, "_cum_server", _prefix_sums(srv))

    # -- shape of the model -------------------------------------------------------------

    @property
    def num_exits(self) -> int:
        """E, the number of exits including the final one."""
        return len(self.exit_stages)

    @property
    def codecs(self) -> tuple[str, ...]:
        """Packing codec names measured at every split (sorted)."""
        common = set(self.splits[0].bytes)
        for sp in self.splits[1:]:
            common &= set(sp.bytes)
        return tuple(sorted(common))

    @property
    def thr_grid(self) -> tuple[float, ...]:
        """The profiled ``thr_conf`` values, ascending."""
        return tuple(t.thr_conf for t in self.thresholds)

    def _check_split(self, split: int) -> None:
        if isinstance(split, bool) or not isinstance(split, int):
            raise ValueError(f"split must be an integer, got {split!r}")
        if not 0 <= split <= self.num_stages:
            raise ValueError(f"split {split} out of range 0..{self.num_stages}")

    # -- timings ------------------------------------------------------------------------

    def on_slower_device(self, factor: float) -> Profile:
        """This profile for a device ``factor``× as slow (every ``stage_device_ms`` scaled),
        checking only what changes: a simulated fleet makes one per device."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"device slowdown must be a finite number > 0, got {factor!r}")
        out = copy.copy(self)
        dev = tuple(factor * t for t in self.stage_device_ms)
        object.__setattr__(out, "stage_device_ms", dev)
        object.__setattr__(out, "_cum_device", _prefix_sums(dev))
        return out

    def device_time_ms(self, split: int) -> float:
        """Offline device time of stages [0, split) with their exit heads (no early exit)."""
        self._check_split(split)
        return self._cum_device[split]

    def server_time_ms(self, split: int, stop: int | None = None) -> float:
        """Offline server time of stages [split, stop) (default: to the end, stop = S)."""
        self._check_split(split)
        end = self.num_stages if stop is None else stop
        self._check_split(end)
        if end < split:
            raise ValueError(f"stop {end} is before split {split}")
        return self._cum_server[end] - self._cum_server[split]

    # -- thresholds ---------------------------------------------------------------------

    def threshold_index(self, thr_conf: float | None) -> int | None:
        """Index of the grid point used for ``thr_conf`` (nearest at or above); ``None``
        for no early exit: ``thr_conf`` None, or above the grid."""
        if thr_conf is None:
            return None
        if (
            isinstance(thr_conf, bool)
            or not isinstance(thr_conf, numbers.Real)
            or not 0.0 <= thr_conf <= 1.0  # NaN fails too
        ):
            raise ValueError(
                f"thr_conf must be a probability in [0, 1] (None: no early exit), got {thr_conf!r}"
            )
        for i, t in enumerate(self.thresholds):
            if t.thr_conf >= thr_conf - _GRID_EPS:
                return i
        return None

    def exit_rate(self, thr_conf: float | None) -> tuple[float, ...]:
        """Share of inputs answered at each exit at ``thr_conf`` (see the look-up rule)."""
        i = self.threshold_index(thr_conf)
        if i is None:
            return tuple(0.0 for _ in self.exit_stages[:-1]) + (1.0,)
        return self.thresholds[i].exit_rate

    def accuracy(self, thr_conf: float | None) -> float:
        """Top-1 accuracy at ``thr_conf`` (see the look-up rule)."""
        i = self.threshold_index(thr_conf)
        if i is None:
            return self.exit_accuracy[-1]
        return self.thresholds[i].accuracy

    def survival(self, stage: int, thr_conf: float | None) -> float:
        """Probability that an input is still running when stage ``stage`` starts, i.e.
        that no exit read after an earlier stage answered it."""
        rates = self.exit_rate(thr_conf)
        answered = sum(r for x, r in zip(self.exit_stages, rates, strict=True) if x < stage)
        return min(1.0, max(0.0, 1.0 - answered))

    def reach_prob(self, split: int, thr_conf: float | None) -> float:
        """Probability that no device-side exit (one read before ``split``) answered, i.e.
        that the input is uploaded.  0 at split S, 1 at split 0."""
        self._check_split(split)
        if split == self.num_stages:
            return 0.0
        return self.survival(split, thr_conf)

    def expected_device_ms(self, split: int, thr_conf: float | None) -> float:
        """Expected offline device time of the device part: stage k of [0, split) runs only
        for inputs that no earlier exit answered (continued local compute after the
        upload is not included; the scheduler models that race)."""
        self._check_split(split)
        return sum(self.stage_device_ms[k] * self.survival(k, thr_conf) for k in range(split))

    def expected_server_ms(self, split: int, thr_conf: float | None) -> float:
        """Expected offline server time per *uploaded* input: the server evaluates the
        exits after the split against the same threshold and stops at the one that
        answers.  0 at split S."""
        self._check_split(split)
        reach = self.reach_prob(split, thr_conf)
        if reach <= 0.0:
            return 0.0
        total = sum(
            self.stage_server_ms[k] * self.survival(k, thr_conf)
            for k in range(split, self.num_stages)
        )
        return total / reach

    # -- network ------------------------------------------------------------------------

    def packed_bytes(self, split: int, codec: str | None = None) -> int:
        """Bytes uploaded at ``split`` with ``codec`` (``None``: the smallest lossless
        codec measured, which is what an adaptive packer approaches; sparse_uintb's
        widths are ``SplitProfile.lossy_options``).  0 at split S."""
        self._check_split(split)
        if split == self.num_stages:
            return 0
        sizes = self.splits[split].bytes
        if codec is None:
            return min(v for k, v in sizes.items() if not k.startswith(LOSSY_CODEC))
        if codec not in sizes:
            raise ValueError(f"codec {codec!r} not profiled at split {split}; have {sorted(sizes)}")
        return sizes[codec]

    # -- file -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``"format": "spinn-profile/1"``)."""
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "weights_sha256": self.weights_sha256,
            "arch": self.arch,
            "num_stages": self.num_stages,
            "exit_stages": list(self.exit_stages),
            "splits": [_split_dict(s) for s in self.splits],
            "stage_device_ms": list(self.stage_device_ms),
            "stage_server_ms": list(self.stage_server_ms),
            "exit_accuracy": list(self.exit_accuracy),
            "thresholds": [
                {"thr_conf": t.thr_conf, "exit_rate": list(t.exit_rate), "accuracy": t.accuracy}
                for t in self.thresholds
            ],
            "calibration_size": self.calibration_size,
            "device_threads": self.device_threads,
            "server_threads": self.server_threads,
            "created": self.created,
            **({"precision_inputs": self.precision_inputs} if self.precision_inputs else {}),
            **({"precision_data": self.precision_data} if self.precision_data else {}),
        }

    @classmethod
    def from_dict(cls, doc: Any) -> Profile:
        """Validate a parsed JSON document; ``ProfileError`` names the bad field."""
        if not isinstance(doc, Mapping):
            raise ProfileError(f"profile must be a JSON object, got {type(doc).__name__}")
        fmt = doc.get("format")
        if fmt != FORMAT:
            raise _fail("format", f"expected {FORMAT!r}, got {fmt!r}")
        required = (
            "model_id",
            "weights_sha256",
            "arch",
            "num_stages",
            "exit_stages",
            "splits",
            "stage_device_ms",
            "stage_server_ms",
            "exit_accuracy",
            "thresholds",
            "calibration_size",
        )
        optional = (
            "device_threads",
            "server_threads",
            "created",
            "precision_inputs",
            "precision_data",
        )
        for key in required:
            if key not in doc:
                raise _fail(key, "missing")
        unknown = set(doc) - set(required) - set(optional) - {"format"}
        if unknown:
            raise ProfileError(f"profile has unknown fields: {sorted(unknown)}")
        kwargs = {k: doc[k] for k in required + optional if k in doc}
        return cls(**kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON (atomically: a temporary file renamed into place)."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile file."""
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {os.fspath(path)!r} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(doc)
        except ProfileError as exc:
            raise ProfileError(f"{os.fspath(path)}: {exc}") from exc


def _prefix_sums(values: Sequence[float]) -> tuple[float, ...]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return tuple(out)


def synthetic_profile(
    rng: random.Random,
    num_stages: int = 20,
    num_exits: int = 7,
    num_thresholds: int = 20,
    precisions: bool = False,
) -> Profile:
    """A plausible random profile for scheduler tests and benchmarks: stage times, activation
    sizes that shrink with depth, exit rates that fall as the threshold rises and exit
    accuracies that grow with depth; with `precisions`, sparse_uintb widths at the splits
    after the first, fewer bits sending fewer bytes at a larger drop.  Deterministic for a
    given ``rng``."""
    if not 1 <= num_exits <= num_stages:
        raise ValueError(f"need 1 <= num_exits <= num_stages, got {num_exits}, {num_stages}")
    inner = sorted(rng.sample(range(num_stages - 1), num_exits - 1))
    exit_stages = (*inner, num_stages - 1)
    dev = [rng.uniform(0.2, 5.0) for _ in range(num_stages)]
    srv = [d / rng.uniform(3.0, 20.0) for d in dev]
    splits = []
    numel = rng.randint(2_000, 20_000)
    for s in range(num_stages):
        shape = (numel,)
        raw = 4 * numel
        lossless = max(1, int(raw * rng.uniform(0.05, 0.5)))
        widths = []
        if precisions and s > 0:
            for bits in range(2, rng.randint(2, 8) + 1):
                drop = rng.uniform(0.0, 3.0) / (bits - 1)
                widths.append(
                    {
                        "bits": bits,
                        "bytes": {LOSSY_CODEC: max(1, lossless * bits // 9)},
                        "accuracy_drop_pts": drop,
                        "drop_bound_pts": drop * rng.uniform(1.0, 1.5),
                    }
                )
        splits.append(
            {
                "split": s,
                "shape": list(shape),
                "numel": numel,
                "bytes": {"float32": raw, "sparse_zstd": lossless},
                "precisions": widths,
            }
        )
        numel = max(1, int(numel * rng.uniform(0.4, 1.2)))
    exit_acc = sorted(rng.uniform(0.3, 0.95) for _ in range(num_exits))
    thresholds = []
    for i in range(num_thresholds):
        thr = i / max(1, num_thresholds - 1)
        # The share answered early falls as thr_conf rises (exits must be more confident).
        keep = 1.0 - thr**0.7 if num_thresholds > 1 else 0.5
        rates = []
        left = 1.0
        for _ in range(num_exits - 1):
            r = left * keep * rng.uniform(0.1, 0.6)
            rates.append(r)
            left -= r
        rates.append(left)
        acc = exit_acc[-1] - (1.0 - thr) * rng.uniform(0.0, 0.2)
        thresholds.append({"thr_conf": thr, "exit_rate": rates, "accuracy": max(0.0, acc)})
    return Profile(
        model_id="synthetic",
        weights_sha256="0" * 64,
        arch="synthetic",
        num_stages=num_stages,
        exit_stages=exit_stages,
        splits=tuple(splits),  # type: ignore[arg-type]
        stage_device_ms=tuple(dev),
        stage_server_ms=tuple(srv),
        exit_accuracy=tuple(exit_acc),
        thresholds=tuple(thresholds),  # type: ignore[arg-type]
        calibration_size=1000,
    )
