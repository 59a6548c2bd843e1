"""Per-exit accuracy and the confidence-threshold sweep (docs/DESIGN.md part 1).

For each ``thr_conf`` the sweep reports the share of inputs leaving at each exit, the
share that would still be running at a given split (the upload rate when the device
runs the stages before it, as in the threshold table of ``seeds/000_...``), and the
overall accuracy. Every exit is evaluated once per input (``inference.exit_probs``) and
the exit rule (``spinn.model.exits``, through ``inference.apply_threshold``) is then applied per
threshold, so the sweep agrees exactly with input-by-input progressive execution.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from spinn.model.exits import ExitRule
from spinn.model.inference import apply_threshold, exit_probs
from spinn.model.progressive import ProgressiveModel
from spinn.offline.data import ImageSet

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Evaluation",
    "ThresholdRow",
    "collect_probs",
    "evaluate_model",
    "format_table",
    "sweep",
    "write_outputs",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (
    0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99,
)  # fmt: skip


@dataclass(frozen=True)
class ThresholdRow:
    """Behaviour of the progressive model at one confidence threshold."""

    thr_conf: float
    """The confidence threshold."""
    exit_rate: tuple[float, ...]
    """Share of inputs answered at each exit (sums to 1)."""
    upload_rate: float
    """Share of inputs no exit before ``split`` answered: those the device uploads."""
    accuracy: float
    """Top-1 accuracy over all inputs."""
    mean_flops_share: float
    """Average compute per input as a share of running every stage without early exits."""


@dataclass(frozen=True)
class Evaluation:
    """Result of ``spinn evaluate``."""

    model_id: str
    dataset: str
    size: int
    split: int
    """The split the upload rate refers to."""
    exit_stages: tuple[int, ...]
    exit_accuracy: tuple[float, ...]
    rows: tuple[ThresholdRow, ...]


def collect_probs(
    model: ProgressiveModel, data: ImageSet, *, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """Softmax of every exit for every input: (E, N, C), and the labels (N,)."""
    model.eval()
    chunks = []
    for i in range(0, len(data), batch_size):
        x = model.input_spec.preprocess(data.images[i : i + batch_size])
        chunks.append(exit_probs(model, x))
    if not chunks:
        raise ValueError(f"{data.name} holds no images to evaluate")
    return torch.cat(chunks, dim=1), data.labels


def _flops_to_exit(model: ProgressiveModel) -> list[float]:
    """FLOPs spent on an input that leaves at each exit (stages plus every head on the way)."""
    out = []
    for e, k in enumerate(model.exit_stages):
        heads = sum(model.exit_flops[: e + 1])
        out.append(sum(model.stage_flops[: k + 1]) + heads)
    return out


def sweep(
    model: ProgressiveModel,
    probs: Tensor,
    labels: Tensor,
    thresholds: Sequence[float],
    split: int,
) -> list[ThresholdRow]:
    """The threshold table for stored probabilities (E, N, C) and labels (N,); each
    threshold a probability in [0, 1]."""
    if not 0 <= split <= model.num_stages:
        raise ValueError(f"split {split} out of range 0..{model.num_stages}")
    n = probs.shape[1]
    device_exits = set(model.exits_before(split))
    cost = torch.tensor(_flops_to_exit(model), dtype=torch.float64)
    full = cost[-1]
    rows = []
    for thr in sorted(set(float(t) for t in thresholds)):
        exit_index, label = apply_threshold(probs, ExitRule(thr))
        counts = torch.bincount(exit_index, minlength=model.num_exits).double() / n
        answered_on_device = sum(float(counts[e]) for e in device_exits)
        rows.append(
            ThresholdRow(
                thr_conf=thr,
                exit_rate=tuple(float(c) for c in counts),
                upload_rate=0.0 if split == model.num_stages else 1.0 - answered_on_device,
                accuracy=float((label == labels).double().mean()),
                mean_flops_share=float((counts * cost).sum() / full),
            )
        )
    return rows


def evaluate_model(
    model: ProgressiveModel,
    data: ImageSet,
    *,
    model_id: str,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    split: int | None = None,
    batch_size: int = 500,
    collected: tuple[Tensor, Tensor] | None = None,
) -> Evaluation:
    """Per-exit accuracy and the threshold sweep on ``data``.

    ``split`` defaults to the split right after the first early exit: the device runs
    up to and including that exit and uploads what it did not answer. ``collected``: what
    ``collect_probs`` gives for ``data``, when the caller has it already.
    """
    if split is None:
        split = model.exit_stages[0] + 1 if model.num_exits > 1 else model.num_stages // 2
    if collected is None:
        collected = collect_probs(model, data, batch_size=batch_size)
    probs, labels = collected
    exit_accuracy = (probs.argmax(dim=2) == labels.unsqueeze(0)).double().mean(dim=1)
    return Evaluation(
        model_id=model_id,
        dataset=data.name,
        size=len(data),
        split=split,
        exit_stages=tuple(model.exit_stages),
        exit_accuracy=tuple(float(a) for a in exit_accuracy),
        rows=tuple(sweep(model, probs, labels, thresholds, split)),
    )


def format_table(ev: Evaluation, *, markdown: bool = False) -> str:
    """The per-exit accuracy and threshold tables as text (or GitHub Markdown)."""
    exits = [f"exit{e}" for e in range(len(ev.exit_stages))]
    acc_head = ["", *[f"{x} (stage {k})" for x, k in zip(exits, ev.exit_stages, strict=True)]]
    acc_row = ["accuracy %", *[f"{100 * a:.2f}" for a in ev.exit_accuracy]]
    sweep_head = ["thr_conf", *[f"{x} %" for x in exits], f"upload@split{ev.split} %",
                  "accuracy %", "compute %"]  # fmt: skip
    sweep_rows = [
        [
            f"{r.thr_conf:.2f}",
            *[f"{100 * v:.1f}" for v in r.exit_rate],
            f"{100 * r.upload_rate:.1f}",
            f"{100 * r.accuracy:.2f}",
            f"{100 * r.mean_flops_share:.1f}",
        ]
        for r in ev.rows
    ]
    if markdown:

        def md(rows: list[list[str]]) -> str:
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---:|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            return "\n".join(lines)

        return (
            f"Per-exit accuracy on {ev.dataset} ({ev.size} images), model `{ev.model_id}`:\n\n"
            + md([acc_head, acc_row])
            + "\n\nThreshold sweep (share of inputs leaving at each exit; upload = share still "
            f"running at split {ev.split}; compute = mean FLOPs vs. no early exit):\n\n"
            + md([sweep_head, *sweep_rows])
            + "\n"
        )

    def txt(rows: list[list[str]]) -> str:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        )

    return (
        f"{ev.dataset}: {ev.size} images, model {ev.model_id}\n"
        + txt([acc_head, acc_row])
        + "\n\n"
        + txt([sweep_head, *sweep_rows])
        + "\n"
    )


def write_outputs(ev: Evaluation, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write evaluation.csv, evaluation.md and evaluation.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "evaluation.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        n = len(ev.exit_stages)
        w.writerow(
            [
                "thr_conf",
                *[f"exit{e}_rate" for e in range(n)],
                f"upload_rate_split{ev.split}",
                "accuracy",
                "compute_share",
            ]  # fmt: skip
        )
        for r in ev.rows:
            w.writerow(
                [
                    f"{r.thr_conf:.4f}",
                    *[f"{v:.6f}" for v in r.exit_rate],
                    f"{r.upload_rate:.6f}",
                    f"{r.accuracy:.6f}",
                    f"{r.mean_flops_share:.6f}",
                ]  # fmt: skip
            )
        w.writerow([])
        w.writerow(["exit", "stage", "accuracy"])
        for e, (k, a) in enumerate(zip(ev.exit_stages, ev.exit_accuracy, strict=True)):
            w.writerow([e, k, f"{a:.6f}"])
    md_path = out / "evaluation.md"
    md_path.write_text(format_table(ev, markdown=True), encoding="utf-8")
    png_path = out / "evaluation.png"
    _plot(ev, png_path)
    return [csv_path, md_path, png_path]


def _plot(ev: Evaluation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [r.thr_conf for r in ev.rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(thr, [100 * r.accuracy for r in ev.rows], "o-", label="accuracy")
    ax.plot(
        thr, [100 * r.upload_rate for r in ev.rows], "s--", label=f"upload rate (split {ev.split})"
    )
    ax.plot(thr, [100 * r.mean_flops_share for r in ev.rows], "^:", label="compute vs. no exits")
    ax.axhline(100 * ev.exit_accuracy[-1], color="grey", lw=0.8, label="final exit alone")
    ax.set_xlabel("confidence threshold thr_conf")
    ax.set_ylabel("%")
    ax.set_title(f"{ev.model_id} on {ev.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
