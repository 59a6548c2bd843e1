"""Where the splits and exits of a progressive model fall: ``spinn inspect`` and the
table ``spinn train`` prints when it places the exits.

One row per stage (docs/DESIGN.md part 2: stage k maps the activation at split k to
the one at split k+1): the layers it covers, its FLOPs and the cumulative share of the
backbone's, what crosses the split after it (shape, elements, and the packed bytes the
offline profile measured, when there is one), and the exit read there: its head's
FLOPs against the FLOPs that would finish the network from that point, and its
accuracy. ``placement_warnings`` names exits the generator merged (two requested
fractions snapped to one split) and exit heads that cost more than they can save.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from spinn.decisions.offline_profile import Profile
from spinn.model.progressive import ProgressiveModel

__all__ = [
    "StageRow",
    "format_flops",
    "format_summary",
    "placement_warnings",
    "preferred_codec",
    "stage_layers",
    "summarize",
]

#: Operations that name no layer of their own (arithmetic of a residual join, shapes).
_QUIET_OPS = frozenset(
    {"add", "iadd", "mul", "sub", "truediv", "size", "getattr", "getitem", "contiguous", "dim"}
)
#: Codecs the device packs with, preferred first (spinn.runtime.device: the dictionary
#: codec when both peers hold model.zdict, else sparse int8 with zstd).
_DEVICE_CODECS = ("sparse_int8_zdict", "sparse_int8+zstd", "sparse_int8")


@dataclass(frozen=True)
class StageRow:
    """One stage of a progressive model and the split after it."""

    stage: int
    """Stage index k; the device running [0, k] sends the activation at split k+1."""
    layers: str
    """The backbone layers (module paths, or operations) the stage covers."""
    flops: float
    """FLOPs of the stage alone (per input)."""
    cum_share: float
    """Share of the backbone's FLOPs done after this stage."""
    shape: tuple[int, ...]
    """Activation shape at split k+1 (batch excluded); the logits for the last stage."""
    numel: int
    """Elements of that activation."""
    packed_bytes: int | None
    """Bytes the profile measured at split k+1 with ``codec``; None without a profile
    or after the last stage (nothing crosses)."""
    exit_index: int | None
    """The exit read after this stage, or None."""
    head_flops: float | None
    """FLOPs of that exit's head (0 for the final exit: the backbone's own classifier)."""
    flops_left: float
    """FLOPs that finish the backbone from the split after this stage."""
    accuracy: float | None
    """Test accuracy of the exit, when recorded."""


def _op_label(node: fx.Node) -> str | None:
    if node.op == "call_module":
        parts = str(node.target).split(".")
        # Indexed containers (layers.3.conv1) read best by their block: layers.3.
        depth = 2 if len(parts) > 2 and parts[1].isdigit() else 1
        return ".".join(parts[:depth])
    if node.op in ("call_function", "call_method"):
        name = re.sub(r"_\d+$", "", node.name)
        return None if name in _QUIET_OPS else name
    return None


def stage_layers(model: ProgressiveModel, k: int, *, most: int = 5) -> str:
    """The layers stage k covers, in order: module paths (a block of an indexed
    container by its index) and named operations such as ``cat`` or ``view``."""
    stage = model.stages[k]
    labels: list[str] = []
    graph = getattr(stage, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            label = _op_label(node)
            if label is not None and label not in labels:
                labels.append(label)
    if not labels:
        return "-"
    if len(labels) > most:
        return ", ".join([*labels[: most - 2], "…", labels[-1]]) + f" ({len(labels)})"
    return ", ".join(labels)


def preferred_codec(profile: Profile) -> str:
    """The codec whose bytes the summary shows: what the device would pack with."""
    codecs = profile.codecs
    return next((c for c in _DEVICE_CODECS if c in codecs), min(codecs))


def summarize(
    model: ProgressiveModel,
    *,
    accuracy: Sequence[float] | None = None,
    profile: Profile | None = None,
    codec: str | None = None,
) -> list[StageRow]:
    """One row per stage. ``accuracy``: one value per exit; ``profile``: a profile of
    this model, whose packed bytes with ``codec`` (default ``preferred_codec``) are shown."""
    if accuracy is not None and len(accuracy) != model.num_exits:
        accuracy = None
    if profile is not None and codec is None:
        codec = preferred_codec(profile)
    total = sum(model.stage_flops)
    rows = []
    done = 0.0
    for k in range(model.num_stages):
        done += model.stage_flops[k]
        e = model.exit_at_stage(k)
        shape = model.split_shape(k + 1)
        numel = 1
        for d in shape:
            numel *= int(d)
        packed = None
        if profile is not None and k + 1 < model.num_stages:
            packed = profile.packed_bytes(k + 1, codec)
        rows.append(
            StageRow(
                stage=k,
                layers=stage_layers(model, k),
                flops=model.stage_flops[k],
                cum_share=done / total if total else 0.0,
                shape=shape,
                numel=numel,
                packed_bytes=packed,
                exit_index=e,
                head_flops=None if e is None else model.exit_flops[e],
                flops_left=total - done,
                accuracy=None if e is None or accuracy is None else float(accuracy[e]),
            )
        )
    return rows


def _snapped_stage(model: ProgressiveModel, fraction: float) -> int:
    """The stage after which the generator places an exit requested at ``fraction``:
    the candidate split whose cumulative FLOPs share is nearest (as make_progressive)."""
    total = sum(model.stage_flops)
    cum = []
    done = 0.0
    for f in model.stage_flops[:-1]:
        done += f
        cum.append(done / total)
    return min(range(len(cum)), key=lambda j: (abs(cum[j] - fraction), j))


def placement_warnings(model: ProgressiveModel, requested: Sequence[float]) -> list[str]:
    """What a user should know about where the exits fell: merged requests, and exit
    heads that cost more than finishing the network or than the stage they follow."""
    out: list[str] = []
    fractions = sorted(set(float(f) for f in requested))
    placed = model.num_exits - 1
    if model.num_stages > 1 and len(fractions) > placed:
        by_stage: dict[int, list[float]] = {}
        for f in fractions:
            by_stage.setdefault(_snapped_stage(model, f), []).append(f)
        merged = [
            f"{' and '.join(f'{f:g}' for f in fs)} {'both' if len(fs) == 2 else 'all'} "
            f"fall after stage {k}"
            for k, fs in sorted(by_stage.items())
            if len(fs) > 1
        ]
        out.append(
            f"{len(fractions)} exits were asked for and {placed} placed: "
            + "; ".join(merged)
            + f". The model has {model.num_stages - 1} candidate splits; ask for fewer "
            "exits (--exits) or spread them further apart"
        )
    total = sum(model.stage_flops)
    done = 0.0
    for k in range(model.num_stages):
        done += model.stage_flops[k]
        e = model.exit_at_stage(k)
        if e is None or e == model.num_exits - 1:
            continue
        head, left = model.exit_flops[e], total - done
        if head > left:
            out.append(
                f"exit {e} (after stage {k}, {100 * done / total:.2f}% of the FLOPs) costs "
                f"{format_flops(head)} FLOPs, more than the {format_flops(left)} that finish "
                "the network from there: it can only add work; drop it from --exits"
            )
        elif head > model.stage_flops[k]:
            out.append(
                f"exit {e}'s head costs {format_flops(head)} FLOPs, more than stage {k} it "
                f"follows ({format_flops(model.stage_flops[k])}): inputs that do not leave "
                "there pay for it; place it later (--exits)"
            )
    return out


def format_flops(x: float) -> str:
    """FLOPs in short form: 4.03k, 1.06M, 1.82G."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _table(rows: list[list[str]], left: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            (c.ljust(w) if i in left else c.rjust(w))
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def format_summary(
    model: ProgressiveModel,
    rows: Sequence[StageRow],
    *,
    input_bytes: int | None = None,
    codec: str | None = None,
) -> str:
    """The table, in the manner of torchinfo's summary: a row for the input (split 0),
    then one per stage."""
    spec = model.input_spec
    head = ["stage", "layers", "FLOPs", "cum %", "split", "shape", "elements",
            "bytes" if codec is None else f"bytes {codec}", "exit", "head FLOPs",
            "left FLOPs", "acc %"]  # fmt: skip
    table = [head]
    table.append(
        [
            "in",
            "(input)",
            "",
            "0.00",
            "0",
            "x".join(map(str, spec.shape)),
            str(spec.channels * spec.height * spec.width),
            "-" if input_bytes is None else str(input_bytes),
            "",
            "",
            "",
            "",
        ]  # fmt: skip
    )
    last = model.num_stages - 1
    for r in rows:
        table.append(
            [
                str(r.stage),
                r.layers,
                format_flops(r.flops),
                f"{100 * r.cum_share:.2f}",
                "-" if r.stage == last else str(r.stage + 1),
                "x".join(map(str, r.shape)) + (" logits" if r.stage == last else ""),
                str(r.numel),
                "-" if r.packed_bytes is None else str(r.packed_bytes),
                "" if r.exit_index is None else str(r.exit_index),
                ""
                if r.head_flops is None
                else ("final" if r.stage == last else format_flops(r.head_flops)),
                "" if r.exit_index is None else format_flops(r.flops_left),
                "" if r.accuracy is None else f"{100 * r.accuracy:.2f}",
            ]
        )
    return _table(table, left={1, 5})
