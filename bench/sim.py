"""A discrete-event simulator of SPINN: ``python -m bench.sim``.

Runs whole experiments in virtual time (``bench._simcore``): every device is the
runtime's own ``DeviceCore`` (its policy, ``OnlineEstimates``, deadlines, race, PINGs and
probe trains, dead-link check and reconnects), driven by a virtual clock and speaking
protocol messages over netshape's link model and traces; compute is modelled (the offline
profile's stage times × a scale, with seeded noise, plus per-call overheads); every server
is the runtime's own ``ServerCore`` (handshake, admission, queue, dynamic batching) on
modelled workers.  Deterministic for a seed.

Three parts, each printed:

1. **Experiment 1** (``bench.paper``'s throughput-versus-bandwidth grid, every policy):
   inferences/s and mean latency per row, simulated.
2. **Validation** against the real runtime on the same grid: ``--validate`` runs
   ``bench.paper``'s experiment-1 rows in quick form with the real harness here (a real
   server behind netshape on loopback, the real device runtime; about five minutes), or
   ``--real FILE`` reads the figures such a run saved (``--save-real FILE``) or a
   ``bench.paper`` ``raw.json`` (throughput only).  The models' constants (stage scale,
   per-call overheads, server scale, the path's own round trip, the CPU time of the
   device's event loop per frame and per RESULT and of the server's event loop and the
   proxy per request) come from real calibration runs that are not rows of the grid
   (``calibrate``, before the grid, between its networks and after it, the models
   their mean); nothing is fitted per row, and misses print as
   they are, with the decision each side's policy took, and beside them what the models
   give for the calibration runs themselves.
3. **A fleet**: ``--fleet-devices`` devices on netshape's shipped traces, each varied by a
   seeded phase, rate and delay scale and compute speed, against N servers with dynamic
   batching; tail latency, server utilisation, and the fewest servers that keep the
   fleet's p95 latency within the SLA (a reference run with ample servers, then a
   bisection that the runs' busy time bounds, ``search_servers``; each run in parts of
   whole servers, which share nothing, ``--jobs`` processes side by side).

The last line is one JSON object: ``sim_vs_real_throughput_error_median``,
``sim_vs_real_latency_error_median`` (null without real figures), ``sim_speedup``
(simulated seconds per wall-clock second of experiment 1's one-device runs, the
comparison's included; ``sim_speedup_cpu`` the same per CPU second), ``fleet_sim_speedup`` (the same for the whole fleet search),
``fleet_runs``, ``fleet_wall_s`` and ``fleet_cpu_s`` (the search's runs, wall-clock and
CPU seconds, its processes' included) and the fleet figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench._common import ROOT
from bench._simcore import (
    Answer,
    DeviceModel,
    EventLoop,
    LinkSpec,
    ServerModel,
    SimDevice,
    SimServer,
    figures,
)
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, Policy
from spinn.decisions.scheduler import Scheduler, SchedulerConfig
from spinn.decisions.sla import SLA, Metric
from tools.netshape.trace import load_trace
from tools.netshape.units import parse_duration

__all__ = [
    "FLEET_TRACES",
    "REAL_FORMAT",
    "FleetPart",
    "FleetPlan",
    "calibrate",
    "compare",
    "fleet_figures",
    "fleet_part",
    "load_real",
    "main",
    "paper_policy",
    "run_fleet",
    "run_real",
    "search_servers",
    "servers_needed",
    "simulate_row",
]

TRACES_DIR = ROOT / "tools" / "netshape" / "traces"
FLEET_TRACES = ("4g", "5g", "fluctuating", "outages")
REAL_FORMAT = "spinn-sim-real/1"


def _paper() -> Any:
    """``bench.paper`` (imported on use: it pulls in the real harness)."""
    import bench.paper as paper

    return paper


def paper_policy(name: str, profile: Profile) -> Policy:
    """The policy ``bench.paper``'s experiment 1 runs under ``name``
    (``bench.paper.paper_policy``): most inferences/s within ``ACCURACY_SLACK`` of the
    final exit; Edgent's target the device-only latency of ``profile``, the device's own
    (slowdown included)."""
    policy: Policy = _paper().paper_policy(name, profile)
    return policy


def _codec(profile: Profile) -> str | None:
    """What the device sends by default: the dictionary codec's sizes when profiled."""
    return "sparse_int8_zdict" if "sparse_int8_zdict" in profile.codecs else None


def _input_codec(profile: Profile) -> str | None:
    """What the device sends at split 0 by default: the frame's pixels, compressed."""
    return "uint8_image+zstd" if "uint8_image+zstd" in profile.splits[0].bytes else None


def simulate_row(
    profile: Profile,
    policy_name: str,
    mbit: float | None,
    delay_s: float,
    *,
    device: DeviceModel,
    server: ServerModel,
    device_slowdown: float,
    run_s: float,
    warmup_s: float,
    seed: int,
) -> dict[str, Any]:
    """One unpaced run of experiment 1, as ``bench._harness.measure`` counts it (``mbit``
    None: a link without a rate limit)."""
    loop = EventLoop()
    srv = SimServer(loop, profile, server, seed)
    dev = SimDevice(0, loop, profile, paper_policy(policy_name, profile),
                    device, LinkSpec(None if mbit is None else mbit * 1e6, delay_s), srv, seed, stop_s=run_s)  # fmt: skip
    loop.run(run_s)
    fig = figures(dev.answers, warmup_s, run_s)
    loop.drain(run_s + 60.0)
    fig["lost"] = dev.frames_begun - len({a.frame for a in dev.answers})
    modes = Counter((a.split, a.thr_conf) for a in dev.answers if a.answered >= warmup_s)
    fig["chose"] = _chose(*modes.most_common(1)[0][0]) if modes else "-"
    fig["offload_rate"] = dev.uploads / max(dev.frames_begun, 1)
    fig["events"] = loop.events
    return fig


# -- the real side ----------------------------------------------------------------------


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class _LastEstimates:
    """Wraps a policy and keeps the last estimates the device handed it."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.last: Estimates | None = None

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.last = estimates
        return self.inner.decide(now, estimates)


def _sched_ms(pid: int, tid: int | None = None, *, but: int | None = None) -> tuple[float, float]:
    """Milliseconds a process's threads (``tid``: that one alone; ``but``: all but that
    one) ran on a CPU, and waited on a run queue to run (``/proc/.../schedstat``; neither
    counts sleeps or waits on a lock).  Zeros where the kernel does not say."""
    ran = waited = 0
    try:
        tids = [str(tid)] if tid is not None else os.listdir(f"/proc/{pid}/task")
        for t in tids:
            if t == str(but):
                continue
            with open(f"/proc/{pid}/task/{t}/schedstat", encoding="ascii") as f:
                run, wait, *_ = f.read().split()
            ran += int(run)
            waited += int(wait)
    except (OSError, ValueError):
        return 0.0, 0.0
    return ran / 1e6, waited / 1e6


class _Demand(_LastEstimates):
    """Also reads, at the counted window's start and end (the device's decisions, one per
    frame after its start-up one, on its event loop's thread), how long the device's
    event loop (``loop``) and each of ``threads`` (name: ``_sched_ms``'s arguments) ran
    on a CPU and waited to: per frame."""

    def __init__(self, inner: Policy, threads: dict[str, tuple[int, int | None, int | None]],
                 warmup_s: float, run_s: float) -> None:  # fmt: skip
        super().__init__(inner)
        self.threads = threads
        self.window = (warmup_s, run_s - 0.1)
        self.frames = 0
        self.t0: float | None = None
        self.marks: list[tuple[int, dict[str, tuple[float, float]]]] = []

    def decide(self, now: float, estimates: Estimates) -> Decision:
        self.frames += 1
        if self.frames == 2:
            self.t0 = now
        if (self.t0 is not None and len(self.marks) < 2
                and now - self.t0 >= self.window[len(self.marks)]):  # fmt: skip
            got = {k: _sched_ms(p, t, but=b) for k, (p, t, b) in self.threads.items()}
            got["loop"] = _sched_ms(os.getpid(), threading.get_native_id())
            self.marks.append((self.frames, got))
        return super().decide(now, estimates)

    def per_frame(self, name: str) -> tuple[float, float]:
        """Milliseconds per frame that ``name`` ran, and waited to."""
        if len(self.marks) < 2 or self.marks[1][0] <= self.marks[0][0]:
            return 0.0, 0.0
        (n0, a), (n1, b) = self.marks
        return ((b[name][0] - a[name][0]) / (n1 - n0), (b[name][1] - a[name][1]) / (n1 - n0))


def calibrate(tb: Any, run_s: float, warmup_s: float) -> dict[str, float]:
    """The device and server models from two real runs that are not rows of the grid,
    both against the real server through an unshaped netshape (the grid's conditions less
    the shaping): an unpaced device-only run (the device's busy time per input: stage
    scale ``SFb`` and head overhead ``H``, docs/SCHEDULER.md) and an unpaced server-only
    run (the race's step overhead ``c``, the work per upload ``K``, the server's reported
    compute against its profile, and the round trip of a bare PING, which every message
    pays on top of the shaped link: event-loop turns at both ends, the proxy's forwarding;
    docs/SCHEDULER.md, "a per-request cost on the uplink").  Both also read the kernel's
    account of CPU time (``_Demand``): the device's event-loop thread per frame (per local
    frame in the first, the extra per RESULT in the second), and the server's event-loop
    thread with the proxy per request (their work on the server's core besides the
    reported compute).  CPU time, not wall time: on one core the time a thread waits to
    run is mostly its neighbours' turn, counted where they run."""
    from bench._harness import ServerProcess, Shaper, measure

    prof = tb.profile
    with ServerProcess(tb) as srv, Shaper(tb, srv.port) as shaper:
        # The server's event loop (its main thread) and the proxy: what a request costs
        # the server's core beyond the compute the server reports.
        threads = {"server_loop": (srv.pid, srv.pid, None),
                   "server_workers": (srv.pid, None, srv.pid), "proxy": (shaper.pid, None, None)}  # fmt: skip
        dev = _Demand(paper_policy("device-only", prof), threads, warmup_s, run_s)
        srv_pol = _Demand(paper_policy("server-only", prof), threads, warmup_s, run_s)
        r_dev = measure(tb, shaper.port, "calibration", dev, duration_s=run_s,
                        warmup_s=warmup_s)  # fmt: skip
        r_srv = measure(tb, shaper.port, "calibration", srv_pol, duration_s=run_s,
                        warmup_s=warmup_s)  # fmt: skip
    if dev.last is None or srv_pol.last is None:
        raise RuntimeError("calibration runs took no decision")
    e_dev, e_srv = dev.last, srv_pol.last
    reported = (r_srv.summary.get("server_time_ms") or {}).get("reported_mean") or 0.0
    # CPU time: the time a thread waits for the CPU is mostly the other threads' turn on
    # the same core, which counts where they run (the workers' measured calls).
    loop_local = dev.per_frame("loop")[0]
    loop_offload = srv_pol.per_frame("loop")[0]
    server_loop, proxy = srv_pol.per_frame("server_loop")[0], srv_pol.per_frame("proxy")[0]
    # The server's core also runs its event loop and the proxy, in turn with the worker:
    # their CPU time per request is work on top of the reported compute.  (Some of it ran
    # while the worker waited for the core, inside the reported time: the worker's wait,
    # kept beside it, bounds that share.)
    worker_run, worker_wait = srv_pol.per_frame("server_workers")
    server_scale = reported / prof.server_time_ms(0) if reported else 1.0
    cal = {
        "stage_scale": e_dev.busy_scale or e_dev.device_scale,
        "head_ms": e_dev.head_overhead_ms or e_dev.frame_overhead_ms,
        "step_ms": e_srv.step_overhead_ms,
        "upload_ms": e_srv.upload_busy_ms,
        "server_scale": server_scale,
        # The worker's CPU time per request against the profile: with the loop's and the
        # proxy's, what one core does per request (its wall-clock time holds theirs).
        # Where the kernel said nothing (no schedstat, too short a run) the reported time
        # stands instead: a scale of 0 would compute every request in no time.
        "server_cpu_scale": (
            worker_run / prof.server_time_ms(0) if worker_run > 0.0 else server_scale
        ),
        "path_rtt_ms": 1e3 * e_srv.latency_s,
        "loop_ms": loop_local,
        "loop_result_ms": max(0.0, loop_offload - loop_local),
        "server_request_ms": server_loop + proxy,
        "server_loop_ms": server_loop,
        "proxy_ms": proxy,
        "server_worker_ms": worker_run,
        "server_worker_wait_ms": worker_wait,
        "device_only_fps": r_dev.fps,
        "server_only_unshaped_fps": r_srv.fps,
    }
    print("real calibration: " + ", ".join(f"{k} {v:.3f}" for k, v in cal.items()), flush=True)
    return cal


def run_real(checkpoint: Path, profile_path: Path, device_slowdown: float) -> dict[str, Any]:
    """``bench.paper``'s experiment-1 rows in quick form with the real harness, after its
    uncounted warm-up run, with calibrations (``calibrate``) before the grid, between its
    networks and after it, whose mean the models take."""
    import tempfile

    from bench._harness import ServerProcess, Shaper, Testbed, measure

    paper = _paper()
    plan = paper.QUICK
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="spinn-sim-") as tmp:
        tb = Testbed.prepare(checkpoint, profile_path, device_slowdown, Path(tmp))
        prof = tb.profile
        only_device = paper_policy("device-only", prof)
        measure(tb, None, "warm-up", only_device, duration_s=plan.startup_s, warmup_s=0.0)
        # The shared machine's load drifts over the grid's minutes (other jobs come and
        # go): the models are measured across it, never per row.  (Each network's rows
        # with the two calibrations around them alone read no better: two calibrations
        # hold more noise than four.)
        cals = [calibrate(tb, plan.run_s, plan.warmup_s)]
        with ServerProcess(tb) as srv, Shaper(tb, srv.port) as shaper:
            for net in plan.networks:
                shaper.set(net.rate, net.delay)
                for name in paper.POLICIES:
                    r = measure(tb, shaper.port, name, paper_policy(name, prof),
                                duration_s=plan.run_s, warmup_s=plan.warmup_s)  # fmt: skip
                    rows.append({"network": net.label, "mbit": net.mbit,
                                 "delay_s": parse_duration(net.delay), "policy": name,
                                 "fps": r.fps, "latency_ms_mean": r.latency_ms_mean,
                                 "latency_ms_p95": r.latency_ms_p95,
                                 "offload_rate": r.offload_rate, "lost": r.lost,
                                 "chose": _chose(r.row()["split_mode"], r.row()["thr_mode"])})  # fmt: skip
                    print(f"real {net.label:14s} {name:13s} {r.fps:7.1f}/s "
                          f"lat {r.latency_ms_mean:6.1f} ms", flush=True)  # fmt: skip
                cals.append(calibrate(tb, plan.run_s, plan.warmup_s))
    calibration = _mean(cals)
    print("real calibration, mean: " + ", ".join(f"{k} {v:.3f}" for k, v in calibration.items()))
    return {"format": REAL_FORMAT, "commit": _commit(), "model_id": prof.model_id,
            "device_slowdown": device_slowdown, "run_s": plan.run_s, "warmup_s": plan.warmup_s,
            "calibration": calibration, "calibrations": cals, "rows": rows}  # fmt: skip


def _mean(cals: Sequence[dict[str, float]]) -> dict[str, float]:
    """Calibrations' figures, each the mean of theirs."""
    return {k: statistics.fmean(c[k] for c in cals) for k in cals[0]}


def load_real(path: Path) -> dict[str, Any]:
    """Real figures: this module's own file, or ``bench.paper``'s ``raw.json``
    (experiment 1's throughputs; no latencies, no calibration)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--real {path}: {exc}") from None
    if isinstance(doc, dict) and doc.get("format") == REAL_FORMAT:
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("exp1"), dict):
        paper = _paper()
        plan = paper.QUICK if doc.get("plan") == "quick" else paper.FULL
        rows = [
            {"network": r["network"], "mbit": r["mbit"], "delay_s": r["rtt_ms"] / 2e3,
             "policy": name, "fps": fps, "latency_ms_mean": None}
            for r in doc["exp1"]["rows"] for name, fps in r["fps"].items()
        ]  # fmt: skip
        return {"format": "bench.paper raw.json", "commit": doc.get("machine", {}).get("commit"),
                "device_slowdown": float(doc.get("device_slowdown", 5.0)), "run_s": plan.run_s,
                "warmup_s": plan.warmup_s, "calibration": None, "rows": rows}  # fmt: skip
    raise SystemExit(f"--real {path}: neither {REAL_FORMAT} nor bench.paper's raw.json")


def calibrated(device: DeviceModel, server: ServerModel, cal: dict[str, float]
               ) -> tuple[DeviceModel, ServerModel]:  # fmt: skip
    """The models with a real calibration's figures (``calibrate``)."""
    return (
        dataclasses.replace(device, stage_scale=cal["stage_scale"], head_ms=cal["head_ms"],
                            step_ms=cal["step_ms"], upload_ms=cal["upload_ms"],
                            path_s=cal.get("path_rtt_ms", 0.0) / 2e3,
                            loop_ms=cal.get("loop_ms", 0.0),
                            loop_result_ms=cal.get("loop_result_ms", 0.0)),
        dataclasses.replace(server, scale=cal.get("server_cpu_scale", cal["server_scale"]),
                            request_ms=cal.get("server_request_ms", server.request_ms)),
    )  # fmt: skip


def _chose(split: int | None, thr: float | None) -> str:
    """A decision in a few characters: split and threshold ('-' for no early exit)."""
    if split is None:
        return "-"
    return f"s{split}/" + ("-" if thr is None else f"{thr:.2f}")


def _rel(sim: float, real: float | None) -> float | None:
    if real is None or not math.isfinite(real) or real <= 0 or not math.isfinite(sim):
        return None
    return abs(sim - real) / real


def compare(real: dict[str, Any], profile: Profile, device: DeviceModel, server: ServerModel,
            seed: int) -> dict[str, Any]:  # fmt: skip
    """Simulate every real row with the same plan and models (calibrated, ``main``);
    per-row and median relative errors."""
    out_rows = []
    print(f"\n== sim vs real ({real['format']}, commit {real.get('commit')}); device: stage "
          f"×{device.stage_scale:.3f}, head {device.head_ms:.2f} ms, step {device.step_ms:.2f} ms, "
          f"upload {device.upload_ms:.2f} ms, path {2e3 * device.path_s:.2f} ms RTT, event loop "
          f"{device.loop_ms:.2f} ms + {device.loop_result_ms:.2f} ms per RESULT; server "
          f"×{server.scale:.3f}, {server.request_ms:.2f} ms per request")  # fmt: skip
    print(f"{'network':14s} {'policy':13s} {'real/s':>8s} {'sim/s':>8s} {'err':>6s} "
          f"{'real ms':>8s} {'sim ms':>8s} {'err':>6s}  {'real chose':>9s} {'sim chose':>9s}")  # fmt: skip
    for r in real["rows"]:
        s = simulate_row(profile, r["policy"], r["mbit"], r["delay_s"], device=device,
                         server=server, device_slowdown=real["device_slowdown"],
                         run_s=real["run_s"], warmup_s=real["warmup_s"], seed=seed)  # fmt: skip
        e_t, e_l = _rel(s["fps"], r["fps"]), _rel(s["latency_ms_mean"], r["latency_ms_mean"])
        if r["fps"] is not None and r["fps"] <= 0:
            # A real run that answered nothing in its counted window (a stall of the shared
            # machine): its latency is of other answers, not comparable either.
            e_l = None
        out_rows.append({**r, "sim_fps": s["fps"], "sim_latency_ms_mean": s["latency_ms_mean"],
                         "sim_chose": s["chose"], "throughput_error": e_t,
                         "latency_error": e_l})  # fmt: skip
        rl = r["latency_ms_mean"]
        print(f"{r['network']:14s} {r['policy']:13s} {r['fps']:8.1f} {s['fps']:8.1f} "
              f"{_pct(e_t):>6s} {'-' if rl is None else f'{rl:8.1f}':>8s} "
              f"{s['latency_ms_mean']:8.1f} {_pct(e_l):>6s}  {r.get('chose', '-'):>9s} "
              f"{s['chose']:>9s}")  # fmt: skip
    cal = real.get("calibration") or {}
    if "server_only_unshaped_fps" in cal:
        # The calibration runs' own conditions, simulated: what the models reproduce of
        # the runs they were measured in (not rows of the grid, not in the medians).
        got = [simulate_row(profile, name, None, 0.0, device=device, server=server,
                            device_slowdown=real["device_slowdown"], run_s=real["run_s"],
                            warmup_s=real["warmup_s"], seed=seed)["fps"]
               for name in ("device-only", "server-only")]  # fmt: skip
        print(f"{'calibration':14s} {'device-only':13s} {cal['device_only_fps']:8.1f} "
              f"{got[0]:8.1f} {_pct(_rel(got[0], cal['device_only_fps'])):>6s}\n"
              f"{'calibration':14s} {'server-only':13s} {cal['server_only_unshaped_fps']:8.1f} "
              f"{got[1]:8.1f} {_pct(_rel(got[1], cal['server_only_unshaped_fps'])):>6s}")  # fmt: skip
    thr = [r["throughput_error"] for r in out_rows if r["throughput_error"] is not None]
    lat = [r["latency_error"] for r in out_rows if r["latency_error"] is not None]
    med_t = statistics.median(thr) if thr else None
    med_l = statistics.median(lat) if lat else None
    print(f"median relative error: throughput {_pct(med_t)}, latency {_pct(med_l)} "
          f"(target <= 15%)")  # fmt: skip
    return {"rows": out_rows, "throughput_error_median": med_t, "latency_error_median": med_l}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# -- the fleet --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FleetPlan:
    """A fleet: its devices, their cameras and links, the servers' model."""

    devices: int = 1000
    fps: float = 15.0
    """Each device's camera rate (paced; a frame waits for the window, counted from arrival)."""
    seconds: float = 4.0
    warmup_s: float = 1.0
    device_slowdown: float = 10.0
    """Each device's stages take this × the profiled time (then × a per-device log-normal)."""
    speed_sigma: float = 0.3
    rate_sigma: float = 0.5
    """Sigma of the log-normal scale of a device's trace rates."""
    server: ServerModel = ServerModel(workers=1, batch_max=16, batch_wait_s=0.002)
    """One worker thread on one core per server, as ``bench.paper``'s server (whose
    compute the calibration measures), with dynamic batching on."""
    replan_interval_s: float = 1.0
    """The fleet's schedulers re-plan once a second (the default 50 ms costs a device
    0.3 ms of compute each time; a thousand of them would cost the simulation its speed)."""


def run_fleet(profile: Profile, plan: FleetPlan, servers: int, device: DeviceModel,
              max_latency_ms: float, seed: int, *, jobs: int = 1) -> dict[str, Any]:  # fmt: skip
    """One fleet run: every device with its own trace variation, policy and profiler
    (``jobs``: processes for its parts, ``_fleet_runs``)."""
    return _fleet_runs([(profile, plan, servers, device, max_latency_ms, seed)], jobs)[0]


@dataclasses.dataclass
class FleetPart:
    """What a part of a fleet run (some of its servers and their devices) gave: all but
    ``lost`` as they stood at the run's ``seconds``."""

    answers: list[tuple[int, list[Answer]]]
    """Per device, by index: its answers to frames that arrived after the warm-up."""
    busy_s: list[tuple[int, float]]
    """Per server, by index: its workers' busy time."""
    batches: int
    batched: int
    uploads: int
    frames_begun: int
    events: int
    lost: int
    """Frames begun and never answered (after the drain)."""


def fleet_part(profile: Profile, plan: FleetPlan, servers: int, device: DeviceModel,
               max_latency_ms: float, seed: int, part: Sequence[int]) -> FleetPart:  # fmt: skip
    """The servers ``part`` of a fleet run of ``servers``, with their devices (device i
    talks to server ``i % servers`` alone), on a clock of their own. Every device's draws
    are made, in device order, whichever part it is in: each part runs as it would in the
    whole run, where its events touch nothing of another part's."""
    rng = random.Random(seed)
    traces = [load_trace(TRACES_DIR / f"{name}.csv", loop=True) for name in FLEET_TRACES]
    loop = EventLoop()
    srvs = {j: SimServer(loop, profile, plan.server, seed * 1000 + j) for j in sorted(part)}
    sla = SLA(max_latency_ms=max_latency_ms, min_accuracy=profile.exit_accuracy[-1] - 0.01,
              rank=(Metric.LATENCY, Metric.ACCURACY))  # fmt: skip
    base_prof = profile.on_slower_device(plan.device_slowdown)
    dmodel = dataclasses.replace(device, codec=_codec(profile), input_codec=_input_codec(profile))
    cfg = SchedulerConfig(codec=dmodel.codec, max_in_flight=dmodel.max_in_flight,
                          replan_interval_s=plan.replan_interval_s)  # fmt: skip
    devs = []
    for i in range(plan.devices):
        trace = traces[i % len(traces)]
        spec = LinkSpec(None, 0.0, trace=trace, trace_offset_s=rng.uniform(0, trace.duration_s),
                        rate_scale=math.exp(rng.gauss(0, plan.rate_sigma)))  # fmt: skip
        speed = math.exp(rng.gauss(0, plan.speed_sigma))
        start_s = rng.uniform(0, 1 / plan.fps)
        server = srvs.get(i % servers)
        if server is None:
            continue  # another part's
        # The device's own offline profile is of its own speed (its vendor profiled it).
        prof = base_prof.on_slower_device(speed)
        devs.append(SimDevice(i, loop, prof, Scheduler(prof, sla, cfg), dmodel, spec, server,
                              seed * 100003 + i, rate_fps=plan.fps, start_s=start_s,
                              stop_s=plan.seconds))  # fmt: skip
    loop.run(plan.seconds)
    # The figures are of the run's seconds; the drain after them only counts what is lost.
    out = FleetPart(
        answers=[(d.index, [a for a in d.answers if a.arrived >= plan.warmup_s]) for d in devs],
        busy_s=[(j, s.busy_s) for j, s in srvs.items()],
        batches=sum(s.batches for s in srvs.values()),
        batched=sum(s.batched for s in srvs.values()),
        uploads=sum(d.uploads for d in devs),
        frames_begun=sum(d.frames_begun for d in devs),
        events=loop.events,
        lost=0,
    )
    loop.drain(plan.seconds + 60.0)
    begun = sum(d.frames_begun for d in devs)
    out.lost = begun - len({(a.device, a.frame) for d in devs for a in d.answers})
    return out


def fleet_figures(plan: FleetPlan, servers: int, parts: Sequence[FleetPart]) -> dict[str, Any]:
    """The figures of a fleet run from its parts: its answers in device order and its
    servers' busy time in server order, as one clock for all would have summed them."""
    answers = [a for _, mine in sorted(x for p in parts for x in p.answers) for a in mine]
    fig = figures(answers, plan.warmup_s, math.inf)
    fig["fps"] = fig["answered"] / (plan.seconds - plan.warmup_s)
    busy = sum(b for _, b in sorted(x for p in parts for x in p.busy_s))
    fig["server_utilisation"] = busy / (servers * plan.server.workers * plan.seconds)
    fig["mean_batch"] = sum(p.batched for p in parts) / max(1, sum(p.batches for p in parts))
    begun = sum(p.frames_begun for p in parts)
    fig["offload_rate"] = sum(p.uploads for p in parts) / max(1, begun)
    fig["events"] = sum(p.events for p in parts)
    fig["servers"] = servers
    fig["lost"] = sum(p.lost for p in parts)
    return fig


def _fleet_part_args(args: tuple[Any, ...]) -> FleetPart:
    return fleet_part(*args)


def _fleet_runs(args: list[tuple[Any, ...]], jobs: int) -> list[dict[str, Any]]:
    """``run_fleet`` of each argument tuple, up to ``jobs`` processes side by side.

    A fleet run splits exactly along its servers: device i talks to server ``i % servers``
    alone (one address, no failover), so a server and its devices share nothing with
    another server's but the seeded draws, made alike in every part (``fleet_part``).
    With ``jobs`` above 1 each run goes in parts of whole servers (up to ``4 · jobs``, so
    that the runs of one search step share the processes evenly), in forked processes;
    the figures are the ones a single clock gives (tests/bench/test_sim.py)."""
    if jobs <= 1:
        return [fleet_figures(a[1], a[2], [_fleet_part_args((*a, range(a[2])))]) for a in args]
    work: list[tuple[int, tuple[Any, ...]]] = []
    for k, a in enumerate(args):
        servers = a[2]
        n = min(servers, 4 * jobs)
        work += [(k, (*a, range(g, servers, n))) for g in range(n)]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(jobs, len(work)), mp_context=ctx) as pool:
        done = list(pool.map(_fleet_part_args, [w for _, w in work]))
    return [
        fleet_figures(a[1], a[2], [part for (j, _), part in zip(work, done, strict=True) if j == k])
        for k, a in enumerate(args)
    ]


def servers_needed(profile: Profile, plan: FleetPlan, device: DeviceModel, sla_p95_ms: float,
                   max_latency_ms: float, seed: int, limit: int, max_utilisation: float = 0.8,
                   *, jobs: int = 1,
                   known: Sequence[dict[str, Any]] = ()) -> tuple[int | None, list[dict[str, Any]]]:  # fmt: skip
    """The fewest servers whose fleet p95 meets ``sla_p95_ms`` with every server at most
    ``max_utilisation`` busy (both fall with more servers, up to the seeded noise).  The
    utilisation bound matters because of the local race (DESIGN.md part 7): a saturated
    server's queue grows, yet the devices answer those inputs themselves, so the p95
    alone barely shows an overloaded fleet.  The search is ``search_servers``'s, over
    ``run_fleet`` runs (``jobs`` processes); ``known``: runs made already, e.g. the
    reference run.  Returns the count (None: more than ``limit``) and every run."""

    def run(ns: Sequence[int]) -> list[dict[str, Any]]:
        args = [(profile, plan, n, device, max_latency_ms, seed) for n in ns]
        out = _fleet_runs(args, jobs)
        for n, f in zip(ns, out, strict=True):
            print(f"fleet {plan.devices} devices, {n:4d} servers: p50 {f['p50_ms']:6.1f} "
                  f"p95 {f['p95_ms']:6.1f} p99 {f['p99_ms']:6.1f} ms, utilisation "
                  f"{100 * f['server_utilisation']:5.1f}%, offload {100 * f['offload_rate']:4.1f}%, "
                  f"batch {f['mean_batch']:.2f}, lost {f['lost']}", flush=True)  # fmt: skip
        return out

    def meets(f: dict[str, Any]) -> bool:
        return bool(f["p95_ms"] <= sla_p95_ms and f["server_utilisation"] <= max_utilisation)

    runs = search_servers(run, meets, limit, max_utilisation, jobs=jobs, known=known)
    needed = min((n for n, f in runs.items() if meets(f)), default=None)
    return needed, [runs[k] for k in sorted(runs)]


def search_servers(run: Callable[[Sequence[int]], list[dict[str, Any]]],
                   meets: Callable[[dict[str, Any]], bool], limit: int, max_utilisation: float,
                   *, jobs: int = 1,
                   known: Sequence[dict[str, Any]] = ()) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Runs (``run``: fleet figures with ``servers`` and ``server_utilisation`` for each
    count asked) until the fewest servers that ``meets`` is known, or that ``limit``
    does not; every run by its count.

    A bisection between the most servers known to fail (none: 0) and the fewest known to
    pass, or, before one passed, an estimate from the runs' busy time: fewer servers
    batch more, so a fleet's server-seconds per second at m servers bound those at any
    fewer from above and at any more from below, and ``ceil(busy / max_utilisation)``
    servers would be at most that busy: an upper estimate from runs with more servers, a
    lower one (tried first, with one fewer) from failed runs with fewer.  An estimate only
    places the next run, never makes the answer: that is a count that ran and met the
    SLA, with one fewer that ran and missed it (or 1).  Without an estimate
    the search doubles.  ``jobs`` counts run side by side in each step; the answer is the
    same for any ``jobs``."""
    runs: dict[int, dict[str, Any]] = {f["servers"]: f for f in known}
    k = max(1, jobs)
    while True:
        hi = min((n for n, f in runs.items() if meets(f)), default=None)
        lo = max((n for n, f in runs.items() if not meets(f) and (hi is None or n < hi)),
                 default=0)  # fmt: skip
        if (hi is not None and hi - lo <= 1) or (hi is None and lo >= limit):
            return runs
        top = limit if hi is None else hi  # the answer lies in (lo, top]
        need = {m: max(1, math.ceil(f["server_utilisation"] * m / max_utilisation - 1e-9))
                for m, f in runs.items()}  # fmt: skip
        # Fewer than m servers: at most m's busy time; more: at least it.
        above = [e for m, e in need.items() if lo < e < min(m, top + 1)]
        below = max((e for m, e in need.items() if m <= lo), default=0)
        if hi is None and not above:
            todo = [min(limit, max(1, 2 * lo))]  # nothing known above: double
        else:
            upper = min([top, *above])  # meets the SLA, or is thought to
            span = upper - lo
            # Where the busy time says the answer is, that count and one fewer; else
            # bisection: one cut with one job, else a count and one fewer at each of
            # jobs // 2 cuts (the answer is found at once where a cut falls on it).
            todo = [n for n in (below - 1, below) if lo < n <= upper and n not in runs][:k]
            if not todo and k == 1:
                todo = [lo + max(1, min(span - 1, -(-span // 2)))]
            elif not todo:
                cuts = [lo + -(-span * i // (k // 2 + 1)) for i in range(1, k // 2 + 1)]
                todo = [n for c in cuts for n in (c - 1, c) if lo < n <= upper]
        todo = sorted({n for n in todo if n not in runs})
        if not todo:
            raise RuntimeError(f"server search made no progress between {lo} and {hi}")
        for n, f in zip(todo, run(todo), strict=True):
            runs[n] = f


# -- the command line -------------------------------------------------------------------


def _positive(kind: type, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return v

    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-utilisation: not a number: {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"--max-utilisation must be in (0, 1], got {text}")
    return v


def _load_profile(args: argparse.Namespace) -> tuple[Path, Profile]:
    checkpoint = args.model / "model.pt" if args.model.is_dir() else args.model
    path = args.profile or checkpoint.with_name("profile.json")
    try:
        return checkpoint, Profile.load(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--profile {path}: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim",
                                     description=(__doc__ or "").splitlines()[0])  # fmt: skip
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default",
                        help="model directory or checkpoint (default models/default)")  # fmt: skip
    parser.add_argument("--profile", type=Path, default=None,
                        help="offline profile (default: profile.json beside the model)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device-slowdown", type=_positive(float, "--device-slowdown"),
                        default=5.0, help="experiment 1's device slowdown (bench.paper's)")  # fmt: skip
    parser.add_argument("--validate", action="store_true",
                        help="run bench.paper's experiment-1 rows (quick) on the real runtime "
                        "here first and compare (about five minutes)")  # fmt: skip
    parser.add_argument("--real", type=Path, default=None,
                        help="real figures to compare with: a --save-real file or bench.paper's "
                        "raw.json")  # fmt: skip
    parser.add_argument("--save-real", type=Path, default=None,
                        help="write the --validate run's real figures here")  # fmt: skip
    parser.add_argument("--fleet-devices", type=_positive(int, "--fleet-devices"), default=1000)
    parser.add_argument("--fleet-seconds", type=_positive(float, "--fleet-seconds"), default=3.0)
    parser.add_argument("--fleet-fps", type=_positive(float, "--fleet-fps"), default=10.0)
    parser.add_argument("--max-servers", type=_positive(int, "--max-servers"), default=256)
    parser.add_argument("--sla-p95-ms", type=_positive(float, "--sla-p95-ms"), default=None,
                        help="the fleet's SLA: p95 latency at most this (default: 1.1 × the "
                        "p95 with one server per ten devices)")  # fmt: skip
    parser.add_argument("--max-utilisation", type=_fraction, default=0.8,
                        help="the fleet's SLA also keeps every server at most this busy "
                        "(default 0.8: headroom for bursts)")  # fmt: skip
    parser.add_argument("--jobs", type=_positive(int, "--jobs"), default=min(2, os.cpu_count() or 1),
                        help="processes for the fleet runs, each split into parts of whole "
                        "servers (default: 2 where there are two cores; the figures are the "
                        "same for any number)")  # fmt: skip
    parser.add_argument("--run-s", type=_positive(float, "--run-s"), default=None,
                        help="length of each simulated experiment-1 run (default: bench.paper's "
                        "quick plan)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.validate and args.real is not None:
        parser.error("--validate and --real: give one or the other")
    if args.save_real is not None and not args.validate:
        parser.error("--save-real goes with --validate")
    checkpoint, raw_profile = _load_profile(args)
    paper = _paper()
    device = DeviceModel(codec=_codec(raw_profile), input_codec=_input_codec(raw_profile))
    server = ServerModel()
    slow = args.device_slowdown
    profile = raw_profile.on_slower_device(slow)
    sim_s = 0.0
    wall = 0.0
    cpu = 0.0

    real = None
    if args.validate:
        real = run_real(checkpoint, args.profile or checkpoint.with_name("profile.json"), slow)
        if args.save_real is not None:
            args.save_real.write_text(json.dumps(real, indent=1) + "\n", encoding="utf-8")
    elif args.real is not None:
        real = load_real(args.real)
        if abs(real["device_slowdown"] - slow) > 1e-9:
            slow = real["device_slowdown"]
            profile = raw_profile.on_slower_device(slow)
    fleet_device = device
    if real is not None and real.get("calibration"):
        # Experiment 1 and the comparison run with the machine's measured constants; the
        # fleet's devices keep the stated ones (their profile is their own).
        device, server = calibrated(device, server, real["calibration"])
        device = dataclasses.replace(device, cpu_share=1.0 / slow)

    # 1. experiment 1, simulated.
    plan = paper.QUICK
    run_s = args.run_s or plan.run_s
    warm = min(plan.warmup_s, run_s / 2)
    print(f"== experiment 1, simulated: model {profile.model_id}, device ×{slow:g}, "
          f"{run_s:g} s runs")  # fmt: skip
    print(f"{'network':14s} " + " ".join(f"{p:>13s}" for p in paper.POLICIES))
    lost = 0
    for net in plan.networks:
        cells = []
        for name in paper.POLICIES:
            t0, c0 = time.perf_counter(), time.process_time()
            f = simulate_row(profile, name, net.mbit, parse_duration(net.delay), device=device,
                             server=server, device_slowdown=slow, run_s=run_s, warmup_s=warm,
                             seed=args.seed)  # fmt: skip
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            sim_s += run_s
            lost += f["lost"]
            cells.append(f"{f['fps']:6.1f}/{f['latency_ms_mean']:5.1f}ms")
        print(f"{net.label:14s} " + " ".join(f"{c:>13s}" for c in cells))

    # 2. against the real runtime.
    cmp = None
    if real is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        cmp = compare(real, profile, device, server, args.seed)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        sim_s += real["run_s"] * len(real["rows"])

    # 3. the fleet.
    fplan = FleetPlan(devices=args.fleet_devices, fps=args.fleet_fps, seconds=args.fleet_seconds,
                      warmup_s=min(1.0, args.fleet_seconds / 4))  # fmt: skip
    fleet_latency_limit = (
        2.0 * fplan.device_slowdown * raw_profile.device_time_ms(raw_profile.num_stages)
    )
    print(f"\n== fleet: {fplan.devices} devices at {fplan.fps:g} frames/s on traces "
          f"{', '.join(FLEET_TRACES)} (seeded phase, rate ×lognormal({fplan.rate_sigma}), speed "
          f"×lognormal({fplan.speed_sigma})), device ×{fplan.device_slowdown:g}; servers of "
          f"{fplan.server.workers} workers, batches ≤ {fplan.server.batch_max} "
          f"(cost 1 + {fplan.server.batch_cost}·(n−1)), scheduler SLA latency ≤ "
          f"{fleet_latency_limit:.1f} ms")  # fmt: skip
    t0 = time.perf_counter()
    cpu0 = _cpu_s()
    sla_p95 = args.sla_p95_ms
    fleet_runs: list[dict[str, Any]] = []
    if sla_p95 is None:
        ample = max(1, fplan.devices // 10)
        ref = run_fleet(raw_profile, fplan, ample, fleet_device, fleet_latency_limit, args.seed,
                        jobs=args.jobs)  # fmt: skip
        fleet_runs.append(ref)
        sla_p95 = 1.1 * ref["p95_ms"]
        print(f"reference: {ample} servers give p95 {ref['p95_ms']:.1f} ms at "
              f"{100 * ref['server_utilisation']:.1f}% utilisation; SLA p95 ≤ "
              f"{sla_p95:.1f} ms")  # fmt: skip
    needed, runs = servers_needed(raw_profile, fplan, fleet_device, sla_p95, fleet_latency_limit,
                                  args.seed, args.max_servers, args.max_utilisation,
                                  jobs=args.jobs, known=fleet_runs)  # fmt: skip
    fleet_runs = runs
    fleet_wall = time.perf_counter() - t0
    fleet_cpu = _cpu_s() - cpu0
    fleet_sim_s = fplan.seconds * len(fleet_runs)
    at = next((r for r in runs if r["servers"] == needed), runs[-1])
    lost += sum(r["lost"] for r in fleet_runs)
    print(f"servers needed for p95 ≤ {sla_p95:.1f} ms, each at most "
          f"{100 * args.max_utilisation:g}% busy: {needed}; there p50/p95/p99 "
          f"{at['p50_ms']:.1f}/{at['p95_ms']:.1f}/{at['p99_ms']:.1f} ms, utilisation "
          f"{100 * at['server_utilisation']:.1f}%")  # fmt: skip
    speedup = sim_s / max(wall, 1e-9)
    fleet_speedup = fleet_sim_s / max(fleet_wall, 1e-9)
    print(f"experiment 1 (one device per run): simulated {sim_s:.0f} s in {wall:.1f} s of wall "
          f"time ({cpu:.1f} s of CPU), ×{speedup:.1f}; fleet: {fleet_sim_s:.0f} s of {fplan.devices} devices in "
          f"{fleet_wall:.1f} s ({len(fleet_runs)} runs, {fleet_cpu:.1f} s of CPU), "
          f"×{fleet_speedup:.2f} ({fleet_speedup * fplan.devices:.0f} device-seconds per "
          f"second); frames lost {lost}")  # fmt: skip
    out = {
        "bench": "sim",
        "model_id": profile.model_id,
        "sim_vs_real_throughput_error_median": None
        if cmp is None
        else _round(cmp["throughput_error_median"]),
        "sim_vs_real_latency_error_median": None
        if cmp is None
        else _round(cmp["latency_error_median"]),
        "sim_speedup": round(speedup, 1),
        "sim_speedup_cpu": round(sim_s / max(cpu, 1e-9), 1),
        "fleet_sim_speedup": round(fleet_speedup, 3),
        "fleet_runs": len(fleet_runs),
        "fleet_wall_s": round(fleet_wall, 1),
        "fleet_cpu_s": round(fleet_cpu, 1),
        "fleet_devices": fplan.devices,
        "fleet_servers_needed": needed,
        "fleet_sla_p95_ms": round(sla_p95, 2),
        "fleet_sla_max_utilisation": args.max_utilisation,
        "fleet_p50_ms": _round(at["p50_ms"]),
        "fleet_p95_ms": _round(at["p95_ms"]),
        "fleet_p99_ms": _round(at["p99_ms"]),
        "fleet_server_utilisation": _round(at["server_utilisation"]),
        "frames_lost": lost,
    }
    print(json.dumps(out))
    return 0


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the fleet's processes)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 4)


if __name__ == "__main__":
    sys.exit(main())
