"""Tests for spinn.decisions.baselines: device-only, server-only, Neurosurgeon, Edgent and
every policy by name."""

from __future__ import annotations

import pytest

from spinn.decisions.baselines import (
    POLICY_NAMES,
    DeviceOnlyPolicy,
    EdgentPolicy,
    NeurosurgeonPolicy,
    ServerOnlyPolicy,
    make_policy,
)
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, Policy
from spinn.decisions.sla import SLA
from tests.support.decisions import est, scenario_profile


def test_fixed_baselines() -> None:
    p = scenario_profile()
    assert DeviceOnlyPolicy(p).decide(0, est(1)) == Decision(6, None, "device-only baseline")
    assert ServerOnlyPolicy(p).decide(0, est(1, server_up=False)).split == 0
    for name in POLICY_NAMES:
        pol = make_policy(name, p, SLA(max_latency_ms=30))
        assert isinstance(pol, Policy)
        assert isinstance(pol.decide(0.0, est(10)), Decision)
    with pytest.raises(ValueError, match="unknown policy 'x'"):
        make_policy("x", p)
    with pytest.raises(ValueError, match="latency target"):
        make_policy("edgent", p)


def _neurosurgeon_latency(p: Profile, s: int, e: Estimates) -> float:
    """Neurosurgeon's own model: device part, upload, RTT, server part, download."""
    if s == p.num_stages:
        return p.device_time_ms(s)
    net = 8e3 * (p.packed_bytes(s) + 256) / e.bandwidth_bps + 1000 * e.latency_s
    return p.device_time_ms(s) + net + p.server_time_ms(s)


def test_neurosurgeon_is_best_single_split_for_latency_without_exits() -> None:
    p = scenario_profile()
    pol = NeurosurgeonPolicy(p)
    chosen = set()
    for bw in (0.05, 1, 5, 20, 100, 1000):
        e = est(bw)
        d = pol.decide(0.0, e)
        assert d.thr_conf is None
        best = min(_neurosurgeon_latency(p, s, e) for s in range(7))
        assert _neurosurgeon_latency(p, d.split, e) == pytest.approx(best, rel=1e-9), bw
        chosen.add(d.split)
    assert len(chosen) > 1  # it does follow the bandwidth


def test_edgent_meets_target_ignores_server_load_adapts_to_bandwidth() -> None:
    p = scenario_profile()
    pol = EdgentPolicy(p, latency_target_ms=10)
    fast = pol.decide(0.0, est(1000, lat_ms=1))
    # At 1 Gbit/s the full network fits in 10 ms on the server: the final exit.
    assert fast.final_exit is None and fast.split <= 1
    loaded = pol.decide(0.0, est(1000, lat_ms=1, server_scale=50.0, server_queue=10.0))
    assert loaded == fast  # no adaptation to server load
    slow = pol.decide(0.0, est(0.01, lat_ms=1))
    # Offline it cannot upload anything in time: device-only, truncated at exit 0 (8 ms).
    assert (slow.split, slow.final_exit) == (6, 0)
    hopeless = EdgentPolicy(p, latency_target_ms=1).decide(0.0, est(0.01))
    assert "INFEASIBLE" in hopeless.reason
    with pytest.raises(ValueError, match="latency target"):
        EdgentPolicy(p, 0)
