"""Threshold sweep: exit rates, upload rate, accuracy; agreement with per-input execution."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from spinn.model.backbones import build_backbone
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.model.progressive import InputSpec, ProgressiveModel, make_progressive
from spinn.offline.data import ImageSet, load_mnist_5k
from spinn.offline.evaluate import evaluate_model, format_table, sweep, write_outputs

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.13,), std=(0.31,))


@functools.cache
def _model() -> ProgressiveModel:
    torch.manual_seed(5)
    model = make_progressive(
        build_backbone("resnet20", in_channels=1, num_classes=10, width=4), SPEC
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(6.0)
    return model.eval()


@functools.cache
def _digits() -> ImageSet:
    """The 1,000 test digits, parsed once (the CSV parse takes about a second)."""
    return load_mnist_5k("test")


def test_sweep_on_known_probabilities() -> None:
    model = _model()
    e = model.num_exits
    # Four inputs; input i is confident (0.9) first at exit i, else 0.5 on class 0.
    probs = torch.zeros(e, 4, 10)
    probs[:, :, 0] = 0.5
    probs[:, :, 1] = 0.5
    for i in range(4):
        probs[i, i] = 0.0
        probs[i, i, 3] = 0.9
        probs[i, i, 4] = 0.1
    labels = torch.tensor([3, 3, 0, 1])
    split = model.exit_stages[1] + 1  # exits 0 and 1 run on the device
    rows = sweep(model, probs, labels, [0.95, 0.8], split)
    low, high = rows  # sorted by threshold
    assert low.thr_conf == 0.8
    assert low.exit_rate[:4] == (0.25, 0.25, 0.25, 0.25)
    assert sum(low.exit_rate) == pytest.approx(1.0)
    assert low.upload_rate == pytest.approx(0.5)
    assert low.accuracy == pytest.approx(0.5)  # inputs 0 and 1 right, 2 and 3 say class 3
    assert high.exit_rate[-1] == pytest.approx(1.0) and high.upload_rate == pytest.approx(1.0)
    assert high.mean_flops_share > low.mean_flops_share
    assert sweep(model, probs, labels, [0.8], model.num_stages)[0].upload_rate == 0.0
    with pytest.raises(ValueError, match="split 99 out of range"):
        sweep(model, probs, labels, [0.8], 99)


def test_evaluation_matches_input_by_input_execution() -> None:
    model = _model()
    data = _digits().head(40)
    ev = evaluate_model(model, data, model_id="m", thresholds=[0.6, 0.9])
    assert ev.split == model.exit_stages[0] + 1
    assert len(ev.exit_accuracy) == model.num_exits
    for row in ev.rows:
        counts = [0] * model.num_exits
        correct = 0
        for i in range(len(data)):
            x = model.input_spec.preprocess(data.images[i])
            out = run_stages(model, x, 0, model.num_stages, ExitRule(row.thr_conf))
            assert out.answer is not None
            counts[out.answer.exit] += 1
            correct += int(out.answer.label == int(data.labels[i]))
        assert row.exit_rate == pytest.approx([c / len(data) for c in counts])
        assert row.accuracy == pytest.approx(correct / len(data))


def test_outputs_written(tmp_path: Path) -> None:
    model = _model()
    ev = evaluate_model(model, _digits().head(30), model_id="mid", split=3)
    paths = write_outputs(ev, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["evaluation.csv", "evaluation.md", "evaluation.png"]
    csv_text = (tmp_path / "out" / "evaluation.csv").read_text()
    assert csv_text.startswith("thr_conf,exit0_rate")
    assert "upload_rate_split3" in csv_text
    assert len(csv_text.splitlines()) == 1 + len(ev.rows) + 2 + model.num_exits
    md = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| thr_conf |" in md and "`mid`" in md
    assert (tmp_path / "out" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_table(ev)
    assert "upload@split3 %" in text and "0.99" in text
