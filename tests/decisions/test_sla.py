"""Tests for spinn.decisions.sla: SLA files, their errors and the examples of
docs/SCHEDULER.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spinn.decisions.sla import SLA, Metric, SLAError


def test_sla_files(tmp_path: Path) -> None:
    toml = tmp_path / "sla.toml"
    toml.write_text(
        "# latency ≤ 80 ms; then maximise accuracy; then minimise server cost\n"
        'max_latency_ms = 80\nrank = ["accuracy", "server_cost"]\n'
    )
    sla = SLA.load(toml)
    assert sla.max_latency_ms == 80
    assert sla.order[:3] == (Metric.ACCURACY, Metric.SERVER_COST, Metric.LATENCY)
    assert sla.describe() == "latency ≤ 80 ms; then maximise accuracy; then minimise server cost"
    js = tmp_path / "sla.json"
    js.write_text(json.dumps({"min_accuracy": 0.9, "min_throughput": 30, "rank": ["latency"]}))
    assert SLA.load(js) == SLA(min_accuracy=0.9, min_throughput=30, rank=(Metric.LATENCY,))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_latency_ms = -1\n", "max_latency_ms"),
        ('max_latency_ms = "fast"\n', "max_latency_ms"),
        ("min_accuracy = 1.5\n", "min_accuracy"),
        ('rank = ["latency", "speed"]\n', "unknown metric 'speed'"),
        ('rank = ["latency", "latency"]\n', "listed twice"),
        ("max_latency = 80\n", "unknown keys ['max_latency']"),
        ("max_latency_ms = \n", "does not parse"),
    ],
)
def test_sla_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SLAError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SLA.load(path)


def test_sla_file_extension_and_missing(tmp_path: Path) -> None:
    with pytest.raises(SLAError, match="extension"):
        (tmp_path / "sla.yaml").write_text("x")
        SLA.load(tmp_path / "sla.yaml")
    with pytest.raises(SLAError, match="nope.toml"):
        SLA.load(tmp_path / "nope.toml")


def test_sla_examples_in_the_docs_load(tmp_path: Path) -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "SCHEDULER.md").read_text()
    blocks = re.findall(r"```(toml|json)\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    for i, (kind, body) in enumerate(blocks):
        path = tmp_path / f"example{i}.{kind}"
        path.write_text(body)
        sla = SLA.load(path)
        assert sla.rank  # every example states a ranking
