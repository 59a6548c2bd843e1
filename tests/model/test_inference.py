"""Progressive execution: exit rule, stage ranges, device/server hand-over, batched agreement."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from spinn.model.backbones import build_backbone
from spinn.model.exits import ExitRule
from spinn.model.inference import (
    apply_threshold,
    exit_probs,
    iter_stages,
    run_stages,
)
from spinn.model.progressive import InputSpec, ProgressiveModel, make_progressive

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.5,), std=(0.5,))


@functools.cache
def _model() -> ProgressiveModel:
    torch.manual_seed(3)
    model = make_progressive(
        build_backbone("resnet20", in_channels=1, num_classes=10, width=4), SPEC
    )
    # Spread the logits so exits reach a range of confidences without training.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(8.0)
    return model.eval()


def _inputs(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *SPEC.shape, generator=g)


def _thresholds(model: ProgressiveModel, x: torch.Tensor) -> list[float]:
    conf = exit_probs(model, x).max(dim=2).values[:-1].flatten()
    return [0.0, *torch.quantile(conf, torch.tensor([0.2, 0.5, 0.8])).tolist(), 1.0]


def test_full_range_always_answers_and_matches_forward() -> None:
    model = _model()
    x = _inputs(1)
    out = run_stages(model, x, 0, model.num_stages, ExitRule(None))
    assert out.answered and out.activation is None
    assert out.answer is not None and out.answer.exit == model.num_exits - 1
    assert out.stop == model.num_stages
    with torch.no_grad():
        want = torch.softmax(model(x)[-1][0], dim=0)
    torch.testing.assert_close(out.answer.probs, want)
    assert out.answer.label == int(want.argmax())


def test_threshold_zero_answers_at_first_exit() -> None:
    model = _model()
    out = run_stages(
        model, _inputs(1)[0], 0, model.num_stages, ExitRule(0.0)
    )  # unbatched input works
    assert out.answer is not None
    assert out.answer.exit == 0
    assert out.answer.stage == model.exit_stages[0]
    assert out.stop == model.exit_stages[0] + 1


def test_per_input_execution_agrees_with_batched_rule() -> None:
    model = _model()
    x = _inputs(16)
    probs = exit_probs(model, x)
    for thr in _thresholds(model, x):
        exit_index, labels = apply_threshold(probs, ExitRule(thr))
        for i in range(len(x)):
            out = run_stages(model, x[i : i + 1], 0, model.num_stages, ExitRule(thr))
            assert out.answer is not None
            assert out.answer.exit == int(exit_index[i])
            assert out.answer.label == int(labels[i])


@pytest.mark.parametrize("split", [0, 3, 6, 11])
def test_device_then_server_equals_local(split: int) -> None:
    model = _model()
    x = _inputs(8)
    for rule in map(ExitRule, _thresholds(model, x)[1:4]):
        for i in range(len(x)):
            local = run_stages(model, x[i], 0, model.num_stages, rule)
            dev = run_stages(model, x[i], 0, split, rule)
            if dev.answered:
                assert dev.answer is not None and local.answer is not None
                assert dev.answer.exit == local.answer.exit
                continue
            assert dev.activation is not None and dev.stop == split
            assert tuple(dev.activation.shape) == (1, *model.split_shape(split))
            srv = run_stages(model, dev.activation, split, model.num_stages, rule)
            assert srv.answer is not None and local.answer is not None
            assert srv.answer.exit == local.answer.exit
            torch.testing.assert_close(srv.answer.probs, local.answer.probs)


def test_generator_can_stop_at_a_stage_boundary() -> None:
    model = _model()
    steps = iter_stages(model, _inputs(1), 0, model.num_stages, ExitRule(1.0))
    first = next(steps)
    second = next(steps)
    assert (first.stage, second.stage) == (0, 1)
    assert tuple(second.activation.shape[1:]) == model.split_shape(2)
    steps.close()  # the caller cancels: no more stages run
    all_steps = list(iter_stages(model, _inputs(1), 0, model.num_stages, ExitRule(None)))
    assert [s.stage for s in all_steps] == list(range(model.num_stages))
    assert all(s.answer is None for s in all_steps[:-1])
    assert all_steps[-1].answer is not None  # the final exit still answers


def test_no_early_exit_rule_skips_early_exits() -> None:
    model = _model()
    out = run_stages(model, _inputs(1), 0, 5, ExitRule(None))
    assert not out.answered and out.stop == 5
    assert out.activation is not None
    empty = run_stages(model, out.activation, 5, 5, ExitRule(0.5))
    assert not empty.answered and empty.stop == 5
    torch.testing.assert_close(empty.activation, out.activation)


def test_topk_is_sorted() -> None:
    model = _model()
    out = run_stages(model, _inputs(1), 0, model.num_stages, ExitRule(1.0))
    assert out.answer is not None
    top = out.answer.topk(3)
    assert len(top) == 3 and top[0][0] == out.answer.label
    assert top[0][1] >= top[1][1] >= top[2][1]
    assert len(out.answer.topk(100)) == model.num_classes


def test_errors_name_the_problem() -> None:
    model = _model()
    x = _inputs(1)
    rule = ExitRule(0.5)
    with pytest.raises(ValueError, match="stage range"):
        run_stages(model, x, 4, 2, rule)
    with pytest.raises(ValueError, match="activation at split 2 must have shape"):
        run_stages(model, x, 2, 5, rule)
    with pytest.raises(ValueError, match="final exit 9 outside"):
        run_stages(model, x, 0, 5, rule, final_exit=9)
    with pytest.raises(ValueError, match="exits, batch, classes"):
        apply_threshold(torch.zeros(3, 4), rule)


def test_apply_threshold_first_confident_exit() -> None:
    # Two inputs, three exits, two classes: input 0 is confident at exit 1, input 1 never.
    probs = torch.tensor(
        [
            [[0.6, 0.4], [0.55, 0.45]],
            [[0.1, 0.9], [0.5, 0.5]],
            [[0.3, 0.7], [0.6, 0.4]],
        ]
    )
    exit_index, labels = apply_threshold(probs, ExitRule(0.8))
    assert exit_index.tolist() == [1, 2]
    assert labels.tolist() == [1, 0]
    exit_index, labels = apply_threshold(probs, ExitRule(0.5))
    assert exit_index.tolist() == [0, 0]


def test_no_early_exit_rule_answers_at_the_final_exit_only() -> None:
    model = _model()
    x = _inputs(6)
    probs = exit_probs(model, x)
    assert float(probs[:-1].max()) == 1.0  # some early exit saturates in float32
    rule = ExitRule.none()
    exit_index, _ = apply_threshold(probs, rule)
    assert exit_index.tolist() == [model.num_exits - 1] * 6
    for i in range(6):
        out = run_stages(model, x[i], 0, model.num_stages, rule)
        assert out.answer is not None and out.answer.exit == model.num_exits - 1
    # Threshold 1 is a probability a saturated softmax reaches: early exits stay on.
    exit_index, _ = apply_threshold(probs, ExitRule(1.0))
    assert int(exit_index.min()) < model.num_exits - 1


def test_a_truncated_network_answers_at_its_final_exit() -> None:
    model = _model()
    x = _inputs(8)
    probs = exit_probs(model, x)
    for final in range(model.num_exits - 1):
        last = model.exit_stages[final] + 1
        for rule in (ExitRule(None), ExitRule(0.9)):
            # The exits up to the truncation, as if the backbone ended there.
            exit_index, _ = apply_threshold(probs[: final + 1], rule)
            for i in range(len(x)):
                out = run_stages(model, x[i], 0, model.num_stages, rule, final_exit=final)
                assert out.answer is not None and out.stop <= last
                assert out.answer.exit == int(exit_index[i]) <= final
                torch.testing.assert_close(out.answer.probs, probs[out.answer.exit, i])
