"""The SPINN scheduler: SLA-driven choice of ⟨split, thr_conf, precision⟩, re-planned live.

DESIGN.md part 5; the formulas are written out in docs/SCHEDULER.md and repeated at the
place they are computed (``Predictor.predict``).  The scheduler is pure: it reads the
offline ``Profile`` once, precomputes every per-profile array, and then each decision is a
handful of numpy operations over the whole grid of candidates (every row × every
threshold of the profile's grid, plus "no early exit"; a row is a split 0..S with its
lossless coding, and, when the device sends ``sparse_uintb``, each split with each width
the profile measured there), so a 21 × 21 grid decides in well under a millisecond.

The baselines of the paper's evaluation (``spinn.decisions.baselines``) implement the same
``Policy`` protocol, so the runtime and the benchmarks swap them freely (``make_policy``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from protocol.messages import Cancel, frame_bytes, infer_envelope_bytes
from protocol.packing import LOSSY_CODEC
from protocol.tensor import KNOWN_CODECS
from spinn.decisions.offline_profile import Precision, Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision
from spinn.decisions.sla import SLA, Metric
from spinn.model.exits import ExitRule

__all__ = [
    "choose",
    "lexicographic_pool",
    "race_odds",
    "violation",
    "Choice",
    "Prediction",
    "Predictions",
    "Predictor",
    "Scheduler",
    "SchedulerConfig",
    "split_name",
]

log = logging.getLogger("spinn.decisions.scheduler")

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Absolute floor of the tie tolerance for the time-like metrics (ms): keeps candidates
# whose cost is exactly 0 (device-only has no server cost) tied with each other only.
_ABS_FLOOR_MS = 1e-6
# Tie tolerance of accuracy when the SLA ranks it first: equal accuracies only (well under
# one calibration image, 1/calibration_size), never widened by the hysteresis.  A
# candidate's accuracy is the offline profile's figure, the same at every re-plan: a
# tolerance there does not absorb noise, it gives accuracy away.  Under the paper
# benchmark's latency SLA on the camera model the 0.2-point tie and the 1-point
# hysteresis band kept thr 0.90 (88.60% on the calibration set) where no early exit
# (88.85%) met the limit too, and Edgent, which ran it, was 0.27 points more accurate.
_ACCURACY_EXACT = 1e-9


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Settings of the scheduler and its predictions (docs/SCHEDULER.md)."""

    rel_tolerance: float = 0.02
    """Latency, throughput and costs within 2% of the best count as a tie, so that the
    next metric in the ranking decides (DESIGN.md part 5 with a tolerance)."""
    accuracy_tolerance: float = 0.002
    """Accuracies within 0.2 points of the best count as a tie where accuracy is ranked
    after another metric (the calibration set's own noise is of that order).  Where it is
    ranked first, only equal accuracies tie and no hysteresis widens the band
    (``_ACCURACY_EXACT``): "the most accurate within the limits" is what was asked."""
    hysteresis: float = 5.0
    """The current decision is kept while it stays within ``hysteresis`` × the tie
    tolerances of the optimum on every ranked metric (and feasible): noise in the
    estimates does not make the choice flap.  Not on accuracy ranked first: it comes from
    the offline profile and does not move online."""
    min_dwell_s: float = 1.0
    """A new decision is kept at least this long unless it becomes invalid (the server
    went down), breaks a hard limit or falls out of the dwell's wide band (``dwell_band``):
    on a busy machine the estimates swing by more than the hysteresis band from one frame
    to the next, and without it the choice changed ten times a second among near-equal
    candidates (split 0, 1 and 2 on loopback)."""
    dwell_band: float = 5.0
    """During the dwell the current decision yields to an optimum at another split only
    when it has fallen out of the hysteresis band widened this many times more on the
    first ranked metric (a cost 50% above the best, or accuracy 5 points below; a change
    of the threshold alone always waits): noise does not move it, but
    a real change of the network (B 100 → 0.2 Mbit/s makes server-only several times
    slower than the device) is followed at the next re-plan instead of up to
    ``min_dwell_s`` later."""
    noise_window_s: float = 1.0
    """The hysteresis band of the first ranked metric widens to the spread the current
    decision's own prediction of it showed over this long, up to the dwell's band
    (``dwell_band``), for a challenger no better on the other metrics: on a loaded machine the compute estimates swing by more than the
    band for seconds (device time ×1.9–2.7 at load average 10), and on the step trace
    the decision moved between thresholds 0.80–0.97 of server-only once a second, as
    each dwell ended. 0 turns it off."""
    smooth_s: float = 1.0
    """The decisions are taken on predictions averaged over about this long (an
    exponential average with this time constant, per candidate), started afresh when B
    moves by ``dwell_bandwidth_ratio`` or the server's reachability changes: the compute
    estimates swing for seconds on a loaded machine (device time ×1.9–4.3, server time
    ×1.3–9 at load average 10), each candidate's prediction with its own sensitivity,
    and a decision taken at one swing was out of the band at the next: on the step trace
    the decision moved between thresholds 0.80–0.97 of server-only once a second, as
    each dwell ended. The network estimates are filtered already (B moves at a step the
    trains confirmed). 0 turns it off."""
    dwell_bandwidth_ratio: float = 1.5
    """The dwell holds a decision against the noise of the compute estimates, not against
    the network: once B has moved by this factor or more (either way) since the decision
    was taken, the dwell is over. B moves only when the probe trains confirm a step (a
    median of trains), or at a collapse or a rise; on the step trace the rise from 0.2
    to 50 Mbit/s was followed by split 1 at B = 11 Mbit/s, and server-only (38% faster at
    52 Mbit/s, inside the dwell's band) waited out the dwell: 1.1 s to settle where 0.1
    would do."""
    replan_interval_s: float = 0.05
    """Between full re-plans the current decision is returned as it is, unless the server's
    reachability changed.  A re-plan costs about 0.3 ms of the device's event loop; made
    for every input, it took 17% of the device's core at 600 inputs/s (5G, server-only,
    thr 0.75: 0.28 ms median × 1671 calls in 3 s).  The estimates move per measurement,
    not per input, so 20 re-plans a second follow them as closely."""
    latency_margin: float = 0.1
    """A hard latency limit is a promise: a candidate meets ``max_latency_ms`` only when
    its predicted latency is within ``max_latency_ms / (1 + latency_margin)``, so that an
    error of the prediction up to that size does not break it (the latency predictions
    err by 2% in the median and up to 16% per configuration, docs/SCHEDULER.md).  When no
    candidate clears the margin, the least-violating one is the fastest, as without it."""
    cancel_bytes: int | None = None
    """Bytes of the CANCEL sent up the link for each race the device wins (the uplink
    stage of the throughput counts them); ``None``: the protocol's frame
    (``protocol.messages.frame_bytes``, about 20 B). Server-only at 1 Mbit/s sent one for
    a third to a half of its inputs: 1.5% of its uplink time."""
    response_bytes: int = 256
    """Size of a RESULT on the wire (exit index, top-k, timings), for the download time."""
    codec: str | None = None
    """Packing codec whose profiled sizes give the lossless upload; ``None``: the smallest
    lossless one profiled at each split (what the adaptive packer achieves; sparse_uintb's
    sizes are the precision rows', ``lossy``)."""
    input_codec: str | None = None
    """Profile entry whose size gives the upload at split 0, where the device sends the
    frame's pixels (``uint8_image+zstd``, PROTOCOL.md §6.8); ``None``: ``codec``'s."""
    request_overhead_bytes: int | None = None
    """Bytes an INFER carries on the wire besides its tensor's payload, added to every
    predicted upload; ``None``: the protocol's envelope around each split's tensor
    (``protocol.messages.infer_envelope_bytes``: the length prefix, the message's and the
    tensor's fields, about 150 B).  The profile's sizes are payloads alone: at 1 Mbit/s
    server-only's 28×28 frames, 473 B profiled, went out as 627 B framed, and a
    prediction without the envelope put server-only 22% faster than it ran (4.2 against
    5.4 ms per input, the uplink's pace), ahead of a split that ran faster."""
    lossy: bool = False
    """The device can send ``sparse_uintb`` (PROTOCOL.md §6.9): the precision is chosen
    with the split and the threshold.  Each width the profile measured at a split is a
    candidate row beside the split's lossless coding, its smaller upload (the width's
    profiled bytes) coming with the upper confidence bound of its accuracy drop, charged
    on the inputs uploaded there (docs/SCHEDULER.md, "Precision")."""
    local_race: bool = True
    """The device keeps computing locally after uploading and the first answer wins
    (DESIGN.md part 7): remote latency is raced against the local path, and the device
    stays busy until the answer arrives."""
    max_in_flight: int = 4
    """Inputs the device keeps begun but unanswered (``SourceConfig.max_in_flight``): under
    a saturating stream a local continuation waits behind those of the others, which
    decides who wins the race in the throughput prediction."""

    def __post_init__(self) -> None:
        for name in ("rel_tolerance", "accuracy_tolerance"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"SchedulerConfig.{name} must be in [0, 1), got {v!r}")
        if not 0.0 <= self.latency_margin < 1.0:
            raise ValueError(
                f"SchedulerConfig.latency_margin must be in [0, 1), got {self.latency_margin!r}"
            )
        if not self.replan_interval_s >= 0.0:
            raise ValueError(
                f"SchedulerConfig.replan_interval_s must be >= 0, got {self.replan_interval_s!r}"
            )
        if not self.min_dwell_s >= 0.0:
            raise ValueError(f"SchedulerConfig.min_dwell_s must be >= 0, got {self.min_dwell_s!r}")
        if not self.smooth_s >= 0.0:
            raise ValueError(f"SchedulerConfig.smooth_s must be >= 0, got {self.smooth_s!r}")
        if not self.noise_window_s >= 0.0:
            raise ValueError(
                f"SchedulerConfig.noise_window_s must be >= 0, got {self.noise_window_s!r}"
            )
        if not self.dwell_bandwidth_ratio > 1.0:
            raise ValueError(
                "SchedulerConfig.dwell_bandwidth_ratio must be > 1, "
                f"got {self.dwell_bandwidth_ratio!r}"
            )
        if self.dwell_band < 1.0:
            raise ValueError(f"SchedulerConfig.dwell_band must be >= 1, got {self.dwell_band!r}")
        if self.hysteresis < 1.0:
            raise ValueError(f"SchedulerConfig.hysteresis must be >= 1, got {self.hysteresis!r}")
        if self.response_bytes < 0:
            raise ValueError("SchedulerConfig.response_bytes must be >= 0")
        for name in ("request_overhead_bytes", "cancel_bytes"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"SchedulerConfig.{name} must be None or >= 0, got {v!r}")
        if self.max_in_flight < 1:
            raise ValueError(
                f"SchedulerConfig.max_in_flight must be >= 1, got {self.max_in_flight}"
            )

    def upload_bytes(self, profile: Profile, split: int) -> int:
        """Predicted bytes uploaded at ``split`` with lossless coding: the input codec's at
        split 0, else the codec's (``Profile.packed_bytes``: the smallest lossless size
        when None; the lossy codec's sizes, up to 3× smaller on the camera model, predicted
        uploads that a lossless device never sends, and chose splits whose real uploads
        saturated a 1 Mbit/s link)."""
        codec = self.input_codec if split == 0 and self.input_codec is not None else self.codec
        return profile.packed_bytes(split, codec)

    @staticmethod
    def precision_bytes(precision: Precision) -> int:
        """Predicted bytes uploaded at a sparse_uintb width: the smaller of its raw and
        zstd sizes, which the adaptive packer approaches."""
        return min(precision.bytes.values())

    def envelope_bytes(self, profile: Profile, split: int, bits: int | None = None) -> int:
        """Bytes of the INFER around the payload uploaded at ``split`` (``bits``: at that
        sparse_uintb width): ``request_overhead_bytes``, or the protocol's envelope for
        the tensor the device sends there (its codec and shape)."""
        if self.request_overhead_bytes is not None:
            return self.request_overhead_bytes
        if bits is not None:
            codec = LOSSY_CODEC
        else:
            entry = self.input_codec if split == 0 and self.input_codec is not None else self.codec
            if entry is None:
                sizes = profile.splits[split].bytes
                lossless = {k: v for k, v in sizes.items() if not k.startswith(LOSSY_CODEC)}
                entry = min(lossless, key=lambda k: lossless[k])
            codec = entry.removesuffix("+zstd")
        if codec not in KNOWN_CODECS:
            codec = "sparse_int8"  # a profile entry of another name: a few bytes apart
        return infer_envelope_bytes(codec, (1, *profile.splits[split].shape))

    def cancel_frame_bytes(self) -> int:
        """Bytes of a CANCEL on the wire (``cancel_bytes``, or the protocol's frame)."""
        if self.cancel_bytes is not None:
            return self.cancel_bytes
        return frame_bytes(Cancel(2**32 - 1))

    def request_bytes(self, profile: Profile, split: int) -> int:
        """Predicted bytes on the wire of an upload at ``split`` with lossless coding: its
        payload (``upload_bytes``) in its INFER (``envelope_bytes``); 0 at split S."""
        if split == profile.num_stages:
            return 0
        return self.upload_bytes(profile, split) + self.envelope_bytes(profile, split)


def split_name(split: int, num_stages: int) -> str:
    """'server-only', 'device-only' or 'split k'."""
    if split == 0:
        return "server-only"
    if split == num_stages:
        return "device-only"
    return f"split {split}"


def _bits_name(bits: int | None) -> str:
    return "lossless" if bits is None else f"{bits}-bit"


@dataclass(frozen=True, slots=True)
class Prediction:
    """The five metrics of one candidate under one set of estimates."""

    split: int
    thr_conf: float | None
    """The candidate's threshold; None: no early exit."""
    latency_ms: float
    """Expected end-to-end latency per input."""
    throughput: float
    """Inferences per second of the slowest pipeline stage."""
    server_cost_ms: float
    """Expected server compute per input (offload rate × server time)."""
    device_cost_ms: float
    """Expected device compute per input."""
    accuracy: float
    """Calibration accuracy at ``thr_conf``."""
    offload_rate: float
    """Share of inputs uploaded (no device-side exit answered before the split)."""
    uplink_ms: float
    """Expected uplink time per input: the offload rate × the upload (its INFER) / B, and a
    CANCEL per race the device wins."""
    device_busy_ms: float = 0.0
    """Expected device busy time per input under a saturating stream: the throughput
    model's device stage."""
    server_busy_ms: float = 0.0
    """Expected server time per input this device takes under a saturating stream (its
    queue share included): the throughput model's server stage."""
    window_ms: float = 0.0
    """Expected time an input holds its in-flight slot, divided by ``max_in_flight``: the
    throughput model's window bound (Little's law)."""
    bits: int | None = None
    """sparse_uintb width of the upload; None: lossless coding."""

    def metric(self, m: Metric) -> float:
        return {
            Metric.LATENCY: self.latency_ms,
            Metric.THROUGHPUT: self.throughput,
            Metric.SERVER_COST: self.server_cost_ms,
            Metric.DEVICE_COST: self.device_cost_ms,
            Metric.ACCURACY: self.accuracy,
        }[m]


@dataclass(frozen=True)
class Predictions:
    """Metrics of every candidate: arrays of shape (R, T), column = threshold index into
    ``thresholds``, row = a split with a precision (``row_split``, ``row_bits``): rows
    0..S are the splits with lossless coding, so row s is split s; rows after them, when
    the device sends sparse_uintb, a split at one profiled width each."""

    thresholds: tuple[float | None, ...]
    """The threshold of each column; None: no early exit."""
    latency_ms: FloatArray
    throughput: FloatArray
    server_cost_ms: FloatArray
    device_cost_ms: FloatArray
    accuracy: FloatArray
    offload_rate: FloatArray
    uplink_ms: FloatArray
    valid: BoolArray
    """False where a candidate cannot run at all (offloading while the server is down)."""
    device_busy_ms: FloatArray
    """Device busy time per input, the throughput model's device stage."""
    server_busy_ms: FloatArray
    """Server time per input (queue share included), the throughput model's server stage."""
    window_ms: FloatArray
    """Time an input holds its in-flight slot / ``max_in_flight``: the window bound."""
    row_split: npt.NDArray[np.int64]
    """Split of each row."""
    row_bits: npt.NDArray[np.int64]
    """sparse_uintb width of each row, 0 for lossless coding."""

    def bits(self, row: int) -> int | None:
        """The row's sparse_uintb width, None for lossless coding."""
        return int(self.row_bits[row]) or None

    def at(self, row: int, t: int) -> Prediction:
        return Prediction(
            split=int(self.row_split[row]),
            thr_conf=self.thresholds[t],
            latency_ms=float(self.latency_ms[row, t]),
            throughput=float(self.throughput[row, t]),
            server_cost_ms=float(self.server_cost_ms[row, t]),
            device_cost_ms=float(self.device_cost_ms[row, t]),
            accuracy=float(self.accuracy[row, t]),
            offload_rate=float(self.offload_rate[row, t]),
            uplink_ms=float(self.uplink_ms[row, t]),
            device_busy_ms=float(self.device_busy_ms[row, t]),
            server_busy_ms=float(self.server_busy_ms[row, t]),
            window_ms=float(self.window_ms[row, t]),
            bits=self.bits(row),
        )

    def cost(self, m: Metric) -> FloatArray:
        """The metric as "smaller is better": throughput becomes ms per inference (the
        slowest stage's period), accuracy becomes error."""
        if m is Metric.LATENCY:
            return self.latency_ms
        if m is Metric.THROUGHPUT:
            with np.errstate(divide="ignore"):
                return np.where(self.throughput > 0, 1000.0 / self.throughput, np.inf)
        if m is Metric.SERVER_COST:
            return self.server_cost_ms
        if m is Metric.DEVICE_COST:
            return self.device_cost_ms
        return 1.0 - self.accuracy


class Predictor:
    """Per-profile arrays, precomputed once, and the vectorised prediction formulas."""

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig | None = None,
        thresholds: Sequence[float | None] | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or SchedulerConfig()
        p = profile
        s_count, n_exits = p.num_stages, p.num_exits
        if thresholds is None:
            thresholds = (*p.thr_grid, None)  # None: the no-early-exit column
        if not thresholds:
            raise ValueError("the threshold grid is empty")
        # Each a probability, or None: no early exit (ExitRule checks which).
        self.thresholds: tuple[float | None, ...] = tuple(ExitRule(t).thr_conf for t in thresholds)
        self.rates: FloatArray = np.array([p.exit_rate(t) for t in self.thresholds])  # (T, E)
        acc = np.array([p.accuracy(t) for t in self.thresholds])  # (T,)
        # The rows: every split with lossless coding (row s = split s), then, when the
        # device can send sparse_uintb, every split at every width measured there.
        rows: list[tuple[int, Precision | None]] = [(s, None) for s in range(s_count + 1)]
        if self.config.lossy:
            rows += [(s, q) for s in range(s_count) for q in p.splits[s].lossy_options()]
        self.row_split = np.array([s for s, _ in rows], dtype=np.int64)
        self.row_bits = np.array([0 if q is None else q.bits for _, q in rows], dtype=np.int64)
        splits = self.row_split
        x = np.asarray(p.exit_stages)
        dev_cum = np.array([p.device_time_ms(k) for k in range(s_count + 1)])
        srv_cum = np.array([p.server_time_ms(0, k) for k in range(s_count + 1)])
        # An exit read after stage x runs on the device iff x < split (ARCHITECTURE.md).
        self.local: BoolArray = x[None, :] < splits[:, None]  # (R, E)
        self.remote: BoolArray = ~self.local
        self.dev_split_ms: FloatArray = dev_cum[splits]  # device time of stages [0, s)
        # Stages the local race runs after split s to reach exit e (one call each).
        self.race_steps: FloatArray = np.where(
            self.remote, (x[None, :] + 1 - splits[:, None]).astype(np.float64), 0.0
        )
        self.dev_exit_ms: FloatArray = dev_cum[x + 1]  # device time up to exit e
        # Server time from the split to exit e (stages [s, x_e]), for exits after the split.
        self.srv_path_ms: FloatArray = np.where(
            self.remote, srv_cum[x + 1][None, :] - srv_cum[splits][:, None], 0.0
        )
        # The payload each row uploads, and on the wire its INFER around it.
        self.payload_bits = np.array(
            [
                0.0
                if s == s_count
                else 8.0
                * (self.config.upload_bytes(p, s) if q is None else self.config.precision_bytes(q))
                for s, q in rows
            ]
        )
        self.bits = self.payload_bits + np.array(
            [
                0.0
                if s == s_count
                else 8.0 * self.config.envelope_bytes(p, s, None if q is None else q.bits)
                for s, q in rows
            ]
        )
        self.response_bits = 8.0 * self.config.response_bytes
        self.cancel_bits = 8.0 * self.config.cancel_frame_bytes()
        # Offline parts of the per-candidate sums, (R, T).
        self.remote_rates: FloatArray = self.rates[None, :, :] * self.remote[:, None, :]
        self.offload: FloatArray = self.remote_rates.sum(axis=-1)
        self.local_rates: FloatArray = self.rates[None, :, :] * self.local[:, None, :]
        self.srv_cost_offline: FloatArray = (self.remote_rates * self.srv_path_ms[:, None, :]).sum(
            axis=-1
        )
        # A width's drop was measured on every input at each exit after the split; the
        # inputs uploaded there (a share `offload`) are the ones that can lose it.  The
        # upper confidence bound is charged: an accuracy limit is then met with the
        # confidence the profile chose its widths with (spinn.offline.profiling.drop_with_bound).
        drops = np.array([0.0 if q is None else q.drop_bound_pts / 100.0 for _, q in rows])
        self.accuracy: FloatArray = acc[None, :] - drops[:, None] * self.offload
        self.is_device_only: BoolArray = splits == s_count
        self.num_exits = n_exits

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_split), len(self.thresholds))

    def predict(self, est: Estimates) -> Predictions:
        """Every candidate's metrics under ``est`` (formulas: docs/SCHEDULER.md).

        Throughput, for candidate (s, t) with exit rates r_e, offload rate R, N =
        ``max_in_flight`` and the measured device busy time (``Estimates.busy_scale`` SFb,
        ``head_overhead_ms`` H, ``step_overhead_ms`` c, ``upload_busy_ms`` K)::

            head        = Σ_{x_e<s} r_e·SFb·D(x_e+1) + R·SFb·D(s) + H + R·K
            uplink      = R·bits(s)/B
            P0          = max(head, uplink, (1+q)·server_cost)
            won_e, u_e  = race_odds(remote_e − local_e, (N−1)·P0)   x_e ≥ s (local race on)
                          (share won by the device, its mean wait when it wins)
            cut_e       = min(V_e, max(0, local_e + u_e − SF·D(s) − bits(s)/B − q·W))
            device_busy = head + Σ r_e·won_e·(SFb·(D(x_e+1) − D(s)) + (x_e+1−s)·c)
            uplink_busy = uplink + Σ r_e·won_e·bits_cancel/B       (a CANCEL per race won)
            server_busy = (1+q)·Σ_{x_e≥s} r_e·((1 − won_e)·V_e + won_e·cut_e)
            held        = Σ_{x_e≥s} r_e·(won_e·(local_e + u_e) + (1 − won_e)·remote_e)
                          + Σ_{x_e<s} r_e·local_e + O
            throughput  = 1000 / max(device_busy, uplink_busy, server_busy, held / N)
        """
        sf, g = est.device_scale, est.server_scale
        bw = est.bandwidth_bps
        lat_ms = 1000.0 * est.latency_s
        # Uploading at split s: device time to the split, packed bits / B, one round-trip
        # latency (L is the RTT, spinn.decisions.online_estimates) and the RESULT's bits / B.
        with np.errstate(divide="ignore", invalid="ignore"):
            up_ms = 1000.0 * self.bits / bw if bw > 0 else np.where(self.bits > 0, np.inf, 0.0)
            down_ms = 1000.0 * self.response_bits / bw if bw > 0 else math.inf
            cancel_ms = 1000.0 * self.cancel_bits / bw if bw > 0 else math.inf
        remote_start = sf * self.dev_split_ms + up_ms + lat_ms + down_ms  # (S+1,)
        v = g * self.srv_path_ms  # (S+1, E) server compute to exit e
        srv_cost = g * self.srv_cost_offline  # (S+1, T) = Σ_remote r_e · V_e
        offload = self.offload
        # W: mean server time of an uploaded input; each of the q queued requests ahead
        # is assumed to cost as much.
        w = np.divide(srv_cost, offload, out=np.zeros_like(srv_cost), where=offload > 0)
        remote_ms = remote_start[:, None, None] + (est.server_queue * w)[:, :, None] + v[:, None, :]
        local_ms = sf * self.dev_exit_ms  # (E,) answering locally at exit e
        if self.config.local_race:
            path = np.where(self.remote[:, None, :], np.minimum(remote_ms, local_ms), local_ms)
        else:
            path = np.where(self.remote[:, None, :], remote_ms, local_ms)
        rates = self.rates[None, :, :]
        overhead = est.frame_overhead_ms  # per input, whichever path answers

        def per_input(ms: FloatArray) -> FloatArray:
            """The mean over exits of a time per exit, plus the per-input overhead."""
            with np.errstate(invalid="ignore"):
                # 0 · ∞ (an exit nobody reaches on an unusable link) contributes nothing.
                return np.where(rates > 0, rates * ms, 0.0).sum(axis=-1) + overhead

        latency = per_input(path)
        if self.config.local_race:
            # The device computes until the answer arrives, whichever side gives it.
            device_cost = latency
        else:
            device_cost = (
                (self.local_rates * local_ms).sum(axis=-1)
                + offload * (sf * self.dev_split_ms)[:, None]
                + overhead
            )
        with np.errstate(invalid="ignore"):
            uplink = np.where(offload > 0, offload * up_ms[:, None], 0.0)
        # Throughput (docs/SCHEDULER.md, "throughput"): the pipeline device → uplink →
        # server runs at the rate of its slowest stage, each stage's time per input being
        # its expected busy time under a saturating stream, or slower if the in-flight
        # window binds first (below).
        #
        # Device: the stages up to the exit or the split, scaled by the busy scale (their
        # mean time under load; SF until measured), plus per input the head call's overhead
        # (preprocessing, bookkeeping and the worker's hand-off gap, measured; the latency
        # overhead O until it is) and, if uploaded, its packing and protocol work.
        head_ms = overhead if est.head_overhead_ms is None else est.head_overhead_ms
        sfb = sf if est.busy_scale is None else est.busy_scale
        busy_local = sfb * self.dev_exit_ms  # (E,) stages up to exit e
        busy_split = (sfb * self.dev_split_ms)[:, None]  # (S+1, 1) stages before the split
        d_head = (
            (self.local_rates * busy_local).sum(axis=-1)
            + offload * busy_split
            + head_ms
            + offload * est.upload_busy_ms
        )
        # Server: its compute per input; with q requests of others queued on average this
        # device gets about 1/(1+q) of it (FIFO), so a busy server slows the pipeline.
        share = 1.0 + est.server_queue
        if self.config.local_race:
            # The race under a saturating stream. The runtime continues an uploaded input
            # locally only when no new input's head waits, FIFO among continuations
            # (spinn.runtime.compute), so a continuation waits behind those of the other
            # max_in_flight − 1 inputs in flight, each holding the device at least one
            # period P0 (the period with no race work on the device). The local side wins
            # when local_e + (max_in_flight − 1)·P0 <= remote_e: the device then also runs
            # stages [s, x_e], one call each, and the server computes only until the
            # CANCEL, sent when the local answer exists (after the wait), arrives: from
            # the INFER's arrival and its turn in the server's queue, at most V_e (the
            # one-way latency cancels out, both messages crossing it). A race the server
            # wins runs in idle device time only: it does not slow the pipeline.
            p0 = np.maximum(np.maximum(d_head, uplink), share * srv_cost)  # (S+1, T)
            # The device races only in time its heads leave idle: where it is itself the
            # bottleneck without the race (its head work above the uplink, the server and
            # the window with every race lost), a new input's head is always waiting and
            # the server answers every upload. Measured over the paper's 4G at split 5,
            # thr 0.75, device ×5: the server answered 51 of the 60 inputs uploaded.
            # Where the heads leave some idle time, the races it would win take at most
            # that time; the others go to the server (a share, not all or nothing: at the
            # edge, a few percent of change in the estimates flipped every race at once).
            held_lost = per_input(np.where(self.remote[:, None, :], remote_ms, local_ms))
            idle = np.maximum(p0, held_lost / self.config.max_in_flight) - d_head
            wait = (self.config.max_in_flight - 1) * p0
            won, won_wait = race_odds(remote_ms - local_ms, wait[:, :, None])
            race = (
                busy_local
                - busy_split[:, :, None]
                + self.race_steps[:, None, :] * est.step_overhead_ms
            )
            won = np.where(self.remote[:, None, :], won, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                wanted = (rates * won * race).sum(axis=-1)
                room = np.where(wanted > idle, np.maximum(idle, 0.0) / wanted, 1.0)
                room = np.where(np.isnan(room), 0.0, room)
            won = won * room[:, :, None]
            with np.errstate(invalid="ignore"):
                started = (sf * self.dev_split_ms + up_ms)[:, None] + est.server_queue * w
                until_cancel = local_ms + won_wait - started[:, :, None]
                # ∞ − ∞ on a dead link: nothing reaches the server, so it does no work.
                until_cancel = np.where(np.isnan(until_cancel), 0.0, until_cancel)
                cut = np.minimum(v[:, None, :], np.maximum(0.0, until_cancel))
                # An input leaves the window when its first answer arrives: the local one
                # after its wait when the device wins, else the server's (∞ on a dead
                # link, which a race won for sure does not wait for).
                lost_held = np.where(won < 1.0, (1.0 - won) * remote_ms, 0.0)
                won_held = np.where(won > 0.0, won * (local_ms + won_wait), 0.0)
            held = per_input(np.where(self.remote[:, None, :], won_held + lost_held, local_ms))
            won_rates = rates * won
            lost_rates = self.remote_rates - won_rates
            # Each race the device wins sends a CANCEL up the link (the server stops).
            won_share = won_rates.sum(axis=-1)
            with np.errstate(invalid="ignore"):
                uplink = uplink + np.where(won_share > 0, won_share * cancel_ms, 0.0)
            device_busy = d_head + (won_rates * race).sum(axis=-1)
            server_busy = share * (
                (lost_rates * v[:, None, :]).sum(axis=-1) + (won_rates * cut).sum(axis=-1)
            )
        else:
            held = latency  # no race: an input is held for its path
            device_busy = d_head
            server_busy = share * srv_cost
        period = np.maximum(np.maximum(device_busy, uplink), server_busy)
        # The window: N inputs in flight, each held until its answer, finish at most N per
        # holding time (Little's law). On a long path it binds before any stage does:
        # server-only over a 40 ms RTT runs at 4 per 45 ms, whatever the server's speed.
        window = held / self.config.max_in_flight
        period = np.maximum(period, window)
        with np.errstate(divide="ignore"):
            throughput = np.where(period > 0, 1000.0 / period, np.inf)
        valid = np.ones(self.shape, dtype=bool)
        if not est.server_up:
            valid &= self.is_device_only[:, None]
        return Predictions(
            thresholds=self.thresholds,
            latency_ms=latency,
            throughput=throughput,
            server_cost_ms=srv_cost,
            device_cost_ms=device_cost,
            accuracy=self.accuracy,
            offload_rate=offload,
            uplink_ms=uplink,
            valid=valid,
            device_busy_ms=device_busy,
            server_busy_ms=server_busy,
            window_ms=window,
            row_split=self.row_split,
            row_bits=self.row_bits,
        )

    def row(self, split: int, bits: int | None = None) -> int:
        """The row of ``split`` at the sparse_uintb width ``bits`` (None: lossless);
        ValueError if it is not a candidate."""
        hit = np.flatnonzero((self.row_split == split) & (self.row_bits == (bits or 0)))
        if not hit.size:
            raise ValueError(f"no candidate at split {split} with {_bits_name(bits)} coding")
        return int(hit[0])

    def threshold_index(self, thr_conf: float | None) -> int:
        """Grid column of ``thr_conf`` (nearest at or above, else the last column); None
        (no early exit): its own column, else the last."""
        if thr_conf is None:
            none = [t for t, thr in enumerate(self.thresholds) if thr is None]
            return none[0] if none else len(self.thresholds) - 1
        for t, thr in enumerate(self.thresholds):
            if thr is not None and thr >= thr_conf - 1e-9:
                return t
        return len(self.thresholds) - 1


def race_odds(gap_ms: FloatArray, wait_ms: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Under a saturating stream, the share of inputs whose local continuation wins the
    race, and its mean wait when it wins (docs/SCHEDULER.md, "the race").

    ``gap_ms`` is the remote path less the local one (``remote_e − local_e``), ``wait_ms``
    the mean wait of a continuation behind those of the other inputs in flight
    (``(N − 1)·P0``).  That wait is anything from none (no other continuation queued) to
    twice the mean, so it is taken as uniform on ``[0, 2·wait]``: the local side wins
    when its wait is under the gap, with odds ``gap / (2·wait)`` (clipped to [0, 1]), and
    then waited ``min(gap, 2·wait) / 2`` on average.  The step it replaces (win iff
    ``gap ≥ wait``) flipped whole exits between the two sides on a change of the
    estimates of a few percent: the predicted throughput of camera server-only over
    50 Mbit/s jumped by a third between thresholds 0.85 and 0.95 as L moved from 11.5 to
    14 ms, and the decision changed with it.  With no wait (``N = 1``) it is that step at
    ``gap ≥ 0``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = 2.0 * wait_ms
        odds = np.clip(gap_ms / spread, 0.0, 1.0)
        # No spread (N = 1), or an unusable link (∞/∞): the step.
        step = (gap_ms >= wait_ms).astype(np.float64)
        won = np.where((spread > 0) & np.isfinite(spread) & ~np.isnan(odds), odds, step)
        mean_wait = np.where(
            (spread > 0) & np.isfinite(spread), np.clip(gap_ms, 0.0, spread) / 2.0, wait_ms
        )
        mean_wait = np.where(np.isnan(mean_wait), 0.0, mean_wait)
    return won, np.broadcast_to(mean_wait, np.broadcast(gap_ms, wait_ms).shape)


@dataclass(frozen=True, slots=True)
class Choice:
    """The optimum of one grid under one set of estimates (no hysteresis)."""

    split: int
    thr_index: int
    thr_conf: float | None
    """None: no early exit."""
    feasible: bool
    """False when no candidate met every hard limit (least-violating fallback)."""
    prediction: Prediction
    violations: tuple[str, ...] = ()
    """The limits the chosen candidate breaks, in words (empty when feasible)."""
    row: int = -1
    """Row of the candidate in ``Predictions`` (the split with its precision)."""
    bits: int | None = None
    """sparse_uintb width of the upload; None: lossless coding."""


def _limit_arrays(
    sla: SLA, pred: Predictions, latency_margin: float = 0.0
) -> list[tuple[str, FloatArray, float, str, str]]:
    """(name, value, limit, direction, unit) per hard limit present; the latency limit
    less its margin (``SchedulerConfig.latency_margin``)."""
    out: list[tuple[str, FloatArray, float, str, str]] = []
    if sla.max_latency_ms is not None:
        limit = sla.max_latency_ms / (1.0 + latency_margin)
        out.append(("latency", pred.latency_ms, limit, "max", " ms"))
    if sla.min_throughput is not None:
        out.append(("throughput", pred.throughput, sla.min_throughput, "min", "/s"))
    if sla.max_server_cost_ms is not None:
        out.append(("server cost", pred.server_cost_ms, sla.max_server_cost_ms, "max", " ms"))
    if sla.max_device_cost_ms is not None:
        out.append(("device cost", pred.device_cost_ms, sla.max_device_cost_ms, "max", " ms"))
    if sla.min_accuracy is not None:
        out.append(("accuracy", pred.accuracy, sla.min_accuracy, "min", ""))
    return out


def violation(sla: SLA, pred: Predictions, latency_margin: float = 0.0) -> FloatArray:
    """Sum over the hard limits of the relative amount by which each is broken
    (0 = feasible), the latency limit less ``latency_margin``.  The least-violating
    fallback minimises it."""
    total = np.zeros(pred.latency_ms.shape)
    for _name, value, limit, direction, _unit in _limit_arrays(sla, pred, latency_margin):
        scale = max(limit, 1e-3)
        with np.errstate(invalid="ignore"):
            excess = value - limit if direction == "max" else limit - value
            total = total + np.where(excess > 0, excess / scale, 0.0)
    return total


def _tolerance(
    m: Metric, best: float, config: SchedulerConfig, widen: float, first: bool = False
) -> float:
    """Tie tolerance of ``m`` around ``best``, widened ``widen`` times (the hysteresis);
    ``first``: ``m`` is the SLA's first ranked metric."""
    if m is Metric.ACCURACY:
        return _ACCURACY_EXACT if first else widen * config.accuracy_tolerance
    if not math.isfinite(best):
        return 0.0
    return widen * max(config.rel_tolerance * abs(best), _ABS_FLOOR_MS)


def lexicographic_pool(
    pred: Predictions,
    pool: BoolArray,
    order: Sequence[Metric],
    config: SchedulerConfig,
    widen: float = 1.0,
    first: Metric | None = None,
) -> BoolArray:
    """Filter ``pool`` metric by metric: keep the candidates within the tolerance of the
    best (DESIGN.md part 5: min M_i s.t. M_j ≤ M_j* for all j < i, with tolerance);
    ``first``: the SLA's first ranked metric (accuracy ranked first ties exactly)."""
    pool = pool.copy()
    for m in order:
        c = pred.cost(m)
        best = float(c[pool].min())
        pool &= c <= best + _tolerance(m, best, config, widen, m is first)
    return pool


def choose(pred: Predictions, sla: SLA, config: SchedulerConfig) -> tuple[int, int, bool]:
    """(row, threshold index, feasible): the lexicographic optimum among the feasible
    candidates, or among the least-violating ones if none is feasible.  Survivors of the
    tolerance filter are ranked by the exact last metric, then by grid order."""
    valid = pred.valid
    viol = violation(sla, pred, config.latency_margin)
    feasible = valid & (viol <= 0.0)
    if feasible.any():
        pool, ok = feasible, True
    else:
        least = float(viol[valid].min())
        pool, ok = valid & (viol <= least * (1 + 1e-9) + 1e-12), False
    order = sla.order
    pool = lexicographic_pool(pred, pool, order[:-1], config, first=order[0])
    last = np.where(pool, pred.cost(order[-1]), np.inf)
    candidates = np.flatnonzero(pool.ravel())
    flat = int(candidates[np.argmin(last.ravel()[candidates])])
    s, t = divmod(flat, pred.latency_ms.shape[1])
    return s, t, ok


def _violations(
    sla: SLA, pred: Predictions, s: int, t: int, margin: float = 0.0
) -> tuple[str, ...]:
    out = []
    for name, value, limit, direction, unit in _limit_arrays(sla, pred, margin):
        v = float(value[s, t])
        if direction == "max" and v > limit:
            out.append(f"{name} {v:.3g}{unit} > {limit:g}{unit}")
        elif direction == "min" and v < limit:
            out.append(f"{name} {v:.3g}{unit} < {limit:g}{unit}")
    return tuple(out)


def _ratio(a: float, b: float) -> float:
    """How many times larger the larger of two rates is (∞ when one is not > 0)."""
    if a <= 0 or b <= 0:
        return 1.0 if a == b else math.inf
    return max(a / b, b / a)


def _driver(old: Estimates, new: Estimates) -> str:
    """The estimate that moved most since the last change, in words."""
    if old.server_up != new.server_up:
        return "server down" if not new.server_up else "server back up"
    moves: list[tuple[float, str]] = []

    def ratio(a: float, b: float) -> float:
        if a <= 0 or b <= 0 or not (math.isfinite(a) and math.isfinite(b)):
            return 0.0 if a == b else math.inf
        return abs(math.log(b / a))

    b0, b1 = old.bandwidth_bps / 1e6, new.bandwidth_bps / 1e6
    moves.append((ratio(b0, b1), f"B {'fell' if b1 < b0 else 'rose'} {b0:.3g} → {b1:.3g} Mbit/s"))
    l0, l1 = 1000 * old.latency_s, 1000 * new.latency_s
    moves.append((ratio(l0, l1), f"L {'fell' if l1 < l0 else 'rose'} {l0:.3g} → {l1:.3g} ms"))
    d0, d1 = old.device_scale, new.device_scale
    moves.append((ratio(d0, d1), f"device time ×{d0:.2f} → ×{d1:.2f}"))
    s0, s1 = old.server_scale, new.server_scale
    moves.append((ratio(s0, s1), f"server time ×{s0:.2f} → ×{s1:.2f}"))
    q0, q1 = old.server_queue, new.server_queue
    moves.append((ratio(q0 + 1, q1 + 1), f"server queue {q0:g} → {q1:g}"))
    size, text = max(moves, key=lambda mv: mv[0])
    return text if size > 0.01 else "estimates unchanged"


class Scheduler:
    """SPINN's policy: the lexicographic optimum over the grid, with hysteresis.

    ``decide`` re-plans on every call (it is cheap); the chosen decision changes only when
    the current one has become infeasible or has fallen out of the hysteresis band of the
    optimum, and each change is logged with the estimate that caused it.
    """

    def __init__(
        self,
        profile: Profile,
        sla: SLA | None = None,
        config: SchedulerConfig | None = None,
        *,
        early_exits: bool = True,
        splits: Sequence[int] | None = None,
        name: str = "spinn",
    ) -> None:
        self.profile = profile
        self.sla = sla or SLA()
        self.config = config or SchedulerConfig()
        self.name = name
        thresholds = None if early_exits else (None,)
        self.predictor = Predictor(profile, self.config, thresholds)
        self._allowed: BoolArray | None = None
        if splits is not None:
            allowed = np.zeros(self.predictor.shape, dtype=bool)
            for s in splits:
                if not 0 <= s <= profile.num_stages:
                    raise ValueError(f"split {s} out of range 0..{profile.num_stages}")
                allowed[self.predictor.row_split == s, :] = True
            self._allowed = allowed
        self.current: Decision | None = None
        self.current_choice: Choice | None = None
        self._current_row: int | None = None
        """Row of ``current`` in the predictions (its split with its precision)."""
        self._current_t: int | None = None
        self._estimates_at_change: Estimates | None = None
        self.history: list[tuple[float, Decision]] = []
        """Every change of decision with its time, the first included."""
        self._planned: tuple[float, bool] | None = None
        """Time and server reachability of the last full re-plan."""
        self._smooth: tuple[float, Estimates, Predictions] | None = None
        """Time, the estimates it was started from and the averaged predictions
        (``smooth_s``)."""
        self._seen: deque[tuple[float, float]] = deque()
        """(time, predicted first ranked metric, as a cost) of the current decision at
        each re-plan within ``noise_window_s``: its spread widens the band."""

    def predict(self, estimates: Estimates) -> Predictions:
        pred = self.predictor.predict(estimates)
        if self._allowed is not None:
            allowed = self._allowed & pred.valid
            if not allowed.any():
                # Only offloading splits allowed and the server is down: keep them valid;
                # the runtime falls back locally per request (DESIGN.md part 7).
                allowed = self._allowed
            pred = replace(pred, valid=allowed)
        return pred

    def choose(self, estimates: Estimates) -> Choice:
        """The optimum for ``estimates`` ignoring the current decision."""
        pred = self.predict(estimates)
        s, t, ok = choose(pred, self.sla, self.config)
        return self._choice(pred, s, t, ok)

    def _choice(self, pred: Predictions, row: int, t: int, ok: bool) -> Choice:
        margin = self.config.latency_margin
        return Choice(
            split=int(pred.row_split[row]),
            thr_index=t,
            thr_conf=pred.thresholds[t],
            feasible=ok,
            prediction=pred.at(row, t),
            violations=() if ok else _violations(self.sla, pred, row, t, margin),
            row=row,
            bits=pred.bits(row),
        )

    def _dwelling(
        self, now: float, pred: Predictions, best_ok: bool, best_split: int, est: Estimates
    ) -> bool:
        """Whether the current decision is younger than ``min_dwell_s``, taken at about
        this B (``dwell_bandwidth_ratio``), still valid, within every hard limit (when
        anything is) and, when the optimum is at another split, within the dwell's wide
        band of it (``dwell_band``)."""
        if self.current is None or self._current_row is None or not self.history:
            return False
        if not 0.0 <= now - self.history[-1][0] < self.config.min_dwell_s:
            return False  # dwelt long enough, or a new time base
        then = self._estimates_at_change
        if then is not None and then.bandwidth_bps > 0 and est.bandwidth_bps > 0:
            moved = est.bandwidth_bps / then.bandwidth_bps
            if max(moved, 1.0 / moved) >= self.config.dwell_bandwidth_ratio:
                return False  # the network moved: not noise
        # A move of the threshold alone waits out the dwell: on the step trace the
        # predicted throughputs of server-only at thr 0.85 and 0.90 swapped places by more
        # than the wide band within 0.05-0.3 s (4.63 → 4.91 s, 6.01 → 6.06 s), with the
        # device time estimate swinging ×2.7–3.3.
        if best_split != self.current.split:
            return self._keep_current(pred, best_ok, self.config.dwell_band, first_only=True)
        s, t = self._current_row, self._current_t
        assert t is not None
        viol = violation(self.sla, pred, self.config.latency_margin)
        return bool(pred.valid[s, t]) and not (best_ok and viol[s, t] > 0)

    def _smoothed(self, now: float, pred: Predictions, est: Estimates) -> Predictions:
        """``pred`` averaged over about ``smooth_s`` (an exponential average per candidate
        and time-like metric), started afresh at a move of B or of the server's
        reachability, or a new time base."""
        tau = self.config.smooth_s
        if tau <= 0:
            return pred
        last = self._smooth
        if (
            last is None
            or not 0.0 <= now - last[0] < 10.0 * tau
            or last[1].server_up != est.server_up
            or _ratio(last[1].bandwidth_bps, est.bandwidth_bps) >= self.config.dwell_bandwidth_ratio
        ):
            self._smooth = (now, est, pred)
            return pred
        alpha = 1.0 - math.exp(-(now - last[0]) / tau)
        old = last[2]

        def blend(a: FloatArray, b: FloatArray) -> FloatArray:
            with np.errstate(invalid="ignore"):
                mixed = a + alpha * (b - a)
            return np.where(np.isfinite(a) & np.isfinite(b), mixed, b)

        avg = replace(
            pred,
            latency_ms=blend(old.latency_ms, pred.latency_ms),
            throughput=blend(old.throughput, pred.throughput),
            server_cost_ms=blend(old.server_cost_ms, pred.server_cost_ms),
            device_cost_ms=blend(old.device_cost_ms, pred.device_cost_ms),
            uplink_ms=blend(old.uplink_ms, pred.uplink_ms),
            device_busy_ms=blend(old.device_busy_ms, pred.device_busy_ms),
            server_busy_ms=blend(old.server_busy_ms, pred.server_busy_ms),
            window_ms=blend(old.window_ms, pred.window_ms),
        )
        self._smooth = (now, last[1], avg)
        return avg

    def _watch_noise(self, now: float, pred: Predictions) -> None:
        """Keeps the current decision's predicted first metric of each re-plan within
        ``noise_window_s``."""
        row, t = self._current_row, self._current_t
        if row is None or t is None or self.config.noise_window_s <= 0:
            return
        cost = float(pred.cost(self.sla.order[0])[row, t])
        seen = self._seen
        while seen and not 0.0 <= now - seen[0][0] <= self.config.noise_window_s:
            seen.popleft()  # too old, or a new time base
        if math.isfinite(cost) and cost > 0:
            seen.append((now, cost))

    def _noise_widening(self) -> float:
        """How much wider than the hysteresis band the current decision is kept: the
        relative spread of its own predicted first metric over ``noise_window_s``, in
        units of the band, between 1 and ``dwell_band``."""
        seen = self._seen
        if len(seen) < 2:
            return 1.0
        costs = [c for _, c in seen]
        spread = max(costs) / min(costs) - 1.0
        band = self.config.rel_tolerance * self.config.hysteresis
        if band <= 0:
            return 1.0  # no band to widen (Neurosurgeon)
        return min(max(1.0, spread / band), self.config.dwell_band)

    def _keep_through_noise(self, pred: Predictions, best_ok: bool, widen: float) -> bool:
        """Whether the current decision is within ``widen`` times the hysteresis band of
        the best on the first ranked metric (the noise its own prediction showed,
        ``noise_window_s``) and, on the others, within the hysteresis band of the
        candidates that are within the plain band on the first one: a challenger that
        is only better on the first metric by less than the noise does not replace it."""
        if widen <= 1.0 or self._current_row is None or self._current_t is None:
            return False
        s, t = self._current_row, self._current_t
        if not pred.valid[s, t]:
            return False
        viol = violation(self.sla, pred, self.config.latency_margin)
        if not best_ok or viol[s, t] > 0:
            return False
        pool = pred.valid & (viol <= 0)
        first, *rest = self.sla.order
        cost = pred.cost(first)
        best = float(cost[pool].min())
        hyst = self.config.hysteresis
        if cost[s, t] > best + _tolerance(first, best, self.config, hyst * widen, True):
            return False
        near = pool & (cost <= best + _tolerance(first, best, self.config, hyst, True))
        near[s, t] = True
        return bool(lexicographic_pool(pred, near, rest, self.config, widen=hyst)[s, t])

    def _keep_current(
        self, pred: Predictions, best_ok: bool, widen: float = 1.0, first_only: bool = False
    ) -> bool:
        """Whether the current decision is still within the hysteresis band (widened
        ``widen`` times more, on the first ranked metric alone with ``first_only``: the
        dwell's band)."""
        if self._current_row is None or self._current_t is None:
            return False
        s, t = self._current_row, self._current_t
        if not pred.valid[s, t]:
            return False
        viol = violation(self.sla, pred, self.config.latency_margin)
        if best_ok:
            if viol[s, t] > 0:
                return False
            pool = pred.valid & (viol <= 0)
        else:
            least = float(viol[pred.valid].min())
            widened = self.config.rel_tolerance * self.config.hysteresis * widen
            band = least * (1 + widened) + 1e-12
            if viol[s, t] > band:
                return False
            pool = pred.valid & (viol <= band)
        order = self.sla.order[:1] if first_only else self.sla.order
        # The dwell's band (first_only) widens accuracy ranked first too: without it a more
        # accurate candidate at another split took over at the next re-plan, and a latency
        # swinging across the limit changed the split at every swing, not once a dwell.
        first = None if first_only else self.sla.order[0]
        pool = lexicographic_pool(
            pred, pool, order, self.config, self.config.hysteresis * widen, first
        )
        return bool(pool[s, t])

    def decide(self, now: float, estimates: Estimates) -> Decision:
        if (
            self.current is not None
            and self._planned is not None
            and 0.0 <= now - self._planned[0] < self.config.replan_interval_s
            and estimates.server_up == self._planned[1]
        ):
            return self.current
        self._planned = (now, estimates.server_up)
        pred = self._smoothed(now, self.predict(estimates), estimates)
        self._watch_noise(now, pred)
        row, t, ok = choose(pred, self.sla, self.config)
        s = int(pred.row_split[row])
        if self.current is not None and (row, t) == (self._current_row, self._current_t):
            self.current_choice = self._choice(pred, row, t, ok)
            return self.current
        if self.current is not None and (
            self._dwelling(now, pred, ok, s, estimates)
            or self._keep_current(pred, ok)
            or self._keep_through_noise(pred, ok, self._noise_widening())
        ):
            assert self._current_row is not None and self._current_t is not None
            self.current_choice = self._choice(pred, self._current_row, self._current_t, ok)
            return self.current
        choice = self._choice(pred, row, t, ok)
        new_rule = ExitRule(choice.thr_conf)
        new_desc = f"{split_name(s, self.profile.num_stages)}, {new_rule.describe()}"
        if self.predictor.config.lossy and s < self.profile.num_stages:
            new_desc += f", {_bits_name(choice.bits)}"
        if self.current is None or self._estimates_at_change is None:
            reason = f"initial: {new_desc}"
        else:
            old = self.current
            parts = []
            if old.split != s:
                parts.append(
                    f"{split_name(old.split, self.profile.num_stages)} → "
                    f"{split_name(s, self.profile.num_stages)}"
                )
            if old.thr_conf != choice.thr_conf:
                parts.append(f"{old.exit_rule.describe()} → {new_rule.describe()}")
            if old.bits != choice.bits:
                parts.append(f"{_bits_name(old.bits)} → {_bits_name(choice.bits)}")
            reason = f"{_driver(self._estimates_at_change, estimates)}: {', '.join(parts)}"
        p = choice.prediction
        reason += (
            f" (predicted {p.latency_ms:.1f} ms, {p.throughput:.1f}/s, "
            f"accuracy {100 * p.accuracy:.1f}%)"
        )
        if not ok:
            reason += "; INFEASIBLE, least-violating: " + "; ".join(choice.violations)
        decision = Decision(s, choice.thr_conf, reason, bits=choice.bits)
        log.info("%s %s", self.name, reason)
        self.current, self._current_t, self.current_choice = decision, t, choice
        self._current_row = row
        self._estimates_at_change = estimates
        self._seen.clear()
        self.history.append((now, decision))
        return decision
