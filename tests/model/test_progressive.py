"""Generator and splitter: split points, FLOPs, exit placement, the split invariant, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spinn.model.backbones import ARCHITECTURES, build_backbone
from spinn.model.progressive import (
    ExitHead,
    InputSpec,
    ProgressiveModel,
    ProgressiveModelError,
    make_progressive,
)

GREY = InputSpec(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))
RGB = InputSpec(channels=3, height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
# Narrow widths keep the suite fast on two cores; the graph structure (and so every
# split point) does not depend on width.
WIDTHS = {"resnet18": 8, "resnet20": 16, "resnet56": 4, "mobilenet_v2": 0.25, "vgg16_bn": 0.125}


@functools.cache
def _build(arch: str, spec: InputSpec = GREY) -> tuple[nn.Module, ProgressiveModel]:
    torch.manual_seed(0)
    backbone = build_backbone(
        arch, in_channels=spec.channels, num_classes=10, width=WIDTHS[arch]
    ).eval()
    model = make_progressive(backbone, spec)
    # Give batch norms non-trivial statistics so the invariant is tested on real numbers.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return backbone, model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_split_invariant_every_split(arch: str) -> None:
    _check_invariant(*_build(arch), GREY)


def test_split_invariant_rgb_input() -> None:
    _check_invariant(*_build("resnet20", RGB), RGB)


def _check_invariant(backbone: nn.Module, model: ProgressiveModel, spec: InputSpec) -> None:
    x = torch.randn(2, *spec.shape)
    with torch.no_grad():
        full = model(x)
        # The last exit is the backbone itself: the stages compute the same function.
        torch.testing.assert_close(full[-1], backbone(x))
        assert len(full) == model.num_exits
        for split in range(model.num_stages + 1):
            act, early = model.device_part(split)(x)
            assert tuple(act.shape[1:]) == model.split_shape(split)
            late = model.server_part(split)(act)
            assert len(early) == len(model.exits_before(split))
            assert len(early) + len(late) == model.num_exits
            for got, want in zip(early + late, full, strict=True):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_exits_are_ordered_cheap_and_near_fractions(arch: str) -> None:
    # At the backbones' own widths, as the paper uses them.
    model = make_progressive(build_backbone(arch, in_channels=1, num_classes=10), GREY)
    assert model.exit_stages == sorted(set(model.exit_stages))
    assert model.exit_stages[-1] == model.num_stages - 1
    assert 4 <= model.num_exits <= 7
    total = sum(model.stage_flops)
    for flops in model.exit_flops:
        assert flops < 0.06 * total  # "a few percent" of the backbone per exit head
    cum = [sum(model.stage_flops[: k + 1]) / total for k in model.exit_stages[:-1]]
    assert cum == sorted(cum)
    assert cum[0] < 0.35 and cum[-1] > 0.6


def test_resnet20_split_points_are_block_outputs() -> None:
    _, model = _build("resnet20")
    # Stem ReLU + 9 block outputs are the only candidates: inside a residual block the
    # shortcut also crosses the cut (DESIGN.md part 2).
    assert model.num_stages == 11
    assert model.split_shape(0) == (1, 28, 28)
    assert model.split_shape(1) == (16, 28, 28)
    assert model.split_shape(4) == (16, 28, 28)
    assert model.split_shape(5) == (32, 14, 14)
    assert model.split_shape(8) == (64, 7, 7)
    # The last block's ReLU feeds only the global pooling: the cut moves after it.
    assert model.split_names[10] == "pool"
    assert model.split_shape(10) == (64, 1, 1)
    assert model.split_shape(11) == (10,)
    assert all(name.startswith(("relu", "layers")) for name in model.split_names[1:-2])


def test_resnet18_camera_input_cuts_after_the_stem_pooling() -> None:
    camera = InputSpec(channels=3, height=96, width=96, mean=(0.5,) * 3, std=(0.25,) * 3)
    backbone, model = _build("resnet18", camera)
    # Stem ReLU -> max-pool: the first cut follows the pooling, at a quarter of the
    # input's values per side squared (8 x 24 x 24 = 4,608 against 27,648 input values).
    assert model.split_names[1] == "maxpool"
    assert model.split_shape(1) == (8, 24, 24)
    assert model.split_shape(3) == (8, 24, 24)
    assert model.split_shape(5) == (16, 12, 12)
    assert model.split_names[-2] == "pool"
    assert model.num_stages == 10
    _check_invariant(backbone, model, camera)


def test_flops_match_shape_based_count() -> None:
    _, model = _build("resnet20")
    # First stage is conv3x3(1->16) on 28x28: 2 * 16 * 28 * 28 * 9 FLOPs.
    assert model.stage_flops[0] == pytest.approx(2 * 16 * 28 * 28 * 9)
    # Whole ResNet-20 (width 16) at 28x28: about 62 MFLOPs.
    assert 55e6 < sum(model.stage_flops) < 70e6


def test_run_stage_matches_forward() -> None:
    _, model = _build("resnet20")
    x = torch.randn(1, *GREY.shape)
    outs = []
    with torch.no_grad():
        act = x
        for k in range(model.num_stages):
            act, logits = model.run_stage(k, act)
            assert (logits is not None) == (k in model.exit_stages)
            if logits is not None:
                outs.append(logits)
        full = model(x)
    for a, b in zip(outs, full, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(IndexError):
        model.run_stage(model.num_stages, x)
    with pytest.raises(IndexError):
        model.device_part(model.num_stages + 1)


def test_custom_exit_fractions_and_single_exit() -> None:
    backbone = build_backbone("resnet20", in_channels=1, num_classes=10, width=8)
    two = make_progressive(backbone, GREY, exit_fractions=(0.5, 0.2))
    assert two.num_exits == 3
    single = make_progressive(backbone, GREY, exit_fractions=())
    assert single.exit_stages == [single.num_stages - 1]
    assert single.num_stages == 11


@pytest.mark.parametrize("bad", [(0.0,), (1.0,), (0.5, 1.2), (-0.1,), (float("nan"),)])
def test_exit_fractions_outside_unit_interval(bad: tuple[float, ...]) -> None:
    backbone = build_backbone("resnet20", in_channels=1, num_classes=10, width=8)
    with pytest.raises(ProgressiveModelError, match="strictly between 0 and 1"):
        make_progressive(backbone, GREY, exit_fractions=bad)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return self.fc(y.mean(dim=(2, 3)))


class _NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class _Functional(nn.Module):
    """A user model written with functional ReLUs and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = torch.relu(self.c2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_untraceable_model_error() -> None:
    with pytest.raises(ProgressiveModelError, match="torch.fx cannot trace _Untraceable"):
        make_progressive(_Untraceable(), GREY)


def test_no_candidate_split_error() -> None:
    with pytest.raises(ProgressiveModelError, match="no candidate split point"):
        make_progressive(_NoRelu(), GREY)


def test_input_spec_mismatch_error() -> None:
    backbone = build_backbone("resnet20", in_channels=3, num_classes=10, width=8)
    with pytest.raises(
        ProgressiveModelError, match=r"does not accept the input spec's shape \(1, 28, 28\)"
    ):
        make_progressive(backbone, GREY)


def test_functional_user_model_splits() -> None:
    torch.manual_seed(1)
    model = make_progressive(_Functional().eval(), GREY, exit_fractions=(0.3,)).eval()
    assert model.num_stages == 3
    x = torch.randn(3, *GREY.shape)
    with torch.no_grad():
        full = model(x)
        for split in range(model.num_stages + 1):
            act, early = model.device_part(split)(x)
            for got, want in zip(early + model.server_part(split)(act), full, strict=True):
                torch.testing.assert_close(got, want)
    # Both ReLUs feed a pooling layer only: the cuts follow the pooling, so the
    # first split sends 8 x 14 x 14 values, not 8 x 28 x 28.
    assert model.split_shapes[1:3] == [(8, 14, 14), (16, 1, 1)]
    assert model.split_names[1:3] == ["max_pool2d", "adaptive_avg_pool2d"]
    # Pooling is counted: one FLOP per pooled input element (8 x 28 x 28), in the
    # stage that ends with it.
    conv1 = 2 * 8 * 28 * 28 * 9
    assert model.stage_flops[0] >= conv1 + 8 * 28 * 28


class _PoolWithSideUse(nn.Module):
    """A ReLU output that is pooled and also used later: the cut stays at the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.c1(x))
        pooled = F.max_pool2d(y, 2)
        both = torch.cat([pooled.mean(dim=(2, 3)), y.mean(dim=(2, 3))], dim=1)
        return self.fc(both)


def test_pool_cut_needs_the_relu_to_feed_only_the_pooling() -> None:
    model = make_progressive(_PoolWithSideUse().eval(), GREY, exit_fractions=())
    assert model.split_names[1:-1] == ["relu"]
    assert model.split_shape(1) == (8, 28, 28)


def test_exit_head_on_a_pooled_vector_does_not_upsample() -> None:
    head = ExitHead((16, 1, 1), 10, hidden=32, pool=4)
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert linear[0].in_features == 32
    assert head(torch.randn(2, 16, 1, 1)).shape == (2, 10)


def test_input_spec_validation_and_preprocess() -> None:
    with pytest.raises(ValueError, match="one per channel"):
        InputSpec(channels=3, height=8, width=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec(channels=1, height=8, width=8, mean=(0.5,), std=(0.0,))
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    x = GREY.preprocess(images)
    torch.testing.assert_close(x, torch.full((2, 1, 28, 28), (1 - 0.286) / 0.353))
    with pytest.raises(ValueError, match="do not match"):
        GREY.preprocess(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    assert InputSpec.from_dict(GREY.to_dict()) == GREY


class _Gate(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace through this forward."""

    def forward(self, y: Tensor) -> Tensor:
        if y.sum() > 0:
            y = y * 2
        return y


class _GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = _Gate()
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = self.gate(F.relu(self.c1(x)))
        return self.fc(F.relu(self.c2(y)).mean(dim=(2, 3)))


class _GateLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _Gate) or super().is_leaf_module(m, module_qualified_name)


def test_untraceable_submodule_is_named_with_the_way_out() -> None:
    with pytest.raises(ProgressiveModelError) as info:
        make_progressive(_GatedNet(), GREY)
    message = str(info.value)
    # Where tracing failed, then the tools that apply: a leaf module or torch.fx.wrap.
    assert "_Gate.forward (module 'gate')" in message
    assert "`if y.sum() > 0:`" in message
    assert "fx_tracer" in message and "is_leaf_module" in message
    assert "torch.fx.wrap" in message and "does not apply to methods" in message


def test_a_models_own_tracer_keeps_a_submodule_whole() -> None:
    torch.manual_seed(0)
    net = _GatedNet().eval()
    net.fx_tracer = _GateLeaf  # type: ignore[assignment]
    model = make_progressive(net, GREY, exit_fractions=(0.3,)).eval()
    assert "gate" in [n.name for n in model.stages[1].graph.nodes]  # type: ignore[union-attr]
    x = torch.randn(2, *GREY.shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], net(x))
        for split in range(model.num_stages + 1):
            act, early = model.device_part(split)(x)
            assert len(early + model.server_part(split)(act)) == model.num_exits
