"""The CIFAR ResNets of the distillation benchmarks (He et al. 2016's CIFAR layout, as used by
CRD / DKD / IKL-KD / WKD on CIFAR-100): resnet20/32/56/110 (widths 16-16-32-64) and the
four-times wider resnet8x4 / resnet32x4 (widths 32-64-128-256); and the ImageNet ResNet-50 with a
3x3 stride-1 stem and no max pooling for 32x32 inputs (the res50 -> MobileNetV2 teacher).

Post-activation basic blocks (conv-BN-ReLU-conv-BN, + shortcut, ReLU); a 1x1 conv + BN
projection where the width or resolution changes; a 3x3 stem conv + BN + ReLU; three stages at
32, 16 and 8 pixels; global average pooling; a linear classifier. Inputs in [0, 1] are
normalised inside the model with the dataset's channel statistics (as the KD recipes normalise
their inputs), so the model takes the same [0, 1] images as every other model here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn import set_bn_momentum
from .wideresnet_dm import normalization_for


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN shortcut where width or resolution changes; None (identity) otherwise."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


def _join(x: Tensor, branch: Tensor, shortcut: nn.Module | None) -> Tensor:
    """Post-activation residual: relu(branch + shortcut(x))."""
    return F.relu(branch + (x if shortcut is None else shortcut(x)), inplace=True)


class _Block(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return _join(x, out, self.shortcut)


class CifarResNet(nn.Module):
    """depth = 6n + 2 (n basic blocks per stage); widths = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100,
                 mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0,) * 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_ch = [], widths[0]
        for i, out_ch in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(_Block(in_ch, out_ch, 2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return _join(x, out, self.shortcut)


class CifarResNet50(nn.Module):
    """Bottleneck stages of 3, 4, 6, 3 blocks (widths 64-128-256-512, x4 out), strides 1-2-2-2."""

    def __init__(self, num_classes: int = 100, mean: tuple[float, ...] = (0.0, 0.0, 0.0),
                 std: tuple[float, ...] = (1.0,) * 3):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, in_ch = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for j in range(n):
                blocks.append(_Bottleneck(in_ch, width, 2 if (i > 0 and j == 0) else 1))
                in_ch = width * _Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(self.layers(out), 1).flatten(1))


def normalized_builder(make):
    """A MODELS constructor for a network that normalises its inputs inside:
    `make(num_classes, mean, std)`; `bn_momentum` (model.bn_momentum) sets every BatchNorm's."""
    def build(num_classes: int, dataset: str | None = None, bn_momentum: float = 0.1,
              **kwargs) -> nn.Module:
        mean, std = normalization_for(num_classes, dataset)
        return set_bn_momentum(make(num_classes, mean=mean, std=std, **kwargs), bn_momentum)
    return build


def cifar_resnet(depth: int, widths: tuple[int, int, int, int]):
    return normalized_builder(lambda num_classes, **kw: CifarResNet(depth, widths, num_classes,
                                                                    **kw))
