"""Tests for spinn.decisions.policy: the decision value and the fixed policy."""

from __future__ import annotations

import pytest

from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision, FixedPolicy, Policy
from spinn.model.exits import ExitRule


def test_fixed_policy_ignores_estimates() -> None:
    pol = FixedPolicy(3, 0.8)
    assert isinstance(pol, Policy)
    a = pol.decide(0.0, Estimates(bandwidth_bps=1e9, latency_s=0.001))
    b = pol.decide(5.0, Estimates(bandwidth_bps=1e3, latency_s=1.0, server_up=False))
    assert a == b == Decision(3, 0.8, "fixed")
    assert a.final_exit is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": -1, "thr_conf": 0.5}, "split"),
        ({"split": 1.5, "thr_conf": 0.5}, "split"),
        ({"split": 1, "thr_conf": float("nan")}, "thr_conf"),
        ({"split": 1, "thr_conf": 2.0}, "thr_conf"),  # "no early exit" is None, not a number
        ({"split": 1, "thr_conf": 0.5, "final_exit": -2}, "final_exit"),
    ],
)
def test_decision_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"Decision.{field}"):
        Decision(**kwargs)  # type: ignore[arg-type]


def test_decision_threshold_reads_as_an_exit_rule() -> None:
    assert Decision(2, 0.7).exit_rule == ExitRule(0.7)
    assert Decision(2, 1.0).exit_rule == ExitRule(1.0)
    assert Decision(2, None).exit_rule == ExitRule.none()
