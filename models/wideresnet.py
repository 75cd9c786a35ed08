"""TRADES-style pre-activation WideResNet (ReLU) for 32x32 inputs, no input normalization.

State-dict keys and forward match RobustBench's
``model_zoo/architectures/wide_resnet.py::WideResNet(..., sub_block1=False)``, so
RobustBench/TRADES checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(model: nn.Module) -> None:
    """TRADES/WRN init: conv ~ N(0, sqrt(2 / (k*k*out_channels))), BN = identity, Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class _Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        # Only width changes get a projection; the WRN layout never downsamples
        # without widening, so an identity shortcut can't meet stride 2.
        if in_ch != out_ch:
            self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
        elif stride != 1:
            raise ValueError("identity shortcut requires stride 1")
        else:
            self.convShortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x), inplace=True)  # in-place on a fresh BN output is autograd-safe
        out = self.conv2(F.relu(self.bn2(self.conv1(pre)), inplace=True))
        # TRADES quirk kept for checkpoint compatibility: a projection shortcut
        # sees the pre-activated input, an identity shortcut the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class _Group(nn.Module):
    """`n` blocks; only the first changes width/stride. Submodule name `layer` fixes the keys."""

    def __init__(self, n: int, in_ch: int, out_ch: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(
            _Block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, bn_momentum)
            for i in range(n)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor` (ReLU), e.g. WRN-34-10 as used by TRADES."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * widen_factor, 32 * widen_factor, 64 * widen_factor
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.block1 = _Group(n, 16, w1, 1, bn_momentum)
        self.block2 = _Group(n, w1, w2, 2, bn_momentum)
        self.block3 = _Group(n, w2, w3, 2, bn_momentum)
        self.bn1 = nn.BatchNorm2d(w3, momentum=bn_momentum)
        self.fc = nn.Linear(w3, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out), inplace=True)
        out = F.avg_pool2d(out, 8)  # 8x8 feature map for 32x32 inputs -> 1x1
        return self.fc(out.flatten(1))
