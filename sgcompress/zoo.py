"""CIFAR-style ResNets from the pruning literature (He et al., 2016, section 4.2).

The network is a 3x3 stem convolution with ``width`` channels, three stages of ``n``
basic blocks with ``width``, ``2*width`` and ``4*width`` channels (the first block of
stages 2 and 3 halves the spatial size with stride 2), global average pooling and one
linear layer. ``resnet20/32/56`` use n = 3/5/9 (depth = 6n + 2).

Where a block changes shape, its identity path is a 1x1 convolution + BatchNorm
("option B") held in a submodule named ``shortcut``; the pruner leaves modules whose
name contains ``shortcut``/``downsample`` dense by default, so residual additions keep
matching shapes.

The models work for any input at least 4x4 pixels (28x28 MNIST-like and 32x32
CIFAR-like inputs are the usual ones) and any number of input channels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "MODELS", "resnet20", "resnet32", "resnet56"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a residual path; ReLU after the addition."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with three stages of ``blocks_per_stage`` basic blocks (depth 6n + 2)."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
    ) -> None:
        super().__init__()
        for name, value in (
            ("blocks_per_stage", blocks_per_stage),
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("width", width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                # Imported lazily so zoo.py stays importable on its own.
                from sgcompress.errors import ConfigError

                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = (width, 2 * width, 4 * width)
        in_ch = width
        stages = []
        for i, out_ch in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                # small classifier weights: initial logits near zero, loss near ln(num_classes)
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27 M parameters at width 16, 10 classes)."""
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-32 (5 blocks per stage)."""
    return CifarResNet(5, num_classes=num_classes, in_channels=in_channels, width=width)


def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-56 (9 blocks per stage)."""
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels, width=width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
}
