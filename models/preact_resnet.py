"""Pre-activation ResNet-18 for CIFAR (He et al. 2016) in the Rice et al. (2020) variant:
final BN-ReLU before pooling, projection shortcuts fed the pre-activated input, no input
normalization. Keys and forward match RobustBench's ``model_zoo/architectures/resnet.py::
PreActResNet(PreActBlockV2, [2, 2, 2, 2], num_classes, bn_before_fc=True)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        # Wrapped in a Sequential only so the key is `shortcut.0.weight`, as in checkpoints.
        self.shortcut = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False))
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre)), inplace=True))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return out + shortcut


class PreActResNet(nn.Module):
    """Four stages of PreActBlocks with widths width * (1, 2, 4, 8), strides (1, 2, 2, 2)."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 width: int = 64, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"PreActResNet needs 4 stage sizes, got {tuple(num_blocks)}")
        widths = [width * 2**i for i in range(4)]
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        in_ch = width
        for i, (n, out_ch) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            blocks = [PreActBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1,
                                  bn_momentum) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.bn = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out), inplace=True)
        out = F.avg_pool2d(out, 4)  # 4x4 feature map for 32x32 inputs -> 1x1
        return self.linear(out.flatten(1))


def preact_resnet18(num_classes: int = 10, width: int = 64, bn_momentum: float = 0.1
                    ) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, width=width, bn_momentum=bn_momentum)
