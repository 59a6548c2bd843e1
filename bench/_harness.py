"""Shared by the paper benchmarks: a real server and netshape in their own processes, the
real device runtime in this one, each pinned to its own core, and one measured run.

The process plumbing (free ports, waiting for a listener, stopping, profiling a checkpoint
that ships without a profile) is ``bench.scheduler``'s; this module adds what the paper's
experiments need on top of it:

* the emulated weaker device and loaded server (``--slowdown K``: each stage takes K×
  as long, ``spinn.runtime``), with the device's offline profile scaled by K, as it would
  be had it been measured on that device;
* CPU pinning: the device (this process) on one core, server and proxy on another, so
  the two ends do not take each other's time (the device is the slower machine);
* a netshape proxy driven through its control port (rate, delay, outages, traces);
* ``measure``: one device run of a policy with per-answer timestamps, the decisions and
  estimates the policy saw, and the figures every experiment reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import ROOT, ensure_profile, frames_dataset
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, Policy
from spinn.model.progressive import InputSpec
from spinn.runtime.processes import free_port, stop_process, wait_listening
from spinn.runtime.sources import Frame

__all__ = [
    "Cores",
    "DecisionRecord",
    "RunResult",
    "ServerProcess",
    "Shaper",
    "Testbed",
    "TimedSource",
    "config_accuracy",
    "frames_dataset",
    "frames_for",
    "load_frames",
    "measure",
    "pin_cores",
    "scaled_device_profile",
]

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Cores:
    """Which cores the two ends run on (None: not pinned, e.g. a one-core machine)."""

    device: frozenset[int] | None
    """Cores of this process (the device runtime)."""
    server: frozenset[int] | None
    """Cores of the server and the netshape proxy."""

    def describe(self) -> str:
        if self.device is None or self.server is None:
            return "not pinned (fewer than 2 cores available)"
        return f"device on core {sorted(self.device)}, server + netshape on {sorted(self.server)}"


def pin_cores() -> Cores:
    """Pin this process to the lowest available core and give the rest to the server.

    The device and server share one machine here; pinning keeps each from stealing the
    other's core, so the device's slowdown factor is the only thing that makes it slower.
    """
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return Cores(None, None)
    if len(cores) < 2:
        return Cores(None, None)
    device, server = frozenset(cores[:1]), frozenset(cores[1:])
    os.sched_setaffinity(0, device)
    return Cores(device, server)


def _preexec(cores: frozenset[int] | None) -> Any:
    if cores is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin


def scaled_device_profile(profile: Profile, slowdown: float) -> Profile:
    """The offline profile as measured on a device ``slowdown``× slower: device stage
    times scaled, server times untouched (server load is for the online profiler to find,
    DESIGN.md part 4)."""
    return dataclasses.replace(
        profile, stage_device_ms=tuple(slowdown * t for t in profile.stage_device_ms)
    )


@dataclass(frozen=True)
class Testbed:
    """What every run shares: model, profiles, slowdowns, cores, frames."""

    __test__ = False  # not a pytest class, despite the name

    checkpoint: Path
    profile: Profile
    """The profile the device and every policy use: the checkpoint's offline profile (as
    shipped or measured here) with device times × ``device_slowdown``."""
    profile_path: Path
    """Where ``profile`` is saved for the device runtime."""
    device_slowdown: float
    cores: Cores
    images: np.ndarray
    """Frames replayed by every run, in the model's input size (uint8, N×H×W for a grey
    model, N×H×W×3 for an RGB one: what its camera would give), with their ``labels``."""
    labels: np.ndarray
    dataset: str = "fashion-mnist"
    """Whose test split ``images`` are (``frames_dataset``)."""

    @classmethod
    def prepare(
        cls, checkpoint: Path, profile_path: Path, device_slowdown: float, workdir: Path
    ) -> Testbed:
        import shutil

        from spinn.model.checkpoint import load_checkpoint

        # A snapshot: the shipped model may be replaced (retrained) while the runs go on.
        snapshot = workdir / "snapshot.pt"
        shutil.copyfile(checkpoint, snapshot)
        checkpoint = snapshot
        model, meta = load_checkpoint(checkpoint)
        model_id = meta.model_id
        prof_file = ensure_profile(checkpoint, profile_path, workdir)
        profile = Profile.load(prof_file)
        if profile.model_id != model_id:
            # A retrained checkpoint beside an old profile: measure this one instead.
            print(f"{prof_file} is for {profile.model_id}, not {model_id}")
            profile = Profile.load(ensure_profile(checkpoint, workdir / "absent.json", workdir))
        profile = scaled_device_profile(profile, device_slowdown)
        path = workdir / "device_profile.json"
        profile.save(path)
        dataset = frames_dataset(meta.recipe)
        images, labels = load_frames(dataset)
        images = frames_for(images, model.input_spec)
        return cls(checkpoint, profile, path, device_slowdown, pin_cores(), images, labels, dataset)


def load_frames(dataset: str = "fashion-mnist") -> tuple[np.ndarray, np.ndarray]:
    """A dataset's test split as the device's camera would see it (uint8 H×W or H×W×3)."""
    from spinn.runtime.sources import dataset_source

    src = dataset_source(f"{dataset}:test")
    assert src.labels is not None
    return src.images, src.labels


def frames_for(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Frames (N×H×W grey or N×H×W×3 RGB) as a camera of the model's input size would
    give them: converted and resized exactly as ``spinn.runtime.sources.preprocess`` would do on
    the device (so answers are the same either way; the device then spends no time on
    it, as with a camera of the right size).  Frames that fit already are returned."""
    import cv2

    n, h, w = images.shape[:3]
    rgb = images.ndim == 4
    if (h, w) == (spec.height, spec.width) and rgb == (spec.channels == 3):
        return images
    shape = (n, spec.height, spec.width) + ((3,) if spec.channels == 3 else ())
    out = np.empty(shape, dtype=np.uint8)
    shrink = h > spec.height or w > spec.width
    for i in range(n):
        img = images[i]
        if rgb and spec.channels == 1:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        elif not rgb and spec.channels == 3:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if (h, w) != (spec.height, spec.width):
            img = cv2.resize(img, (spec.width, spec.height),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)  # fmt: skip
        out[i] = img
    return out


class TimedSource:
    """Frames of the test set for ``duration_s`` from the first one (a camera that runs for
    a while), starting at image ``offset``; counts what it handed out."""

    name = "fashion-mnist:test"

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, duration_s: float, offset: int = 0
    ) -> None:
        if duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s}")
        self.images, self.labels = images, labels
        self.duration_s = duration_s
        self.offset = offset
        self.count = 0
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    def __iter__(self) -> Iterator[Frame]:
        n = len(self.images)
        self.started_at = time.perf_counter()
        i = 0
        while time.perf_counter() - self.started_at < self.duration_s:
            j = (self.offset + i) % n
            self.count = i + 1
            yield Frame(i, self.images[j], int(self.labels[j]), f"{self.name}[{j}]")
            i += 1
        self.stopped_at = time.perf_counter()

    def close(self) -> None:
        if self.stopped_at is None:
            self.stopped_at = time.perf_counter()


class ServerProcess:
    """``spinn_server.py`` in its own process on the server cores, one worker thread."""

    def __init__(self, testbed: Testbed, slowdown: float = 1.0) -> None:
        self.port = free_port()
        self.slowdown = slowdown
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "spinn_server.py"), "--checkpoint",
             str(testbed.checkpoint), "--port", str(self.port), "--workers", "1",
             "--torch-threads", "1", "--slowdown", str(slowdown), "--stats-interval", "0",
             "--grace", "1", "-q"],
            cwd=ROOT, preexec_fn=_preexec(testbed.cores.server),
        )  # fmt: skip
        try:
            wait_listening(self.port, self._proc, 120)
        except BaseException:
            stop_process(self._proc)
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        stop_process(self._proc)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Shaper:
    """``tools.netshape`` in its own process in front of a server, with a control port."""

    def __init__(
        self,
        testbed: Testbed,
        upstream_port: int,
        *,
        rate: str | None = None,
        delay: str | None = None,
        trace: Path | None = None,
        outages: tuple[str, ...] = (),
        seed: int = 0,
    ) -> None:
        self.port = free_port()
        self.control = ("127.0.0.1", free_port())
        args = [sys.executable, "-m", "tools.netshape", "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"127.0.0.1:{upstream_port}", "--control",
                f"{self.control[0]}:{self.control[1]}", "--seed", str(seed),
                "--log-level", "ERROR"]  # fmt: skip
        if rate is not None:
            args += ["--rate", rate]
        if delay is not None:
            args += ["--delay", delay]
        if trace is not None:
            args += ["--trace", str(trace)]
        for spec in outages:
            args += ["--outage", spec]
        self._proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.DEVNULL, preexec_fn=_preexec(testbed.cores.server)
        )
        try:
            wait_listening(self.control[1], self._proc, 60)
        except BaseException:
            stop_process(self._proc)
            raise

    def command(self, message: dict[str, Any]) -> dict[str, Any]:
        from tools.netshape import send_command

        answer = asyncio.run(send_command(self.control, message))
        if not answer.get("ok"):
            raise RuntimeError(f"netshape refused {message}: {answer.get('error')}")
        return answer

    def set(self, rate: str | None, delay: str) -> None:
        """Both directions: ``rate`` (None = unlimited) and one-way ``delay``."""
        self.command({"cmd": "set", "rate_bps": rate or "unlimited", "delay_s": delay})

    def stats(self) -> dict[str, Any]:
        return dict(self.command({"cmd": "stats"})["stats"])

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        stop_process(self._proc)

    def __enter__(self) -> Shaper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One call of the policy: when, what it saw, what it chose."""

    t: float
    split: int
    thr_conf: float | None
    final_exit: int | None
    bandwidth_bps: float
    server_scale: float
    device_scale: float
    server_up: bool


class _Recording:
    """Wraps a policy and keeps every decision with the estimates behind it."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.seen: list[DecisionRecord] = []

    def decide(self, now: float, estimates: Estimates) -> Decision:
        d = self.inner.decide(now, estimates)
        self.seen.append(
            DecisionRecord(now, d.split, d.thr_conf, d.final_exit, estimates.bandwidth_bps,
                           estimates.server_scale, estimates.device_scale, estimates.server_up)
        )  # fmt: skip
        return d


class _StampedSink:
    """The device's per-frame JSON lines, each stamped with the time it was written (the
    device's clock, ``time.perf_counter``)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, text: str) -> int:
        now = time.perf_counter()
        for line in text.splitlines():
            if line.strip():
                rec = json.loads(line)
                rec["t"] = now
                self.records.append(rec)
        return len(text)

    def flush(self) -> None:
        pass


@dataclass
class RunResult:
    """One measured run; figures over the answers after the warm-up unless named _all."""

    policy: str
    frames: int
    """Frames the source handed out."""
    answered: int
    lost: int
    """Frames without an answer (must be 0)."""
    fps: float
    """Answers per second after the warm-up, up to the end of the source."""
    latency_ms_mean: float
    latency_ms_p50: float
    latency_ms_p95: float
    accuracy: float
    """Measured top-1 accuracy of every answered frame."""
    expected_accuracy: float
    """Mean profile accuracy of the configurations the frames ran with (less noisy)."""
    server_ms_per_inference: float
    """Server compute per frame: mean reported RESULT compute time × offload rate."""
    offload_rate: float
    answered_by: dict[str, int]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False)
    decisions: list[DecisionRecord] = field(repr=False)
    t0: float = 0.0
    """Time of the source's first frame (perf_counter)."""

    def row(self) -> dict[str, Any]:
        """JSON-ready figures (no per-frame data)."""
        return {
            "policy": self.policy,
            "frames": self.frames,
            "lost": self.lost,
            "fps": round(self.fps, 2),
            "latency_ms_mean": round(self.latency_ms_mean, 2),
            "latency_ms_p50": round(self.latency_ms_p50, 2),
            "latency_ms_p95": round(self.latency_ms_p95, 2),
            "accuracy": round(self.accuracy, 4),
            "expected_accuracy": round(self.expected_accuracy, 4),
            "server_ms_per_inference": round(self.server_ms_per_inference, 3),
            "offload_rate": round(self.offload_rate, 3),
            "answered_by": self.answered_by,
            "split_mode": _mode([d.split for d in self.decisions]),
            "thr_mode": _mode([d.thr_conf for d in self.decisions]),
        }


def _mode(values: list[Any]) -> Any:
    return statistics.mode(values) if values else None


def config_accuracy(profile: Profile, d: DecisionRecord) -> float:
    """Test accuracy of the configuration a decision ran: a truncated network answers at
    its last exit, no early exit means the final exit alone."""
    if d.final_exit is not None:
        return profile.exit_accuracy[d.final_exit]
    if d.thr_conf is None:  # no early exit
        return profile.exit_accuracy[-1]
    return profile.accuracy(d.thr_conf)


def measure(
    testbed: Testbed,
    port: int | None,
    policy_name: str,
    policy: Policy,
    *,
    duration_s: float,
    warmup_s: float,
    rate_fps: float | None = None,
    offset: int = 0,
    max_in_flight: int = 4,
) -> RunResult:
    """Run the real device runtime (this process) against ``port`` with ``policy`` for
    ``duration_s`` of frames; ``port`` None runs device-only without a server."""
    import uvloop

    from spinn.runtime.config import DeviceConfig
    from spinn.runtime.device_process import run_device

    recording = _Recording(policy)
    cfg = DeviceConfig.from_fields(
        checkpoint=testbed.checkpoint,
        profile=testbed.profile_path,
        server=None if port is None else ("127.0.0.1", port),
        rate_fps=rate_fps,
        max_in_flight=max_in_flight,
        slowdown=testbed.device_slowdown,
        status_interval_s=0,
    )
    source = TimedSource(testbed.images, testbed.labels, duration_s, offset)
    sink = _StampedSink()
    with contextlib.redirect_stderr(io.StringIO()):  # the runtime's summary line
        summary = uvloop.run(run_device(cfg, source, out=sink, policy=recording, show_status=False))
    # The run's device (its model included, thousands of objects in reference cycles) is
    # garbage now: collected here, between runs, and not by a full collection that a
    # later run's allocations set off inside its measured window (0.3 to 1.5 s on the
    # loaded machine, with the event loop stopped throughout).
    gc.collect()
    recs = sink.records
    t0 = source.started_at or time.perf_counter()
    t_end = source.stopped_at or time.perf_counter()
    steady = [r for r in recs if t0 + warmup_s <= r["t"] <= t_end]
    window = max(t_end - t0 - warmup_s, 1e-9)
    lat = sorted(r["latency_ms"] for r in (steady or recs))
    labelled = [r for r in recs if "label" in r]
    decisions = recording.seen[1:]  # the first is the device's start-up decision
    steady_dec = [d for d in decisions if d.t >= t0 + warmup_s] or decisions
    offloaded = int(summary.get("offloaded", 0))
    reported = (summary.get("server_time_ms") or {}).get("reported_mean") or 0.0
    by_where = dict(summary.get("answered_by", {}))
    return RunResult(
        policy=policy_name,
        frames=source.count,
        answered=len(recs),
        lost=source.count - len({r["frame"] for r in recs}),
        fps=len(steady) / window,
        latency_ms_mean=statistics.fmean(lat) if lat else float("nan"),
        latency_ms_p50=statistics.median(lat) if lat else float("nan"),
        latency_ms_p95=lat[int(0.95 * (len(lat) - 1))] if lat else float("nan"),
        accuracy=(
            sum(r["class"] == r["label"] for r in labelled) / len(labelled)
            if labelled
            else float("nan")
        ),
        expected_accuracy=(
            statistics.fmean(config_accuracy(testbed.profile, d) for d in steady_dec)
            if steady_dec
            else float("nan")
        ),
        server_ms_per_inference=float(reported) * offloaded / max(len(recs), 1),
        offload_rate=offloaded / max(len(recs), 1),
        answered_by=by_where,
        summary=summary,
        records=recs,
        decisions=decisions,
        t0=t0,
    )
