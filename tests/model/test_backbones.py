"""Backbones: shapes, options, the module:callable loader and its errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from spinn.model.backbones import ARCHITECTURES, build_backbone, load_callable


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_backbone_output_shape(arch: str, shape: tuple[int, int, int]) -> None:
    width = 0.25 if arch in ("vgg16_bn", "mobilenet_v2") else 8
    model = build_backbone(arch, in_channels=shape[0], num_classes=7, width=width).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_resnet_depths() -> None:
    def convs(m: nn.Module) -> int:
        return sum(1 for x in m.modules() if isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3))

    # ResNet-6n+2: 6n 3x3 convs in the blocks plus the stem.
    assert convs(build_backbone("resnet20", in_channels=1, num_classes=10)) == 19
    assert convs(build_backbone("resnet56", in_channels=1, num_classes=10)) == 55
    # ResNet-18: 16 3x3 convs in 8 basic blocks; its stem is one 7x7 convolution.
    assert convs(build_backbone("resnet18", in_channels=3, num_classes=10)) == 16


def test_width_changes_parameter_count() -> None:
    small = build_backbone("resnet20", in_channels=1, num_classes=10, width=8)
    big = build_backbone("resnet20", in_channels=1, num_classes=10, width=16)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(big) > 3 * n(small)


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'.*resnet20"):
        build_backbone("resnet19", in_channels=1, num_classes=10)


def test_user_model_via_module_callable(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("user_cnn_for_test")

    def tiny(*, in_channels: int, num_classes: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes)
        )

    mod.tiny = tiny  # type: ignore[attr-defined]
    mod.not_callable = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "user_cnn_for_test", mod)
    assert load_callable("user_cnn_for_test:tiny") is tiny
    model = build_backbone("user_cnn_for_test:tiny", in_channels=1, num_classes=3)
    assert isinstance(model, nn.Sequential)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_callable("user_cnn_for_test:missing")
    with pytest.raises(ValueError, match="is not callable"):
        load_callable("user_cnn_for_test:not_callable")
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="package.module:callable"):
        load_callable("just_a_module:")


def test_bad_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="width"):
        build_backbone("mobilenet_v2", in_channels=1, num_classes=10, width=0)
