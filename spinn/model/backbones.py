"""Backbones written in the project, and the loader for a user's own model.

torchvision does not import beside the pinned torch here (docs/DESIGN.md, "Data and
models"), so the paper's backbones are written out: CIFAR-style ResNet-20/56 (He et al.
2016, section 4.2), an ImageNet-style ResNet-18 for camera-sized input, MobileNetV2 (Sandler et al. 2018, CIFAR variant with a stride-1
stem) and VGG16 with batch norm. Each builder takes keyword-only ``in_channels``,
``num_classes`` and ``width`` so a 1x28x28 Fashion-MNIST input and a 3x32x32 CIFAR
input both work.

ReLUs are modules called out of place: the splitter (spinn.model.progressive) finds split
points at ReLU outputs in the traced graph, and an in-place ReLU would let one stage
overwrite a tensor another stage still reads.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "build_backbone",
    "load_callable",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet56",
    "vgg16_bn",
]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _basic_groups(in_planes: int, plan: list[tuple[int, int]]) -> tuple[nn.Sequential, int]:
    """Basic blocks of (planes, count) per group, each group after the first opening with
    stride 2; the blocks in one Sequential, and the channels they end with."""
    layers: list[nn.Module] = []
    for group, (planes, count) in enumerate(plan):
        for i in range(count):
            layers.append(BasicBlock(in_planes, planes, 2 if group > 0 and i == 0 else 1))
            in_planes = planes
    return nn.Sequential(*layers), in_planes


def _init_convs(model: nn.Module) -> None:
    """He initialisation of every convolution (He et al. 2015, fan-out)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class CifarResNet(nn.Module):
    """ResNet for small images: 3 groups of ``depth_blocks`` basic blocks, widths w, 2w, 4w."""

    def __init__(
        self, depth_blocks: int, *, in_channels: int, num_classes: int, width: int
    ) -> None:
        super().__init__()
        if depth_blocks < 1 or width < 1:
            raise ValueError(
                f"ResNet needs depth_blocks >= 1 and width >= 1, got {depth_blocks}, {width}"
            )
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        plan = [(width * 2**group, depth_blocks) for group in range(3)]
        self.layers, planes = _basic_groups(width, plan)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet20(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-20 (3 x 3 basic blocks)."""
    return CifarResNet(3, in_channels=in_channels, num_classes=num_classes, width=width)


def resnet56(*, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-56 (3 x 9 basic blocks), the paper's CIFAR backbone."""
    return CifarResNet(9, in_channels=in_channels, num_classes=num_classes, width=width)


class ImageNetResNet(nn.Module):
    """ResNet for camera-sized images (He et al. 2016, table 1): a 7x7 stride-2 stem and a
    3x3 stride-2 max-pool shrink the input 4x per side before the basic blocks, so the
    activations after the first stages hold fewer values than the input frame."""

    def __init__(
        self, blocks: tuple[int, ...], *, in_channels: int, num_classes: int, width: int
    ) -> None:
        super().__init__()
        if width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"ResNet needs width >= 1 and blocks >= 1, got {width}, {blocks}")
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        plan = [(width * 2**group, count) for group, count in enumerate(blocks)]
        self.layers, planes = _basic_groups(width, plan)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        _init_convs(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ImageNetResNet:
    """ResNet-18 (4 x 2 basic blocks, widths w, 2w, 4w, 8w) with the ImageNet stem."""
    return ImageNetResNet(
        (2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes, width=width
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expansion, output channels, repeats, first stride); CIFAR variant: the first two
# stride-2 stages of the ImageNet table run at stride 1 because the input is small.
_MOBILENET_V2_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)


class MobileNetV2(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, width: float) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"MobileNetV2 width multiplier must be > 0, got {width}")
        stem = _scaled(32, width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(),
        ]
        inp = stem
        for expand, channels, repeats, stride in _MOBILENET_V2_TABLE:
            oup = _scaled(channels, width)
            for i in range(repeats):
                layers.append(InvertedResidual(inp, oup, stride if i == 0 else 1, expand))
                inp = oup
        last = _scaled(1280, max(1.0, width))
        layers += [nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def mobilenet_v2(*, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2, CIFAR variant; ``width`` is the channel multiplier."""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, width=width)


_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, width: float) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VGG width multiplier must be > 0, got {width}")
        layers: list[nn.Module] = []
        c = in_channels
        for item in _VGG16_CFG:
            if item == "M":
                # ceil_mode keeps five poolings valid for 28x28 inputs (28->14->7->4->2->1).
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = max(8, int(int(item) * width))
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(c, c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(c, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG16 with batch norm, CIFAR-style classifier; ``width`` scales every layer."""
    return VGG(in_channels=in_channels, num_classes=num_classes, width=width)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenet_v2": mobilenet_v2,
    "vgg16_bn": vgg16_bn,
}


def load_callable(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:callable"`` to the callable that builds a user's model."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"user model {spec!r} must be written 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"user model {spec!r}: cannot import {module_name!r}: {exc} (the module must be "
            "importable: install its package or add its directory to PYTHONPATH)"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"user model {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"user model {spec!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _check_signature(spec: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """A user callable must take the keywords it is called with: say so in one line, not
    with a TypeError from deep inside the call."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ValueError(
            f"user model {spec!r}: {spec.partition(':')[2]}{signature} cannot be called as "
            f"({given}): {exc}. spinn calls it with keywords in_channels and num_classes "
            "(plus --width as width): give it those parameters, or **kwargs"
        ) from None


def build_backbone(arch: str, *, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """Build a built-in architecture by name, or a user model given as ``module:callable``.

    A user callable is called with ``in_channels`` and ``num_classes`` keywords (plus any
    ``options``) and must return an ``nn.Module`` that torch.fx can trace.
    """
    if ":" in arch:
        factory = load_callable(arch)
    elif arch in ARCHITECTURES:
        factory = ARCHITECTURES[arch]
    else:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {arch!r}; built-in: {known}, or 'module:callable'")
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, **options}
    if ":" in arch:
        _check_signature(arch, factory, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"architecture {arch!r} returned {type(model).__name__}, not nn.Module")
    return model
