"""The exit rule (spinn.exits) and the agreement of every place that applies it.

The rule is pure: these tests need no sockets.  The agreement tests give the offline
sweep (``apply_threshold``, ``evaluate.sweep``), the server's batches (``run_batch``) and
progressive execution on the device and the server (``run_stages``) the same inputs and
thresholds, including thresholds equal to a probability an exit reaches, and require the
same exit for every input.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spinn.checkpoint import load_checkpoint
from spinn.evaluate import sweep
from spinn.exits import ExitRule, answering
from spinn.inference import apply_threshold, exit_probs, run_stages
from spinn.profile import NO_EARLY_EXIT
from spinn.progressive import ProgressiveModel
from spinn.runtime.batching import run_batch


def test_rule_holds_a_probability_or_none() -> None:
    assert ExitRule(0.5).thr_conf == 0.5 and ExitRule(0.5).early_exits
    assert ExitRule(1).thr_conf == 1.0 and isinstance(ExitRule(1).thr_conf, float)
    assert ExitRule(None).thr_conf is None and not ExitRule(None).early_exits
    for bad in (-0.1, 1.5, NO_EARLY_EXIT, math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError, match=r"thr_conf must be a probability in \[0, 1\]"):
            ExitRule(bad)  # type: ignore[arg-type]


def test_policy_threshold_maps_above_one_to_no_early_exit() -> None:
    assert ExitRule.from_threshold(0.0) == ExitRule(0.0)
    assert ExitRule.from_threshold(1.0) == ExitRule(1.0)  # a saturated softmax reaches it
    assert ExitRule.from_threshold(math.nextafter(1.0, 2.0)) == ExitRule(None)
    assert ExitRule.from_threshold(NO_EARLY_EXIT) == ExitRule(None)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="thr_conf must be a finite number >= 0"):
            ExitRule.from_threshold(bad)
    with pytest.raises(ValueError, match="thr_conf must be a number"):
        ExitRule.from_threshold(True)


def test_wire_flag_turns_early_exits_off_whatever_the_threshold() -> None:
    assert ExitRule.from_wire(0.3, True) == ExitRule(0.3)
    assert ExitRule.from_wire(0.3, False) == ExitRule(None)
    assert ExitRule.from_wire(1.0, False) == ExitRule(None)


def test_head_runs_only_where_its_exit_could_answer() -> None:
    assert ExitRule(0.9).runs_head(0, 3) and ExitRule(0.9).runs_head(3, 3)
    assert not ExitRule(None).runs_head(0, 3) and ExitRule(None).runs_head(3, 3)
    assert ExitRule(None).runs_head(1, 1), "a truncated network's last exit always runs"


def test_answering_compares_the_top_probability_with_the_threshold() -> None:
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]])  # exact in float32
    assert answering(0, 2, probs, ExitRule(0.75)).tolist() == [True, False, True]
    assert answering(0, 2, probs, ExitRule(0.0)).tolist() == [True, True, True]
    assert answering(0, 2, probs, ExitRule(1.0)).tolist() == [False, False, True]
    assert answering(0, 2, probs, ExitRule(None)).tolist() == [False, False, False]
    # One rule per input, as in a server batch.
    rules = [ExitRule(None), ExitRule(0.4), ExitRule(1.0)]
    assert answering(1, 2, probs, rules).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="3 inputs but 2 exit rules"):
        answering(0, 2, probs, rules[:2])
    with pytest.raises(ValueError, match="inputs, classes"):
        answering(0, 2, probs[0], ExitRule(0.5))


def test_final_exit_answers_whatever_its_probabilities() -> None:
    probs = torch.tensor([[0.1, 0.9], [math.nan, math.nan]])
    for rule in (ExitRule(None), ExitRule(1.0), [ExitRule(None), ExitRule(0.5)]):
        assert answering(2, 2, probs, rule).tolist() == [True, True]


def test_threshold_is_compared_exactly_not_rounded_to_float32() -> None:
    # 0.7 rounds to a float32 just below it: that probability does not reach 0.7.
    below = float(torch.tensor(0.7, dtype=torch.float32))
    assert below < 0.7
    probs = torch.tensor([[below, 1 - below]], dtype=torch.float32)
    assert not bool(answering(0, 1, probs, ExitRule(0.7))[0])
    assert not bool(answering(0, 1, probs, [ExitRule(0.7)])[0])
    assert bool(answering(0, 1, probs, ExitRule(below))[0])
    stacked = torch.stack([probs, probs])
    assert apply_threshold(stacked, ExitRule(0.7))[0].tolist() == [1]
    assert apply_threshold(stacked, ExitRule(below))[0].tolist() == [0]


def _model_and_inputs(checkpoint: Path, n: int) -> tuple[ProgressiveModel, torch.Tensor]:
    model, _ = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(5)
    return model.eval(), torch.randn(n, *model.input_spec.shape, generator=g)


def _rules(probs: torch.Tensor) -> list[ExitRule]:
    """No early exit, the extremes, quantiles, probabilities the early exits reach exactly
    and the doubles just above them: the boundary where a threshold rounded to float32
    would make the call sites disagree."""
    conf = probs.max(dim=2).values[:-1].flatten()
    exact = [float(c) for c in conf[:: max(1, len(conf) // 4)] if c < 1.0]
    above = [math.nextafter(c, 1.0) for c in exact]
    quantiles = torch.quantile(conf.double(), torch.tensor([0.25, 0.5, 0.75]).double())
    thresholds = [0.0, 1.0, *quantiles.tolist(), *exact, *above]
    return [ExitRule(None), *map(ExitRule, thresholds)]


def test_sweep_batches_and_progressive_execution_give_the_same_exits(checkpoint: Path) -> None:
    model, x = _model_and_inputs(checkpoint, 12)
    probs = exit_probs(model, x)
    rules = _rules(probs)
    exits_seen: set[int] = set()
    for rule in rules:
        offline, _ = apply_threshold(probs, rule)
        batched = run_batch(model, x, 0, [rule] * len(x))
        for i in range(len(x)):
            out = run_stages(model, x[i], 0, model.num_stages, rule)
            got = batched[i]
            assert out.answer is not None and got is not None
            assert out.answer.exit == got.exit_index == int(offline[i]), (rule, i)
            exits_seen.add(out.answer.exit)
    assert len(exits_seen) > 1, "the rules exercise several exits"
    # A batch mixing every rule, one per input, decides each input as it would alone.
    mixed = [rules[i % len(rules)] for i in range(len(x))]
    for i, got in enumerate(run_batch(model, x, 0, mixed)):
        want, _ = apply_threshold(probs[:, i : i + 1], mixed[i])
        assert got is not None and got.exit_index == int(want[0])


def test_sweep_exit_rates_are_what_the_runtime_answers(checkpoint: Path) -> None:
    model, x = _model_and_inputs(checkpoint, 12)
    probs = exit_probs(model, x)
    labels = torch.zeros(len(x), dtype=torch.long)
    thresholds = [r.thr_conf for r in _rules(probs) if r.thr_conf is not None]
    rows = sweep(model, probs, labels, [*thresholds, NO_EARLY_EXIT], split=0)
    for row in rows:
        answers = run_batch(model, x, 0, [ExitRule.from_threshold(row.thr_conf)] * len(x))
        counts = [0] * model.num_exits
        for a in answers:
            assert a is not None
            counts[a.exit_index] += 1
        assert list(row.exit_rate) == [c / len(x) for c in counts], row.thr_conf
    assert rows[-1].thr_conf == NO_EARLY_EXIT and rows[-1].exit_rate[-1] == 1.0
