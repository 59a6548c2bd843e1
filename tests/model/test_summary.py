"""Where the splits and exits fall: the stage table, its warnings, and spinn inspect."""

from __future__ import annotations

import pytest
from torch import nn

from spinn.cli import main
from spinn.decisions.offline_profile import Profile
from spinn.model.backbones import build_backbone
from spinn.model.checkpoint import load_checkpoint
from spinn.model.progressive import InputSpec, make_progressive
from spinn.model.summary import placement_warnings, preferred_codec, stage_layers, summarize
from tests.support.runtime import CHECKPOINT as SHIPPED

GREY = InputSpec(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))


def _thin_stem() -> nn.Module:
    # Stage 0 is a 1x1 convolution to 2 channels: any exit head there outweighs it.
    return nn.Sequential(
        nn.Conv2d(1, 2, 1), nn.ReLU(),
        nn.Conv2d(2, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def test_rows_follow_the_model() -> None:
    model = make_progressive(
        build_backbone("resnet20", in_channels=1, num_classes=10, width=4), GREY
    )
    rows = summarize(model, accuracy=[0.5] * model.num_exits)
    assert [r.stage for r in rows] == list(range(model.num_stages))
    assert stage_layers(model, 0) == "conv1, bn1, relu"
    assert stage_layers(model, 1) == "layers.0"
    assert stage_layers(model, model.num_stages - 2) == "layers.8, pool"
    total = sum(model.stage_flops)
    assert rows[-1].cum_share == pytest.approx(1.0) and rows[-1].flops_left == pytest.approx(0)
    for r in rows:
        assert r.flops_left == pytest.approx(total - sum(model.stage_flops[: r.stage + 1]))
        assert r.shape == model.split_shape(r.stage + 1)
        assert (r.exit_index is not None) == (r.stage in model.exit_stages)
    assert placement_warnings(model, (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)) == []


def test_costly_heads_and_merged_exits_are_warned_about() -> None:
    model = make_progressive(_thin_stem().eval(), GREY, exit_fractions=(0.01, 0.02, 0.5))
    assert model.num_exits == 3
    warnings = placement_warnings(model, (0.01, 0.02, 0.5))
    assert warnings[0].startswith("3 exits were asked for and 2 placed: 0.01 and 0.02 both")
    head = f"{model.exit_flops[0] / 1e3:.3g}k"
    assert any(f"exit 0's head costs {head} FLOPs, more than stage 0" in w for w in warnings)


def test_inspect_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(SHIPPED)]) == 0
    out, err = capsys.readouterr()
    model, meta = load_checkpoint(SHIPPED)
    profile = Profile.load(SHIPPED.with_name("profile.json"))
    codec = preferred_codec(profile)  # the shipped model's: sparse_int8_zdict
    lines = out.splitlines()
    assert f"bytes {codec}" in lines[1]
    stages = [line.split() for line in lines[3 : 3 + model.num_stages]]
    assert [int(s[0]) for s in stages] == list(range(model.num_stages))
    for k, cells in enumerate(stages[:-1]):
        # Packed bytes at the split after stage k are the profile's.
        assert str(profile.packed_bytes(k + 1, codec)) in cells
    accuracy = meta.metrics["test_exit_accuracy"]
    for e, k in enumerate(model.exit_stages):
        assert stages[k][-1] == f"{100 * accuracy[e]:.2f}"
    # The input row shows what split 0 sends: the frame's pixels (PROTOCOL.md §6.8).
    pixels = min(n for c, n in profile.splits[0].bytes.items() if c.startswith("uint8_image"))
    assert lines[2].split()[-1] == str(pixels)
    assert f"split 0 sends the frame's pixels (uint8_image): {pixels} bytes" in out
    assert err == ""
