"""The exit rule (spinn.model.exits) and the agreement of every place that applies it.

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

from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule, answering
from spinn.model.inference import apply_threshold, exit_probs, run_stages
from spinn.model.progressive import ProgressiveModel
from spinn.offline.evaluate import sweep
from spinn.runtime.batching import run_batch


def test_rule_holds_a_probability_or_none() -> None:
    assert ExitRule(0.5).thr_conf == 0.5 and ExitRule(0.5).early_exits
    assert ExitRule(1).thr_conf == 1.0 and isinstance(ExitRule(1).thr_conf, float)
    assert ExitRule(None).thr_conf is None and not ExitRule(None).early_exits
    for bad in (-0.1, 1.5, 2.0, math.nan, math.inf, True, "0.5"):
        with pytest.raises(ValueError, match=r"thr_conf must be a probability in \[0, 1\]"):
            ExitRule(bad)  # type: ignore[arg-type]


def test_no_early_exit_is_its_own_rule_not_a_threshold() -> None:
    assert ExitRule.none() == ExitRule(None) and not ExitRule.none().early_exits
    # No number stands for it: above 1 is an error, and 1 is a probability a saturated
    # softmax reaches, so early exits stay on.
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ExitRule(math.nextafter(1.0, 2.0))
    assert ExitRule(1.0).early_exits
    assert ExitRule.none().describe() == "no early exit"
    assert ExitRule(0.8).describe() == "thr 0.80"


def test_wire_form_round_trips_and_says_no_early_exit_with_the_flag() -> None:
    # PROTOCOL.md §5.3: INFER carries a probability and an early_exits flag.
    assert ExitRule.none().to_wire() == (1.0, False)
    assert ExitRule(0.3).to_wire() == (0.3, True)
    assert ExitRule(1.0).to_wire() == (1.0, True)
    for rule in (ExitRule.none(), ExitRule(0.0), ExitRule(0.3), ExitRule(1.0)):
        assert ExitRule.from_wire(*rule.to_wire()) == rule


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
    rows = sweep(model, probs, labels, thresholds, split=0)
    assert [r.thr_conf for r in rows] == sorted(set(thresholds))
    for row in rows:
        answers = run_batch(model, x, 0, [ExitRule(row.thr_conf)] * len(x))
        counts = [0] * model.num_exits
        for a in answers:
            assert a is not None
            counts[a.exit_index] += 1
        assert list(row.exit_rate) == [c / len(x) for c in counts], row.thr_conf
    # No early exit: the sweep's rule and the runtime's send every input to the final exit.
    exit_index, _ = apply_threshold(probs, ExitRule.none())
    assert exit_index.tolist() == [model.num_exits - 1] * len(x)
    for a in run_batch(model, x, 0, [ExitRule.none()] * len(x)):
        assert a is not None and a.exit_index == model.num_exits - 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep(model, probs, labels, [2.0], split=0)  # no threshold stands for "none"
