"""The baselines of the paper's evaluation, and every policy by name.

Device-only, server-only, Neurosurgeon, Edgent and SPINN without early exits implement
the same ``Policy`` protocol as the SPINN scheduler (``spinn.decisions.scheduler``), so the
runtime and the benchmarks swap them freely (``make_policy``); docs/SCHEDULER.md,
"Baselines".
"""

from __future__ import annotations

import numpy as np

from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, Policy
from spinn.decisions.scheduler import FloatArray, Scheduler, SchedulerConfig, split_name
from spinn.decisions.sla import SLA, Metric

__all__ = [
    "POLICY_NAMES",
    "DeviceOnlyPolicy",
    "EdgentPolicy",
    "NeurosurgeonPolicy",
    "ServerOnlyPolicy",
    "make_policy",
]


class DeviceOnlyPolicy:
    """Baseline: everything on the device (split S); early exits off unless a threshold
    is given (the paper's device-only baseline runs the original single-exit network)."""

    def __init__(self, profile: Profile, thr_conf: float | None = None) -> None:
        self.decision = Decision(profile.num_stages, thr_conf, reason="device-only baseline")

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self.decision


class ServerOnlyPolicy:
    """Baseline: every input uploaded raw (split 0); the server runs the whole network
    without early exits by default.  It does not avoid a down server: the runtime's local
    fallback answers then, as it would for any offloading policy."""

    def __init__(self, profile: Profile, thr_conf: float | None = None) -> None:
        self.decision = Decision(0, thr_conf, reason="server-only baseline")

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self.decision


class NeurosurgeonPolicy:
    """Baseline (Kang et al., ASPLOS'17): the single split with the lowest predicted
    latency, early exits off (``thr_conf = None``), re-chosen from the live
    bandwidth, latency and server load.  Its latency model is its own: device part, then
    upload, then server part, with no local race."""

    def __init__(self, profile: Profile, config: SchedulerConfig | None = None) -> None:
        base = config or SchedulerConfig()
        cfg = SchedulerConfig(
            rel_tolerance=0.0,
            accuracy_tolerance=0.0,
            hysteresis=1.0,
            min_dwell_s=0.0,
            noise_window_s=0.0,
            smooth_s=0.0,
            replan_interval_s=0.0,
            response_bytes=base.response_bytes,
            codec=base.codec,
            input_codec=base.input_codec,
            local_race=False,
        )
        self._scheduler = Scheduler(
            profile,
            SLA(rank=(Metric.LATENCY,)),
            cfg,
            early_exits=False,
            name="neurosurgeon",
        )

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self._scheduler.decide(now, estimates)


class EdgentPolicy:
    """Baseline (Li et al., MECOMM'18 "Edgent"): one split and one exit at which the
    network is truncated (every input answers there: ``Decision.final_exit``), chosen as
    the most accurate exit whose predicted latency meets the target, then the fastest
    split for it.  Predictions use the *offline* device and server timings (no scale
    factors, no queue: Edgent does not adapt to load) with the live bandwidth and latency
    (Edgent's bandwidth-adaptive runtime optimiser)."""

    def __init__(
        self,
        profile: Profile,
        latency_target_ms: float,
        config: SchedulerConfig | None = None,
    ) -> None:
        if not latency_target_ms > 0:
            raise ValueError(f"Edgent needs a latency target > 0 ms, got {latency_target_ms!r}")
        self.profile = profile
        self.latency_target_ms = latency_target_ms
        cfg = config or SchedulerConfig()
        p = profile
        self._bits = np.array([8.0 * cfg.request_bytes(p, s) for s in range(p.num_stages)] + [0.0])
        self._response_bits = 8.0 * cfg.response_bytes
        # Candidates (s, e): split s ≤ x_e offloads the stages [s, x_e]; the device-only
        # version of exit e is recorded as split S.
        rows: list[tuple[int, int, float, float]] = []  # (split, exit, device ms, server ms)
        for e, x in enumerate(p.exit_stages):
            for s in range(x + 1):
                rows.append((s, e, p.device_time_ms(s), p.server_time_ms(s, x + 1)))
            rows.append((p.num_stages, e, p.device_time_ms(x + 1), 0.0))
        self._split = np.array([r[0] for r in rows])
        self._exit = np.array([r[1] for r in rows])
        self._dev = np.array([r[2] for r in rows])
        self._srv = np.array([r[3] for r in rows])
        self._acc = np.array([p.exit_accuracy[e] for e in self._exit])

    def latency_ms(self, estimates: Estimates) -> FloatArray:
        """Predicted latency of every (split, exit) candidate, offline compute times."""
        bw = estimates.bandwidth_bps
        remote = self._split < self.profile.num_stages
        with np.errstate(divide="ignore"):
            net = (
                1000.0 * (self._bits[self._split] + self._response_bits) / bw
                if bw > 0
                else np.full(self._split.shape, np.inf)
            )
            net = net + 1000.0 * estimates.latency_s
        return np.where(remote, self._dev + net + self._srv, self._dev)

    def decide(self, now: float, estimates: Estimates) -> Decision:
        lat = self.latency_ms(estimates)
        ok = lat <= self.latency_target_ms
        if ok.any():
            best_acc = self._acc[ok].max()
            pool = ok & (self._acc >= best_acc)
            note = ""
        else:
            pool = np.ones(lat.shape, dtype=bool)
            note = f"; INFEASIBLE: fastest option misses {self.latency_target_ms:g} ms"
        i = int(np.argmin(np.where(pool, lat, np.inf)))
        s, e = int(self._split[i]), int(self._exit[i])
        final_exit = None if e == self.profile.num_exits - 1 else e
        reason = (
            f"edgent: {split_name(s, self.profile.num_stages)}, exit {e} "
            f"(offline-predicted {lat[i]:.1f} ms){note}"
        )
        return Decision(s, None, reason, final_exit=final_exit)


POLICY_NAMES = (
    "spinn",
    "spinn-no-ee",
    "device-only",
    "server-only",
    "neurosurgeon",
    "edgent",
)


def make_policy(
    name: str,
    profile: Profile,
    sla: SLA | None = None,
    config: SchedulerConfig | None = None,
) -> Policy:
    """A policy by name (``POLICY_NAMES``) for the CLIs and benchmarks.  Edgent takes its
    latency target from ``sla.max_latency_ms``."""
    sla = sla or SLA()
    if name == "spinn":
        return Scheduler(profile, sla, config)
    if name == "spinn-no-ee":
        return Scheduler(profile, sla, config, early_exits=False, name="spinn-no-ee")
    if name == "device-only":
        return DeviceOnlyPolicy(profile)
    if name == "server-only":
        return ServerOnlyPolicy(profile)
    if name == "neurosurgeon":
        return NeurosurgeonPolicy(profile, config)
    if name == "edgent":
        if sla.max_latency_ms is None:
            raise ValueError("the edgent policy needs a latency target: set max_latency_ms")
        return EdgentPolicy(profile, sla.max_latency_ms, config)
    raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
